"""How many vision tokens a token-reduction variant keeps: the integer rules, torch-free.

Shared by the execution (:mod:`analysis.reduction.runtime`) and anything that models it (FLOPs), so the
two cannot disagree. Computed in Python floats exactly as written below, as the official PyramidDrop
code does (``int(N * lambda ** s)``): e.g. ``pdrop_kept(2880, 0.7, 1) == 2015`` because
``2880 * 0.7 == 2015.9999999999998``.
"""

from __future__ import annotations

import math


def _keep(keep) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep!r}")
    return float(keep)


def fastv_kept(n_vision: int, keep) -> int:
    """FastV: ``math.ceil(keep * n_vision)`` of a sample's n_vision vision tokens (0 only when it has none)."""
    return math.ceil(_keep(keep) * int(n_vision))


def pdrop_kept(n_vision: int, keep, stage: int) -> int:
    """PyramidDrop: ``math.floor(n_vision * keep ** stage)`` of the sample's ORIGINAL n_vision vision tokens
    stay after boundary ``stage`` (1-based), as the official ``int(N * lambda ** s)``. It may be 0: then no
    vision token is left from that stage on (the sample's text rows run as usual)."""
    if isinstance(stage, bool) or not isinstance(stage, int) or stage < 1:
        raise ValueError(f"stage must be an int >= 1, got {stage!r}")
    return math.floor(int(n_vision) * _keep(keep) ** stage)


def kept_per_stage(method: str, n_vision: int, keep, n_stages: int = 1) -> list[int]:
    """The vision tokens alive after each boundary: one entry for fastv, one per boundary for pdrop."""
    if method == "fastv":
        return [fastv_kept(n_vision, keep)]
    if method == "pdrop":
        return [pdrop_kept(n_vision, keep, s) for s in range(1, n_stages + 1)]
    raise ValueError(f"unknown reduction method {method!r}; known: fastv, pdrop")
