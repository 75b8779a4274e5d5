"""Stage A of the embedded tiny LLaVA, on transformers' ``Trainer``: the CLIP tower learns which glyph (or blank /
bar / colon) each of its patches shows, from the twins' cell maps. Then a fresh tiny LLaVA is saved around the
trained tower; stage B is ``experiments/train.py +recipe=tiny_base`` on that directory (the LLaVA training path).

Only the patch's own cell is predicted, never its neighbours: relations between cells are left for the language
model to compute on the vision tokens, which is what the ablations measure (../shared/notes/tiny-llava-training.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from analysis import twins

BLANK_WEIGHT = 0.2  # most cells are blank; they still need to be told apart from glyphs
NAMES = sorted(twins.TWINS)


class CellObjective(nn.Module):
    """The tower plus a linear head over ``CELL_VOCAB``; ``forward`` returns the weighted per-patch loss."""

    def __init__(self, tower, classes: int):
        super().__init__()
        self.tower = tower
        self.head = nn.Linear(tower.config.hidden_size, classes)
        weight = torch.ones(classes)
        weight[0] = BLANK_WEIGHT
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, pixel_values, cell_targets):
        feats = self.tower(pixel_values, output_hidden_states=True).hidden_states[-1][:, 1:]  # patches, CLS dropped
        logits = self.head(feats)  # (B, cells, classes)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), cell_targets.flatten(), weight=self.weight)
        return {"loss": loss, "logits": logits}


class CellSamples(torch.utils.data.Dataset):
    """Twin train samples ``0 .. n-1`` round-robin over the twins (sample ``i``: a pure function of seed and i),
    as (pixel_values, cell class per patch)."""

    def __init__(self, processor, n: int, seed: int):
        self.processor, self.n, self.seed = processor, n, seed
        self.index = {c: i for i, c in enumerate(twins.CELL_VOCAB)}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        sample = twins.generate(NAMES[i % len(NAMES)], "train", 1, self.seed, start=i // len(NAMES))[0]
        pixels = self.processor.image_processor([sample["image"]], return_tensors="pt")["pixel_values"][0]
        cells = torch.tensor([self.index[c] for row in sample["cells"] for c in row])
        return {"pixel_values": pixels, "cell_targets": cells}


def glyph_accuracy(objective: CellObjective, data: CellSamples, n: int = 256) -> float:
    """Share of non-blank cells whose class the tower + head predict, on the first ``n`` samples."""
    batch = torch.utils.data.default_collate([data[i] for i in range(n)])
    with torch.no_grad():
        predicted = objective(**batch)["logits"].argmax(-1)
    glyph = batch["cell_targets"] > 0
    return (predicted[glyph] == batch["cell_targets"][glyph]).float().mean().item()


def train_tower(out: Path, steps: int = 600, batch: int = 64, lr: float = 2e-3, seed: int = 0,
                threads: int = 1, workers: int = 0) -> Path:
    """Stage A into ``out/tower``; then a fresh tiny LLaVA (seeded) with the trained tower is saved in
    ``out/init`` with its processor and ``tower.json`` (recipe, log, glyph accuracy). Returns ``out/init``."""
    from transformers import CLIPVisionModel, LlavaForConditionalGeneration, Trainer, TrainingArguments

    from .model import default_config, default_processor
    from .run import last_complete_checkpoint

    torch.set_num_threads(threads)
    out = Path(out)
    config, processor = default_config(), default_processor()
    torch.manual_seed(seed)
    objective = CellObjective(CLIPVisionModel(config.vision_config), len(twins.CELL_VOCAB))
    data = CellSamples(processor, steps * batch, seed)
    args = TrainingArguments(
        output_dir=str(out / "tower"), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
        warmup_steps=50, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        weight_decay=0.01, adam_beta2=0.98, max_grad_norm=1.0, logging_steps=min(20, max(1, steps // 4)),
        save_steps=200, seed=seed,
        report_to="none", remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=workers)
    trainer = Trainer(model=objective, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(out / "tower"))
    objective.cpu().eval()
    accuracy = glyph_accuracy(objective, CellSamples(processor, 256, seed + 1000))

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(objective.tower.state_dict())
    init = out / "init"
    model.save_pretrained(init)
    processor.save_pretrained(init)
    (init / "tower.json").write_text(json.dumps({
        "steps": steps, "batch": batch, "lr": lr, "seed": seed, "held_out_glyph_accuracy": accuracy,
        "log": trainer.state.log_history}, indent=2))
    return init
