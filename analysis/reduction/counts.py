"""How many vision tokens a token-reduction variant keeps: exact integer rules, torch-free.

Shared by the execution (:mod:`analysis.reduction.runtime`) and anything that models it (FLOPs), so the
two cannot disagree. ``keep`` is read as the decimal it is written as (``Fraction(str(keep))``), so the
rules are exact: ``fastv_kept(10, 0.3) == 3`` and ``pdrop_kept(100, 0.29, 1) == 29``, where float
arithmetic would give 4 (``ceil(3.0000000000000004)``) and 28 (``int(28.999999999999996)``).
"""

from __future__ import annotations

import math
from fractions import Fraction


def _exact(keep) -> Fraction:
    if isinstance(keep, bool) or not isinstance(keep, (int, float, Fraction)) or not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep!r}")
    return keep if isinstance(keep, Fraction) else Fraction(str(keep))


def fastv_kept(n_vision: int, keep) -> int:
    """FastV: ceil(keep * n_vision) of a sample's n_vision vision tokens (0 only when it has none)."""
    return math.ceil(_exact(keep) * int(n_vision))


def pdrop_kept(n_vision: int, keep, stage: int) -> int:
    """PyramidDrop: floor(n_vision * keep**stage) of the sample's ORIGINAL n_vision vision tokens stay
    after boundary ``stage`` (1-based), as the official int(N * lambda**s); it may be 0: then no
    vision token is left from that stage on (the sample's text is computed as usual)."""
    if isinstance(stage, bool) or not isinstance(stage, int) or stage < 1:
        raise ValueError(f"stage must be an int >= 1, got {stage!r}")
    return math.floor(_exact(keep) ** stage * int(n_vision))


def kept_per_stage(method: str, n_vision: int, keep, n_stages: int = 1) -> list[int]:
    """The vision tokens alive in each stage after its boundary: one entry for fastv, one per boundary for pdrop."""
    if method == "fastv":
        return [fastv_kept(n_vision, keep)]
    if method == "pdrop":
        return [pdrop_kept(n_vision, keep, s) for s in range(1, n_stages + 1)]
    raise ValueError(f"unknown reduction method {method!r}; known: fastv, pdrop")
