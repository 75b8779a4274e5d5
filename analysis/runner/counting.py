"""The FLOPs a run records: :func:`analysis.flops.mean_flops` for LLaVA models; for Qwen-VL models the same
figures with the vision tower counted on each prompt's recorded ``vision_grids``.

``mean_flops`` builds each sample's :class:`~analysis.flops.PrefillTokens` from the recorded mask and crops only;
a Qwen-VL tower runs on patch grids (``image_grid_thw`` / ``video_grid_thw`` rows), which the plugin records per
prompt (``vision_grids``), so the Qwen-VL path passes them on. Both count with the model's own config (the
loaded checkpoint's ``config.json``), each sample as its own unpadded batch-1 prefill (``lm_head="last"``).
Token reduction on a ProxyV Qwen-VL model: a prompt's ``kept_vision`` (the vision tokens its execution kept at
ProxyV's start) says which blocks keep a cell, so their proxies are counted as executed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from ..variant import Variant


def is_qwen_config(config) -> bool:
    from ..models import QWEN_VL_CLASSES

    return getattr(config, "model_type", None) in QWEN_VL_CLASSES


def run_flops(model_config, prompts: Iterable[Mapping], variant: Variant) -> dict:
    """The ``flops`` field of a record: mean per evaluated sample (see :func:`analysis.flops.mean_flops`)."""
    from ..flops import mean_flops

    if not is_qwen_config(model_config):
        return mean_flops(model_config, prompts, variant)
    return qwen_mean_flops(model_config, prompts, variant)


def qwen_mean_flops(model_config, prompts: Iterable[Mapping], variant: Variant) -> dict:
    """:func:`analysis.flops.mean_flops` for a Qwen-VL model: the same keys, with ``vision`` = tower + merger
    (+ DeepStack mergers) on every recorded grid; ``vision_parts`` adds the mean of each part."""
    import torch

    from ..flops import PrefillTokens, count_flops
    from ..flops.per_sample import PER, kept_option, recorded_kept

    prompts = list(prompts)
    if not prompts:
        return {}
    missing = [i for i, p in enumerate(prompts) if "vision_grids" not in p]
    if missing:
        raise ValueError(f"{len(missing)} Qwen-VL prompt record(s) lack vision_grids (recorded by the plugin)")
    totals: Counter = Counter()
    parts: Counter = Counter()
    groups = Counter((p["mask"], tuple(tuple(s) for s in p["crop_shapes"]), tuple(tuple(g) for g in p["vision_grids"]),
                      recorded_kept(p)) for p in prompts)
    for (mask, crops, grids, kept), n in groups.items():
        vision = torch.tensor([[c == "v" for c in mask]])
        tokens = PrefillTokens(vision, torch.ones_like(vision), (crops,), grids)
        report = count_flops(model_config, tokens, variant, lm_head="last", **kept_option(model_config, kept))
        totals.update({"total": n * report.total, "baseline": n * report.baseline,
                       "theoretical": n * report.theoretical, "theoretical_baseline": n * report.theoretical_baseline,
                       "lm_head": n * report.lm_head, "vision": n * (report.vision or 0)})
        parts.update({k: n * v for k, v in (report.vision_parts or {}).items()})
    count = len(prompts)
    flops = {k: v / count for k, v in totals.items()}
    flops["reduction"] = (flops["baseline"] - flops["total"]) / flops["baseline"]
    flops["theoretical_reduction"] = (flops["theoretical_baseline"] - flops["theoretical"]) / flops["theoretical_baseline"]
    flops["vision_parts"] = {k: v / count for k, v in parts.items()}
    flops["per"] = PER
    return flops
