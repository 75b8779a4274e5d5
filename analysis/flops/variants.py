"""From what a caller names to the layer-FLOPs variant that counts it, through the family registry.

A variant is one :class:`analysis.variant.Variant`; its family (:mod:`analysis.families`) names the
callable that makes its layer-FLOPs variant (``flops="module:attribute"``, imported on first use):
:func:`operator_flops` here for the operators of :mod:`analysis.ops`, ProxyV's
:func:`analysis.flops.proxyv.proxyv_flops`, and :func:`reduction_flops` here for token reduction, which picks
among the counters of :mod:`.reduction`, :mod:`.visionzip` and :mod:`.proxyv_reduction` (so that those import
only downwards: the ProxyV-hosting counters extend the plain ones). A new family is counted once it registers;
nothing here changes. :func:`make_variant` also takes an op name with ``layers`` / ``start_layer`` / ``end_layer``
and options (what the CLI and older callers pass), resolved by :func:`analysis.variant.resolve_variant`.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..layers import resolve_layers
from ..ops import Operator, get_operator
from ..variant import Variant, family, family_of, methods, resolve_variant
from .decoder import OperatorVariant, VariantFlops


def operator_flops(variant: Variant, **extra) -> OperatorVariant:
    """The layer-FLOPs variant of an ``ablation`` variant: its operator at its layers."""
    if extra:
        raise ValueError(f"op {variant.method!r} takes no options, got {sorted(extra)}")
    return OperatorVariant(get_operator(variant.method), tuple(variant.layers))


def reduction_flops(variant: Variant, proxyv_settings: dict | None = None, **extra) -> VariantFlops:
    """The layer-FLOPs variant of a ``reduction`` :class:`~analysis.variant.Variant` (the family registry's
    ``flops``): FastV pruned in its layers K..L-1, PyramidDrop with its layers as stage boundaries, VisionZip by
    :func:`analysis.flops.visionzip.visionzip_flops` (``extra``: its ``config``; no other family extra).

    ``proxyv_settings``: the ProxyV settings of the model it runs on (``config.proxyv`` of a ProxyV checkpoint; what
    :func:`analysis.flops.count_flops` passes for such a config): counted by
    :class:`analysis.flops.proxyv_reduction.ProxyVReductionFlops` (VisionZip: ``VisionZipProxyVFlops``)."""
    if variant.family != "reduction":
        raise ValueError(f"reduction_flops counts token reduction; {variant.label!r} is of the {variant.family!r} "
                         "family: count it with flops_of(variant) or count_flops")
    named = variant.options.get("proxyv")
    proxyv = proxyv_settings
    if named is not None and proxyv is None:
        raise ValueError(f"{variant.label} runs on a ProxyV checkpoint: count it with that checkpoint's config "
                         "(count_flops(checkpoint.config, ...)) or pass proxyv_settings=<its config.proxyv>")
    if proxyv is not None and named is not None and proxyv.get("start_layer") != named:
        raise ValueError(f"{variant.label}: the ProxyV settings given start at layer {proxyv.get('start_layer')}")
    if variant.method == "visionzip":  # before the LLM: the tower's extras and a shortened prefill
        from .visionzip import visionzip_flops

        counted = visionzip_flops(variant, **extra)
        if proxyv is None:
            return counted
        from .proxyv_reduction import VisionZipProxyVFlops

        return VisionZipProxyVFlops(counted.dominant, counted.contextual, proxyv, counted.config)
    from .reduction import ReductionFlops

    kept = extra.pop("kept", None)  # an execution's kept vision tokens: which blocks keep a cell (Qwen-VL ProxyV)
    if extra:
        raise ValueError(f"op {variant.method!r} takes no options, got {sorted(extra)}")
    if proxyv is not None:
        from .proxyv_reduction import ProxyVReductionFlops

        return ProxyVReductionFlops(variant.method, variant.layers, variant.options["keep"], proxyv, kept=kept)
    if kept is not None:
        raise ValueError(f"{variant.label}: kept= (an execution's kept vision tokens) is read on a ProxyV model only")
    return ReductionFlops(variant.method, variant.layers, variant.options["keep"])


def flops_of(variant: Variant, **extra) -> VariantFlops:
    """The layer-FLOPs variant of ``variant``, made by its family (``extra``: e.g. ProxyV's ``shapes``)."""
    return family(variant.family).load("flops")(variant, **extra)


def known_variants() -> list[str]:
    """Every countable op / method name (those of every registered family)."""
    return sorted(methods())


def make_variant(what: str | Operator | Variant | VariantFlops, num_layers: int, layers: Iterable[int] | None = None,
                 *, start_layer: int | None = None, end_layer: int | None = None, **options) -> VariantFlops:
    """The layer-FLOPs variant of ``what`` on a decoder of ``num_layers`` layers.

    ``what``: a :class:`~analysis.variant.Variant` (``options`` are then the extras its family's FLOPs
    take, e.g. ProxyV's ``shapes``; it carries its layers), an op / method name or an
    :class:`~analysis.ops.Operator` (with ``layers`` or ``start_layer`` / ``end_layer``, end exclusive,
    default every layer, and ``options``: the method's parameters, anything else is passed on as an
    extra), or a layer-FLOPs variant (returned as is).
    """
    if hasattr(what, "layer_flops"):
        return what
    if isinstance(what, Variant):
        if layers is not None or start_layer is not None or end_layer is not None:
            raise ValueError(f"variant {what.label!r} carries its layers; drop layers=/start_layer=/end_layer=")
        bad = [i for i in what.layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"variant {what.label!r}: layer(s) {bad} out of range: the model has {num_layers} "
                             f"decoder layers (valid 0..{num_layers - 1})")
        return flops_of(what, **options)
    if isinstance(what, Operator):
        if what.name not in methods():  # an operator that is not registered: counted from itself
            if options:
                raise ValueError(f"op {what.name!r} takes no options, got {sorted(options)}")
            return OperatorVariant(what, tuple(resolve_layers(num_layers, layers, start_layer, end_layer)))
        what = what.name
    # the layer selection is checked as ablate() checks it, whatever the method (the baseline too)
    resolve_layers(num_layers, None if layers is None else list(layers), start_layer, end_layer)
    declared = family_of(what).methods()[what]
    params = {k: v for k, v in options.items() if k in declared}
    extra = {k: v for k, v in options.items() if k not in declared}
    variant = resolve_variant(what, num_layers, start_layer=start_layer, end_layer=end_layer,
                              layers=None if layers is None else list(layers), params=params)
    return flops_of(variant, **extra)
