"""From what a caller names to the layer-FLOPs variant that counts it, through the family registry.

A variant is one :class:`analysis.variant.Variant`; its family (:mod:`analysis.families`) names the
callable that makes its layer-FLOPs variant (``flops="module:attribute"``, imported on first use):
:func:`operator_flops` here for the operators of :mod:`analysis.ops`, ProxyV's
:func:`analysis.flops.proxyv.proxyv_flops`. A new family is counted once it registers; nothing here
changes. :func:`make_variant` also takes an op name with ``layers`` / ``start_layer`` /
``end_layer`` and options (what the CLI and older callers pass), resolved by
:func:`analysis.variant.resolve_variant`.
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
