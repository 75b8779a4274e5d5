"""Greedy answers of a LLaVA model on the twins' eval splits, scored by the twins' lmms-eval metrics.

A direct evaluation for training and for checking the shipped checkpoint in tests; the runner
scores through lmms-eval itself. ``blind=True`` replaces every image with a blank one.
"""

from __future__ import annotations

import contextlib

import torch

from analysis import twins
from analysis.training.data import prompt_text


@torch.no_grad()
def answer(model, processor, samples: list[dict], blind: bool = False, batch_size: int = 32,
           max_new_tokens: int = 8, context=contextlib.nullcontext) -> list[str]:
    """Greedy predictions (special tokens removed, stripped) for ``samples`` (dicts with image, question)."""
    predictions = []
    processor.tokenizer.padding_side = "left"
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        images = [twins.blank_image(s["image"]) if blind else s["image"] for s in chunk]
        batch = processor(images=images, text=[prompt_text(processor, s["question"]) for s in chunk],
                          return_tensors="pt", padding=True)
        with context():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=processor.tokenizer.pad_token_id)
        predictions += [p.strip() for p in processor.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                                                   skip_special_tokens=True)]
    return predictions


def score_twins(model, processor, n: int = 200, seed: int = twins.EVAL_SEED, blind: bool = False,
             names=None, **kwargs) -> dict[str, float]:
    """Score per twin (0..1) on the first ``n`` eval samples, plus their mean under ``"mean"``."""
    scores = {}
    for name in names or sorted(twins.TWINS):
        samples = twins.generate(name, "eval", n, seed)
        scores[name] = twins.score(name, answer(model, processor, samples, blind=blind, **kwargs), samples)
    scores["mean"] = sum(scores.values()) / len(scores)
    return scores


def load_checkpoint(path, dtype=torch.float32):
    """(model, processor) of a saved LLaVA checkpoint, offline, in eval mode, in ``dtype``.

    Raises FileNotFoundError naming the missing path and how to make it.
    """
    from pathlib import Path

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no checkpoint at {path} (config.json missing); the tiny default ships in the repository under "
            "checkpoints/tiny-llava, and `python experiments/train_tiny.py --out PATH` re-trains it"
        )
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
    return model, AutoProcessor.from_pretrained(path)
