"""Stage A of the tiny LLaVA on the Trainer path (analysis/training/tower.py): the per-patch glyph objective trains
the tower, and the saved start of stage B is a LLaVA whose tower is exactly the trained one."""

from __future__ import annotations

import json

import torch
from transformers import LlavaForConditionalGeneration

from analysis import twins
from analysis.training.model import default_processor
from analysis.training.tower import CellSamples, train_tower


def test_cell_samples_are_the_twins_cells_in_patch_order():
    data = CellSamples(default_processor(), n=8, seed=3)
    names = sorted(twins.TWINS)
    for i in (0, 5):
        sample = twins.generate(names[i % len(names)], "train", 1, 3, start=i // len(names))[0]
        item = data[i]
        assert item["pixel_values"].shape == (3, 64, 64)
        expected = [twins.CELL_VOCAB.index(c) for row in sample["cells"] for c in row]
        assert item["cell_targets"].tolist() == expected


def test_stage_a_trains_the_tower_and_saves_it_in_a_fresh_llava(tmp_path):
    init = train_tower(tmp_path, steps=12, batch=16, lr=2e-3, seed=0)
    record = json.loads((init / "tower.json").read_text())
    losses = [e["loss"] for e in record["log"] if "loss" in e]
    assert len(losses) >= 3 and losses[-1] < losses[0]  # the objective learns
    model = LlavaForConditionalGeneration.from_pretrained(init)
    from safetensors.torch import load_file

    trained = load_file(tmp_path / "tower" / "checkpoint-12" / "model.safetensors")
    tower = {k.removeprefix("tower."): v for k, v in trained.items() if k.startswith("tower.")}
    own = model.model.vision_tower.state_dict()
    assert tower.keys() == own.keys()
    assert all(torch.equal(own[k], v) for k, v in tower.items())
    torch.manual_seed(0)
    fresh = LlavaForConditionalGeneration(model.config)  # the LLM is the seeded fresh one
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
