"""Training-step check at a real model's shape (``experiments/gpu_train_check.py``): a random-weight model built
from a shipped config (``analysis/configs/<name>.json``), trained a few steps through the same
:class:`~analysis.training.run.ContextTrainer` / ``TrainingArguments`` path as ``experiments/train.py`` (bf16
autocast, gradient checkpointing, optionally DeepSpeed), first as the baseline, then with ProxyV applied to the same
weights. Reports per variant: median step time (after warm-up), tokens/s and peak GPU memory.

Synthetic batches: every sample is [text prefix, the image's vision tokens, text], the answer tokens labelled.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# --tiny: the same classes and token counts, narrow enough for a CPU smoke test
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                 num_key_value_heads=2)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def build_config(name: str, tiny: bool = False, layers: int | None = None):
    from transformers import AutoConfig

    path = Path(name) if name.endswith(".json") else CONFIGS / f"{name}.json"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.json")))
        raise FileNotFoundError(f"no config {path}; one of: {known}, or a config.json path")
    raw = json.loads(path.read_text())
    if tiny:
        raw["text_config"].update(TINY_TEXT)
        raw["vision_config"].update(TINY_VISION)
    if layers:
        raw["text_config"]["num_hidden_layers"] = layers
    model_type = raw.pop("model_type")
    return AutoConfig.for_model(model_type, **raw)


NEXT_GRID = 2  # LLaVA-NeXT: a square image of 2 x 2 crops (672 px at 336): base + 4 crops, the paper's shape


def vision_tokens(config) -> int:
    """Image tokens per sample: the patches of one crop (CLS dropped); for LLaVA-NeXT, a square image of
    NEXT_GRID x NEXT_GRID crops, which AnyRes does not unpad: base + (g*side) rows of (g*side + 1 newline)."""
    v = config.vision_config
    side = v.image_size // v.patch_size
    if config.model_type == "llava_next":
        return side * side + NEXT_GRID * side * (NEXT_GRID * side + 1)
    return side * side


class SyntheticBatches(torch.utils.data.Dataset):
    """``n`` identical-length samples: ``prefix`` text ids, the image tokens, ``text`` ids of which the last
    ``answer`` are labelled; random pixels (seeded per item)."""

    def __init__(self, config, n: int, prefix: int = 8, text: int = 96, answer: int = 32):
        self.config, self.n, self.prefix, self.text, self.answer = config, n, prefix, text, answer

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        vocab = self.config.text_config.vocab_size
        image = torch.full((vision_tokens(self.config),), self.config.image_token_id)
        ids = torch.cat([torch.randint(5, 32000, (self.prefix,), generator=g), image,
                         torch.randint(5, min(vocab, 32000), (self.text,), generator=g)])
        labels = torch.full_like(ids, -100)
        labels[-self.answer:] = ids[-self.answer:]
        v = self.config.vision_config
        item = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        if self.config.model_type == "llava_next":  # base crop + the grid's crops, and the image's size
            item["pixel_values"] = torch.randn(1 + NEXT_GRID**2, 3, v.image_size, v.image_size, generator=g)
            item["image_sizes"] = torch.tensor([NEXT_GRID * v.image_size] * 2)
        else:
            item["pixel_values"] = torch.randn(3, v.image_size, v.image_size, generator=g)
        return item


def _collate(items: list[dict]) -> dict:
    return {k: torch.stack([item[k] for item in items]) for k in items[0]}


class StepTimer:
    """A TrainerCallback recording each optimizer step's wall time (device synchronised)."""

    def __init__(self):
        self.times: list[float] = []
        self._t0 = 0.0

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._t0)

    def __getattr__(self, name):  # every other TrainerCallback event: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def run_variant(model, config, lrs: dict, opts, out: Path, label: str) -> dict:
    """Train ``model`` ``opts.warmup + opts.steps`` steps; the timing and memory of the last ``opts.steps``."""
    from transformers import TrainingArguments

    from .run import ContextTrainer

    steps = opts.warmup + opts.steps
    args = TrainingArguments(
        output_dir=str(out / label), max_steps=steps, per_device_train_batch_size=opts.batch,
        learning_rate=max(v for v in lrs.values() if v is not None), warmup_steps=0, bf16=opts.bf16,
        tf32=True if torch.cuda.is_available() else None, gradient_checkpointing=opts.gradient_checkpointing,
        deepspeed=opts.deepspeed, logging_steps=1, save_strategy="no", report_to="none",
        remove_unused_columns=False, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
    data = SyntheticBatches(config, opts.batch * steps, text=opts.text)
    timer = StepTimer()
    trainer = ContextTrainer(model=model, args=args, train_dataset=data, lrs=lrs, data_collator=_collate,
                             callbacks=[timer])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = timer.times[opts.warmup:]
    median = statistics.median(timed)
    tokens = opts.batch * len(data[0]["input_ids"])
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result = {"variant": label, "steps_timed": len(timed), "step_s_median": median, "step_s_min": min(timed),
              "step_s_max": max(timed), "tokens_per_step": tokens, "tokens_per_s": tokens / median,
              "losses": losses, "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if torch.cuda.is_available():
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    model.zero_grad(set_to_none=True)  # the next variant starts with no gradients or optimizer state held
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def check(opts) -> dict:
    """Baseline, then ProxyV on the same weights; returns both results and their step-time ratio."""
    from ..models import generation_class
    from ..proxyv import apply_proxyv

    config = build_config(opts.config, tiny=opts.tiny, layers=opts.layers)
    config.text_config._attn_implementation = config.vision_config._attn_implementation = "sdpa"
    n_layers = config.text_config.num_hidden_layers
    if not 0 <= opts.start_layer < n_layers:
        raise ValueError(f"--start-layer {opts.start_layer} is out of range: the model has {n_layers} decoder layers")
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = generation_class(config.model_type, opts.config)._from_config(config, dtype=torch.float32)
    lrs = {"proxyv": 3e-4, "projector": 1e-3, "llm": None if opts.groups == "stage1" else 4e-5}
    out = Path(opts.out_dir)
    results = {"config": opts.config, "tiny": opts.tiny, "groups": opts.groups, "batch": opts.batch,
               "vision_tokens": vision_tokens(config), "layers": config.text_config.num_hidden_layers,
               "bf16": opts.bf16, "gradient_checkpointing": opts.gradient_checkpointing,
               "deepspeed": opts.deepspeed, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "torch": torch.__version__}
    if "baseline" in opts.variants:
        results["baseline"] = run_variant(model, config, {**lrs, "proxyv": None}, opts, out, "baseline")
    if "proxyv" in opts.variants:
        apply_proxyv(model, start_layer=opts.start_layer, reduce_factor=4, init=opts.init, seed=0)
        results["proxyv"] = run_variant(model, config, lrs, opts, out, f"proxyv-L{opts.start_layer}")
    if {"baseline", "proxyv"} <= results.keys():
        results["proxyv_over_baseline_step_time"] = (results["proxyv"]["step_s_median"]
                                                     / results["baseline"]["step_s_median"])
    return results
