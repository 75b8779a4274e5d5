"""Greedy answers of a LLaVA model on the twins' eval splits, scored by the twins' lmms-eval metrics.

A direct evaluation for training and for checking the shipped checkpoint in tests; the runner
scores through lmms-eval itself. ``blind=True`` replaces every image with a blank one.
"""

from __future__ import annotations

import contextlib

import torch

from analysis import twins


def prompt_text(processor, question: str) -> str:
    """The conversation prompt the evaluation uses (chat template, generation prompt)."""
    return processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True,
    )


@torch.no_grad()
def answer(model, processor, samples: list[dict], blind: bool = False, batch_size: int = 32,
           max_new_tokens: int = 8, context=contextlib.nullcontext, prepare=None) -> list[str]:
    """Greedy predictions (special tokens removed, stripped) for ``samples`` (dicts with image, question).
    ``prepare(batch, samples)``, if given, edits each processor batch before ``generate`` (e.g. the tiny
    LLaVA-NeXT's base-crop-only evaluation, :func:`analysis.tiny_next.base_only`)."""
    predictions = []
    processor.tokenizer.padding_side = "left"
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        images = [twins.blank_image(s["image"]) if blind else s["image"] for s in chunk]
        batch = processor(images=images, text=[prompt_text(processor, s["question"]) for s in chunk],
                          return_tensors="pt", padding=True).to(model.device)  # a GPU-trained model stays there
        if prepare is not None:
            batch = prepare(batch, chunk)
        with context():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=processor.tokenizer.pad_token_id)
        predictions += [p.strip() for p in processor.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                                                   skip_special_tokens=True)]
    return predictions


def score_twins(model, processor, n: int = 200, seed: int = twins.EVAL_SEED, blind: bool = False,
             names=None, **kwargs) -> dict[str, float]:
    """Score per twin (0..1) on the first ``n`` eval samples (each twin's own image size), plus their mean
    under ``"mean"``; ``names``: the twins (default the four 64 px ones, ``twins.TWINS``)."""
    scores = {}
    for name in names or sorted(twins.TWINS):
        samples = twins.generate(name, "eval", n, seed)
        scores[name] = twins.score(name, answer(model, processor, samples, blind=blind, **kwargs), samples)
    scores["mean"] = sum(scores.values()) / len(scores)
    return scores


def load_checkpoint(path, dtype=torch.float32):
    """(model, processor) of a saved LLaVA / LLaVA-NeXT checkpoint (a ProxyV one through ``load_proxyv``),
    offline, in eval mode, in ``dtype``. Raises FileNotFoundError naming the missing path and how to make it."""
    from pathlib import Path

    from transformers import AutoConfig, AutoProcessor

    from analysis.models import generation_class

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no checkpoint at {path} (config.json missing); the tiny models ship in the repository under "
            "checkpoints/ (tiny-llava and its fine-tunes); docs/training.md says how each is trained"
        )
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "proxyv", None) is not None:
        from analysis.proxyv import load_proxyv

        model = load_proxyv(path, dtype=dtype).eval()
    else:
        model = generation_class(config.model_type, str(path)).from_pretrained(path, dtype=dtype).eval()
    return model, AutoProcessor.from_pretrained(path)


def trained_context(model, record: dict):
    """The context a checkpoint trained by ``experiments/train.py`` runs in, from its ``training.json``: the
    ablation op it was fine-tuned under, or its token reduction (a zero-argument callable), else a null one."""
    config = record.get("config") or {}
    variant, reduction = config.get("variant"), config.get("reduction")
    if variant not in (None, "proxyv", "none"):
        from analysis.ablation import ablate

        return lambda: ablate(model, variant, start_layer=int(config["start_layer"]))
    if reduction:
        from analysis.ablation import ablate

        params = {k: v for k, v in reduction.items() if k != "method"}
        return lambda: ablate(model, reduction["method"], **params)
    return contextlib.nullcontext
