"""Stage A (vision tower, dense per-patch objective) and stage B (LLaVA, tower frozen)."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from transformers import CLIPVisionModel, LlavaForConditionalGeneration

from analysis import twins
from analysis.training import data
from analysis.training.loop import Trainer

TWIN_NAMES = sorted(twins.TWINS)
BLANK_WEIGHT = 0.2  # most cells are blank; they still need to be told apart from glyphs


def train_tower(config, processor, out: Path, steps: int, batch: int, lr: float, seed: int) -> CLIPVisionModel:
    """Stage A: the CLIP tower learns which glyph (or blank / bar / colon) each patch shows.

    Only the patch's own cell is predicted, never its neighbours: relations between cells are left
    for the language model to compute on the vision tokens, which is what the ablations measure.
    """
    torch.manual_seed(seed)
    tower = CLIPVisionModel(config.vision_config)
    head = torch.nn.Linear(config.vision_config.hidden_size, len(twins.CELL_VOCAB))
    weight = torch.ones(len(twins.CELL_VOCAB))
    weight[0] = BLANK_WEIGHT
    trainer = Trainer(out, [{"params": [*tower.parameters(), *head.parameters()], "lr": lr}], steps, warmup=50)
    modules = {"tower": tower, "head": head}
    trainer.resume(modules)
    stream = data.sample_stream(TWIN_NAMES, seed, start=trainer.step * batch)

    def loss_fn(step):
        samples = list(itertools.islice(stream, batch))
        feats = tower(data.pixel_batch(processor, samples), output_hidden_states=True).hidden_states[-1][:, 1:]
        logits = head(feats)  # (B, cells, classes)
        target = data.cell_targets(samples)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), weight=weight)
        glyph = target > 0
        accuracy = (logits.argmax(-1)[glyph] == target[glyph]).float().mean().item()
        return loss, {"glyph_accuracy": accuracy}

    tower.train()
    trainer.run(loss_fn, modules, [*tower.parameters(), *head.parameters()], desc="stage A (tower)")
    return tower.eval()


def train_llava(model: LlavaForConditionalGeneration, processor, out: Path, steps: int, batch: int, lr: float,
                seed: int, trainable=None, evaluate=None, eval_every: int = 0, desc: str = "stage B (LLaVA)",
                context=None):
    """Stage B: next-token loss on the answers; only ``trainable`` parameters (default: all but the tower).
    ``context``: a zero-argument callable giving the context every training forward runs in (e.g. a token
    reduction: ``lambda: ablate(model, "pdrop", layers=[8, 16], keep=0.72)``)."""
    if trainable is None:
        for p in model.model.vision_tower.parameters():
            p.requires_grad_(False)
        projector = list(model.model.multi_modal_projector.parameters())
        rest = [p for n, p in model.named_parameters()
                if p.requires_grad and not n.startswith(("model.vision_tower", "model.multi_modal_projector"))]
        groups = [{"params": projector, "lr": 2 * lr}, {"params": rest, "lr": lr}]
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        groups = [{"params": list(trainable), "lr": lr}]
    params = [p for g in groups for p in g["params"]]
    trainer = Trainer(out, groups, steps, warmup=50)
    modules = {"model": model}
    trainer.resume(modules)
    stream = data.sample_stream(TWIN_NAMES, seed + 1, start=trainer.step * batch)

    def loss_fn(step):
        samples = list(itertools.islice(stream, batch))
        inputs = data.llava_batch(processor, samples)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if context is None:
                return model(**inputs).loss, {}
            labels = inputs.pop("labels")
            with context() as state:  # a pruned forward outputs fewer rows: the labels of those rows
                logits = model(**inputs).logits
                labels = state.output_labels(labels)
            return model.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1]), {}

    def evaluate_and_restore():
        model.eval()
        try:
            return evaluate(model)
        finally:
            model.train()

    # On CPU, eager attention with bf16 autocast trains ~4x faster than sdpa in fp32 at these shapes
    # (sdpa's CPU flash backward dominates a step); master weights stay fp32.
    implementation = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    model.train()
    try:
        trainer.run(loss_fn, modules, params, evaluate_and_restore if evaluate else None, eval_every, desc=desc)
    finally:
        model.set_attn_implementation(implementation)
    return model.eval()


def ship_checkpoint(model, processor, work: Path, out: Path, record: dict) -> None:
    """Save a trained model as shipped: fp16 weights (``config.dtype`` stays float32, so it loads as fp32),
    its processor, the training logs of ``work`` and ``record`` as ``training.json``."""
    import json
    import shutil

    model.half().save_pretrained(out)
    model.float()
    processor.save_pretrained(out)
    if (work / "tower" / "log.jsonl").exists():
        shutil.copy(work / "tower" / "log.jsonl", out / "training_log_tower.jsonl")
    shutil.copy(work / "llava" / "log.jsonl", out / "training_log.jsonl")
    (out / "training.json").write_text(json.dumps(record, indent=2))


def reduction_context(model, spec: str | None):
    """``'pdrop:layers=8/16,keep=0.72'`` (``experiments/train_tiny.py --with-reduction``) -> a zero-argument
    callable giving ``ablate(model, "pdrop", layers=[8, 16], keep=0.72)``, for :func:`train_llava`'s ``context``."""
    if not spec:
        return None
    from analysis import ablate

    op, _, rest = spec.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        kwargs[key] = [int(v) for v in value.split("/")] if key == "layers" else (
            int(value) if key == "start_layer" else float(value) if key == "keep" else value)
    return lambda: ablate(model, op, **kwargs)


def initial_model(init_from: str | None, tower_work: Path, tower_steps: int, tower_batch: int, tower_lr: float,
                  seed: int):
    """(model, processor) stage B starts from: the checkpoint ``init_from``, or a fresh tiny LLaVA whose tower
    stage A trains first."""
    if init_from:
        from analysis.training.evaluate import load_checkpoint

        return load_checkpoint(init_from)
    from analysis.training.model import default_config, default_processor

    config, processor = default_config(), default_processor()
    tower = train_tower(config, processor, tower_work, tower_steps, tower_batch, tower_lr, seed)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    return model, processor
