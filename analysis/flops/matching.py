"""Settings of a variant matched to a FLOPs target: e.g. FastV's keep ratio that saves what ProxyV saves.

    from analysis.flops.matching import match_param
    keep, saved = match_param(config, prompts, "fastv", "keep", target=0.225, start_layer=2)

``prompts`` are the per-sample prompt shapes the eval plugin records (see :func:`mean_flops`), so the
match holds for the evaluated prompts themselves, not for a nominal prompt length.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from ..variant import resolve_variant
from .per_sample import mean_flops


def saved_by(config, prompts: list[Mapping], method: str, **settings) -> float:
    """Executed decoder FLOPs saved (fraction) by ``method`` with ``settings`` (layers and parameters), mean over
    ``prompts``."""
    layer_keys = ("start_layer", "end_layer", "layers")
    variant = resolve_variant(method, config.text_config.num_hidden_layers,
                              **{k: settings[k] for k in layer_keys if k in settings},
                              params={k: v for k, v in settings.items() if k not in layer_keys})
    return mean_flops(config, prompts, variant)["reduction"]


def match_param(config, prompts: Iterable[Mapping], method: str, param: str, target: float, low: float = 0.01,
                high: float = 1.0, decimals: int = 4, **settings) -> tuple[float, float]:
    """(value, FLOPs saved): the value of ``param`` in [low, high], on a grid of ``decimals`` decimals (so the
    printed value is the one that was counted), whose saving is closest to ``target``, by bisection (saving
    decreases as e.g. ``keep`` grows); ``settings`` fix everything else."""
    prompts = list(prompts)
    scale = 10 ** decimals

    def saving(i: int) -> float:
        return saved_by(config, prompts, method, **settings, **{param: i / scale})

    lo, hi = math.ceil(low * scale), math.floor(high * scale)
    if not saving(hi) <= target <= saving(lo):
        raise ValueError(f"{method}: no {param} in [{low}, {high}] saves {target:.1%} "
                         f"(it saves {saving(hi):.1%} .. {saving(lo):.1%})")
    while hi - lo > 1:  # saving(lo) >= target >= saving(hi)
        mid = (lo + hi) // 2
        if saving(mid) > target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda i: abs(saving(i) - target))
    return best / scale, saving(best)
