"""FLOPs of an evaluation: the mean over its samples, each counted as its own unpadded batch-1 prefill."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

import torch

from ..variant import Variant
from .report import count_flops
from .tokens import PrefillTokens

PER = "LM decoder prefill FLOPs, mean per evaluated sample (unpadded, batch 1)"


def recorded_kept(prompt: Mapping):
    """A prompt record's ``kept_vision`` as a hashable tuple (the vision tokens a token reduction on a ProxyV model
    kept at its start), None where it has none."""
    return tuple(prompt["kept_vision"]) if "kept_vision" in prompt else None


def kept_option(model_config, kept) -> dict:
    """``count_flops``' ``kept=`` for one prompt's recorded kept tokens: only on a ProxyV model (a plain config has
    no crops or blocks to keep), else nothing."""
    return {"kept": [list(kept)]} if kept is not None and getattr(model_config, "proxyv", None) else {}


def mean_flops(model_config, prompts: Iterable[Mapping], variant: Variant) -> dict:
    """Decoder prefill FLOPs of ``variant`` and of the baseline, mean per evaluated sample.

    ``prompts``: one dict per evaluated sample, as the eval plugin records them: ``mask`` (a "v"/"t"
    string, one letter per prompt token: vision or text, as the variant computes them),
    ``crop_shapes`` (the (rows, cols) grid of each crop) and, where the family needs them, its
    recorded shapes under ``"<family>_shapes"`` (ProxyV: ``proxyv_shapes``, passed to its FLOPs as
    ``shapes=``; ``None``: derived from the mask), and for token reduction on a ProxyV model ``kept_vision`` (the
    vision tokens its execution kept at ProxyV's start: which crops keep a cell, passed as ``kept=``). Qwen-VL
    prompts add ``vision_grids`` (the (t, h, w) patch grid of each image / video the tower runs on): then
    ``vision`` counts the tower and mergers on them and ``vision_parts`` gives the mean of each part.

    Each sample counts as its own unpadded batch-1 prefill (``lm_head="last"``, as ``generate()``), so
    the figures do not depend on the evaluation batch size. See :mod:`analysis.flops` for conventions.
    Returns {} without prompts, else the means ``total``, ``baseline``, ``theoretical``,
    ``theoretical_baseline``, ``lm_head``, ``vision``, the ``reduction`` and ``theoretical_reduction``
    of those means, and ``per`` (what the figures are).
    """
    prompts = list(prompts)
    if not prompts:
        return {}
    shapes_key = f"{variant.family}_shapes"
    totals: Counter = Counter()
    parts: Counter = Counter()
    # recorded shapes are frozen dataclasses of tuples: hashable, so samples of one shape still count once
    groups = Counter((p["mask"], tuple(tuple(shape) for shape in p["crop_shapes"]),
                      tuple(tuple(grid) for grid in p.get("vision_grids", ())), p.get(shapes_key),
                      recorded_kept(p)) for p in prompts)
    for (mask, crops, grids, shapes, kept), n in groups.items():
        vision = torch.tensor([[c == "v" for c in mask]])
        tokens = PrefillTokens(vision, torch.ones_like(vision), (crops,), grids)
        extra = {**({} if shapes is None else {"shapes": shapes}), **kept_option(model_config, kept)}
        report = count_flops(model_config, tokens, variant, lm_head="last", **extra)
        totals.update({"total": n * report.total, "baseline": n * report.baseline,
                       "theoretical": n * report.theoretical, "theoretical_baseline": n * report.theoretical_baseline,
                       "lm_head": n * report.lm_head, "vision": n * (report.vision or 0)})
        parts.update({k: n * v for k, v in (report.vision_parts or {}).items()})
    count = len(prompts)
    flops = {k: v / count for k, v in totals.items()}
    flops["reduction"] = (flops["baseline"] - flops["total"]) / flops["baseline"]
    flops["theoretical_reduction"] = (flops["theoretical_baseline"] - flops["theoretical"]) / flops["theoretical_baseline"]
    if any("vision_grids" in p for p in prompts):
        flops["vision_parts"] = {k: v / count for k, v in parts.items()}
    flops["per"] = PER
    return flops
