"""The variant families, each registered once: methods, layer and parameter rules, execution, FLOPs, label.

A new family (token reduction, a trained variant...) is one :func:`analysis.variant.register_family`
call here, naming its execution and FLOPs by ``"module:attribute"``; its methods become options of
the runner's ``op`` config group (:mod:`analysis.sweep` stores them), its variants get labels,
records and report rows, and :func:`analysis.flops.count_flops` counts them. Nothing else changes.

Imports no torch: execution and FLOPs are imported when first used.
"""

from __future__ import annotations

from .layers import resolve_layers
from .reduction.rules import check_on_proxyv
from .variant import Family, register_family

# ----------------------------------------------------------------------------- ablation operators

def _operator_methods() -> dict[str, dict]:
    from .ops import OPERATORS

    return {name: {} for name in OPERATORS}


def _operator_layers(method, params, num_layers, start_layer, end_layer, layers):
    from .ops import get_operator

    if get_operator(method).is_identity:  # the baseline: no layers, whatever was asked
        return (), {}
    return tuple(resolve_layers(num_layers, layers, start_layer, end_layer)), {}


ABLATION = register_family(Family(
    name="ablation",
    methods=_operator_methods,
    resolve=_operator_layers,
    execute="analysis.ablation:ablate_variant",
    flops="analysis.flops.variants:operator_flops",
))


# ----------------------------------------------------------------------------- ProxyV

PROXYV_INITS = ("spatial", "learned", "none")  # = analysis.proxyv.apply.INITS (that module imports torch)


def _proxyv_methods() -> dict[str, dict]:
    # None: as the checkpoint says (the runner reads a trained checkpoint's settings from its config.json)
    return {"proxyv": {"reduce_factor": None, "init": None, "light_width": None}}


def _proxyv_layers(method, params, num_layers, start_layer, end_layer, layers):
    if layers is not None:
        chosen = sorted(set(layers))
        if not chosen or chosen != list(range(chosen[0], chosen[-1] + 1)):
            raise ValueError(f"ProxyV runs on consecutive layers from its start layer to the last one, got {chosen}")
        start, end = chosen[0], chosen[-1] + 1
    else:
        start, end = start_layer, end_layer
    if start is None:
        raise ValueError("ProxyV needs start_layer (the first ProxyV layer)")
    if end is not None and end != num_layers:
        raise ValueError(f"ProxyV runs from start_layer through the last layer; drop end_layer={end} "
                         f"(the model has {num_layers} layers)")
    chosen = tuple(resolve_layers(num_layers, None, start, None))
    reduce_factor, init, width = params.get("reduce_factor"), params.get("init"), params.get("light_width")
    for name, value, low in (("reduce_factor", reduce_factor, 1), ("light_width", width, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"ProxyV {name} must be an integer >= {low}, got {value!r}")
    if init is not None and init not in PROXYV_INITS:
        raise ValueError(f"ProxyV init must be one of {', '.join(PROXYV_INITS)}, got {init!r}")
    return chosen, {k: v for k, v in params.items() if v is not None}


PROXYV = register_family(Family(
    name="proxyv",
    methods=_proxyv_methods,
    resolve=_proxyv_layers,
    execute="analysis.proxyv.apply:proxyv_context",
    flops="analysis.flops.proxyv:proxyv_flops",
    trained=True,
    label_params=("init", "reduce_factor"),
))


# ----------------------------------------------------------------------------- token reduction

PDROP_POSITIONS = ("renumber", "original")


def _reduction_methods() -> dict[str, dict]:
    # pdrop's `layers`: its stage boundaries as a parameter (the runner's op.layers); null = the official
    # four equal stages (8, 16, 24 of 32 layers)
    # visionzip: D dominant tokens (the CLS token included) + C contextual tokens per image, before the LLM
    # proxyv: null, or the start layer of the model's trained ProxyV checkpoint (learned proxies) the reduction
    # runs on (ProxyV + token reduction; the runner loads that checkpoint, see docs/reduction.md)
    return {"fastv": {"keep": 0.5, "proxyv": None},
            "pdrop": {"keep": 0.5, "positions": "renumber", "layers": None, "proxyv": None},
            "visionzip": {"dominant": 54, "contextual": 10, "proxyv": None}}


def _on_proxyv(method: str, params, boundaries=()) -> dict:
    """``{"proxyv": L}`` when the reduction runs on a ProxyV checkpoint starting at layer L, else ``{}``."""
    start = params.get("proxyv")
    if start is None:
        return {}
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"{method}: proxyv must be the start layer of a trained ProxyV checkpoint (an integer >= 0) "
                         f"or null, got {start!r}")
    check_on_proxyv(method, start, boundaries)
    return {"proxyv": start}


