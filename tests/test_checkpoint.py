"""The shipped tiny default loads offline like a hub checkpoint and reaches its recorded scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis import twins
from analysis.training import evaluate as ev

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-llava"
SUBSET = 24  # eval samples per twin; the record holds the scores of exactly this subset
# Another CPU's kernels may round differently and flip a near-tie answer: allow one sample per twin.
TOLERANCE = 1.0 / SUBSET + 1e-9


@pytest.fixture(scope="module")
def shipped():
    return ev.load_checkpoint(CHECKPOINT)


def test_loads_like_a_hub_checkpoint(shipped):
    model, processor = shipped
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.text_config.num_hidden_layers == 32
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    assert grid * grid >= 64 and grid % 4 == 0  # 2x and 4x spatial downsampling (ProxyV) apply
    assert sum(f.stat().st_size for f in CHECKPOINT.iterdir()) <= 25 * 2**20
    batch = processor(images=[twins.generate("synth_ocrbench", "eval", 1, twins.EVAL_SEED)[0]["image"]],
                      text=["USER: <image>\nRead the text. ASSISTANT:"], return_tensors="pt")
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == grid * grid


def test_reaches_recorded_scores(shipped):
    model, processor = shipped
    recorded = json.loads((CHECKPOINT / "training.json").read_text())[f"eval_n{SUBSET}"]
    scores = ev.score_twins(model, processor, n=SUBSET)
    for name in twins.TWINS:
        assert abs(scores[name] - recorded[name]) <= TOLERANCE, (name, scores[name], recorded[name])


def test_blind_option_really_blanks_the_image(shipped, monkeypatch):
    model, processor = shipped
    seen = []
    original = type(processor).__call__

    def spy(self, images=None, text=None, **kwargs):
        seen.extend(images)
        return original(self, images=images, text=text, **kwargs)

    monkeypatch.setattr(type(processor), "__call__", spy)
    samples = twins.generate("synth_docvqa", "eval", 4, twins.EVAL_SEED)
    ev.answer(model, processor, samples, blind=True)
    assert len(seen) == 4
    for image, sample in zip(seen, samples):
        pixels = np.asarray(image)
        assert image.size == sample["image"].size
        assert (pixels == pixels.reshape(-1, pixels.shape[-1])[0]).all()  # one uniform colour
        assert not np.array_equal(pixels, np.asarray(sample["image"]))


def test_blind_model_scores_far_below_seeing_model(shipped):
    model, processor = shipped
    record = json.loads((CHECKPOINT / "training.json").read_text())
    for name in twins.TWINS:
        assert record["scores"][name] - record["blind"][name] >= 0.30, name
    with torch.no_grad():
        blind = ev.score_twins(model, processor, n=8, blind=True, names=["synth_ocrbench"])
    assert blind["synth_ocrbench"] <= 0.25
