"""The FLOPs a run records: :func:`analysis.flops.mean_flops` for LLaVA models; for Qwen-VL models the same
figures with the vision tower counted on each prompt's recorded ``vision_grids``.

A Qwen-VL tower runs on patch grids (``image_grid_thw`` / ``video_grid_thw`` rows), which the plugin records per
prompt (``vision_grids``) and ``mean_flops`` passes on; the Qwen-VL path insists that every prompt has them. Both
count with the model's own config (the loaded checkpoint's ``config.json``), each sample as its own unpadded
batch-1 prefill (``lm_head="last"``).
Token reduction on a ProxyV Qwen-VL model: a prompt's ``kept_vision`` (the vision tokens its execution kept at
ProxyV's start) says which blocks keep a cell, so their proxies are counted as executed.
"""

from __future__ import annotations

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
    """:func:`analysis.flops.mean_flops` for a Qwen-VL model, whose every prompt must carry its ``vision_grids``:
    the same keys, with ``vision`` = tower + merger (+ DeepStack mergers) and ``vision_parts``."""
    from ..flops import mean_flops

    prompts = list(prompts)
    missing = [i for i, p in enumerate(prompts) if "vision_grids" not in p]
    if missing:
        raise ValueError(f"{len(missing)} Qwen-VL prompt record(s) lack vision_grids (recorded by the plugin)")
    return mean_flops(model_config, prompts, variant)