def _keep(method: str, keep) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"{method}: keep must be in (0, 1] (the share of vision tokens kept), got {keep!r}")
    return float(keep)


def _reduction_layers(method, params, num_layers, start_layer, end_layer, layers):
    """FastV: ``start_layer`` K (1 <= K < depth), pruned in layers K.. (the variant's layers); PyramidDrop:
    ``layers`` = the increasing stage boundaries K_1 < K_2 < ..., each in 1..depth-1; VisionZip: no layer (it
    merges before the LLM), ``dominant`` D >= 1 (the CLS token included) and ``contextual`` C >= 0."""
    if method == "visionzip":
        return (), {**_visionzip_params(params, start_layer, end_layer, layers), **_on_proxyv(method, params)}
    keep = _keep(method, params.get("keep"))
    if method == "fastv":
        if layers is not None:
            raise ValueError("fastv prunes from start_layer=K on; give start_layer, not layers")
        if start_layer is None or isinstance(start_layer, bool) or not isinstance(start_layer, int) \
                or not 1 <= start_layer < num_layers:
            raise ValueError(f"fastv: start_layer must be in 1..{num_layers - 1} (it ranks with layer K-1's "
                             f"attention), got {start_layer!r}")
        if end_layer is not None and end_layer != num_layers:
            raise ValueError(f"fastv prunes through the last layer; drop end_layer={end_layer}")
        return tuple(range(start_layer, num_layers)), {"keep": keep, **_on_proxyv(method, params, [start_layer])}
    if start_layer is not None or end_layer is not None:
        raise ValueError("pdrop takes its stage boundaries as layers=[K1, K2, ...], not start_layer / end_layer")
    if layers is None:
        layers = params.get("layers") or [num_layers * s // 4 for s in (1, 2, 3)]
    elif params.get("layers") is not None and list(params["layers"]) != list(layers):
        raise ValueError(f"pdrop: two sets of stage boundaries given ({list(layers)} and {list(params['layers'])})")
    boundaries = list(layers)
    if not boundaries or any(isinstance(k, bool) or not isinstance(k, int) for k in boundaries):
        raise ValueError(f"pdrop: layers must be a non-empty list of layer indices (stage boundaries), got {layers!r}")
    if boundaries != sorted(set(boundaries)):
        raise ValueError(f"pdrop: the stage boundaries must be strictly increasing, got {boundaries}")
    if not all(1 <= k < num_layers for k in boundaries):
        raise ValueError(f"pdrop: every boundary must be in 1..{num_layers - 1}, got {boundaries}")
    positions = params.get("positions")
    if positions not in PDROP_POSITIONS:
        raise ValueError(f"pdrop: positions must be one of {', '.join(PDROP_POSITIONS)}, got {positions!r}")
    return tuple(boundaries), {"keep": keep, "positions": positions, **_on_proxyv(method, params, boundaries)}


def _visionzip_params(params, start_layer, end_layer, layers) -> dict:
    if start_layer is not None or end_layer is not None or layers is not None:
        raise ValueError("visionzip merges vision tokens before the LLM; it takes no layers, start_layer or end_layer")
    dominant, contextual = params.get("dominant"), params.get("contextual")
    for name, value, low in (("dominant", dominant, 1), ("contextual", contextual, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"visionzip: {name} must be an integer >= {low}, got {value!r}")
    return {"dominant": dominant, "contextual": contextual}


REDUCTION = register_family(Family(
    name="reduction",
    methods=_reduction_methods,
    resolve=_reduction_layers,
    execute="analysis.reduction:reduction_context",
    flops="analysis.flops.variants:reduction_flops",
    label_params=("keep", "positions", "dominant", "contextual", "proxyv"),
    param_layers=("pdrop", "visionzip"),
))
