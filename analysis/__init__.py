"""Computation redundancy of vision tokens in LLaVA-style models, and ProxyV.

Public API (imported lazily, so that torch-free modules such as ``analysis.report`` stay light):
    ablate(model, op, layers=...)  -- scoped, exact removal of computations on vision tokens (or token reduction)
    Variant, resolve_variant       -- what a run changes, resolved once (analysis.variant)
    OPERATORS, get_operator        -- the operator registry
    compute_layout                 -- where the vision tokens of a batch are (LLaVA; Qwen-VL via analysis.layout_qwen)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ablate": "analysis.ablation",
    "resolve_layers": "analysis.layers",
    "compute_layout": "analysis.layout",
    "BatchLayout": "analysis.layout",
    "QwenBatchLayout": "analysis.layout_qwen",
    "compute_qwen_layout": "analysis.layout_qwen",
    "OPERATORS": "analysis.ops",
    "Operator": "analysis.ops",
    "get_operator": "analysis.ops",
    "register_operator": "analysis.ops",
    "Variant": "analysis.variant",
    "resolve_variant": "analysis.variant",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
