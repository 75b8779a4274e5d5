"""What a run changes: one frozen :class:`Variant`, resolved once, read by everything else.

    from analysis.variant import resolve_variant
    v = resolve_variant("skip_ffn", num_layers=32, start_layer=16)
    v.label        # 'skip_ffn L16–32'
    v.layer_text   # '16–32'  (the canonical [start, end) text; '–' for the baseline)

Execution (:func:`analysis.ablation.ablate`, a ProxyV checkpoint), FLOPs (:mod:`analysis.flops`),
the runner, the records and the report read this value and nothing else about what a run changes.

A *family* is a kind of variant with one way to execute it and one way to count it: ``ablation``
(the operators of :mod:`analysis.ops`), ``proxyv`` (a trained ProxyV checkpoint). A family
registers once, in :mod:`analysis.families`, with everything a variant needs: its methods and their
default parameters (which become the runner's ``op`` config group), how layers and parameters are
resolved and checked, how it executes, how its FLOPs are counted, and how it is labelled.

This module imports no torch (the report and the results read it); the execution and FLOPs of a
family are named as ``"module:attribute"`` and imported only when used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

DASH = "–"  # en dash: the one separator of a layer range, [start, end)


def layer_text(layers: Iterable[int]) -> str:
    """The canonical text of a layer selection: ``'16–32'`` for range(16, 32), ``'0,2,5'`` otherwise, '–' for none."""
    layers = sorted(layers)
    if not layers:
        return DASH
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}{DASH}{layers[-1] + 1}"
    return ",".join(map(str, layers))


@dataclass(frozen=True)
class Variant:
    """What a run changes, resolved and validated (see :func:`resolve_variant`).

    ``family`` and ``method`` (an operator or method name; ``"none"`` is the baseline), the decoder
    ``layers`` it applies to (sorted), its ``params`` (sorted (name, value) pairs: hashable), ``blind``
    (every image replaced by a blank one) and ``checkpoint`` (the weights a trained variant runs).
    """

    family: str
    method: str
    layers: tuple[int, ...] = ()
    params: tuple[tuple[str, Any], ...] = ()
    blind: bool = False
    checkpoint: str | None = None

    @property
    def is_baseline(self) -> bool:
        return self.method == "none"

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def start_layer(self) -> int | None:
        return self.layers[0] if self.layers else None

    @property
    def end_layer(self) -> int | None:
        """Exclusive end of the layer selection (the last layer + 1)."""
        return self.layers[-1] + 1 if self.layers else None

    @property
    def layer_text(self) -> str:
        return layer_text(self.layers)

    @property
    def label(self) -> str:
        """One readable name, the same in logs, records, tables and figures: ``'skip_ffn L16–32'``,
        ``'proxyv L16–32 (init=spatial, reduce_factor=4)'``, ``'none (blind)'``; a variant of an untrained family
        run on a checkpoint names it: ``'fastv L2–32 (keep=0.5, proxyv=16) on tiny-llava-proxyv-L16-learned'``."""
        text = self.method + (f" L{self.layer_text}" if self.layers else "")
        fam = family(self.family)
        shown = [f"{k}={v}" for k, v in self.params if k in fam.label_params]
        if shown:
            text += f" ({', '.join(shown)})"
        if self.checkpoint and not fam.trained:  # e.g. token reduction on a ProxyV checkpoint: which weights
            text += f" on {str(self.checkpoint).rstrip('/').rsplit('/', 1)[-1]}"
        return text + (" (blind)" if self.blind else "")

    def with_blind(self, blind: bool) -> Variant:
        return Variant(self.family, self.method, self.layers, self.params, bool(blind), self.checkpoint)

    def to_record(self) -> dict:
        """The ``variant`` field of a result record (JSON-ready)."""
        return {"family": self.family, "method": self.method, "layers": list(self.layers),
                "params": dict(self.params), "blind": self.blind, "checkpoint": self.checkpoint,
                "label": self.label, "layer_text": self.layer_text,
                "start_layer": self.start_layer, "end_layer": self.end_layer}

    @classmethod
    def from_record(cls, data: Mapping) -> Variant:
        return cls(data["family"], data["method"], tuple(data.get("layers") or ()),
                   _params(data.get("params") or {}), bool(data.get("blind")), data.get("checkpoint"))

    def __str__(self) -> str:
        return self.label


def _params(params: Mapping) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((str(k), v) for k, v in params.items()))


def baseline(blind: bool = False) -> Variant:
    """The baseline: nothing removed (``blind``: on blank images)."""
    return Variant("ablation", "none", blind=bool(blind))


# ----------------------------------------------------------------------------- families

@dataclass(frozen=True)
class Family:
    """A kind of variant, registered once with everything that reads it.

    Args:
        name: the family's name (``variant.family``).
        methods: () -> {method: default params}; each method is an option of the ``op`` config group.
        resolve: (method, params, num_layers, start_layer, end_layer, layers) -> (layers, params), the
            validated layer indices and parameters; raises ValueError / TypeError naming the fix.
        execute: ``"module:attribute"`` of ``(model, variant, **options) -> context manager`` in
            which ``model`` computes the variant.
        flops: ``"module:attribute"`` of ``(variant, **extra) -> layer-FLOPs variant`` for
            :func:`analysis.flops.count_flops` (``extra``: shapes a batch recorded, e.g. ProxyV's).
        trained: the variant is a trained checkpoint (listed per start layer in the model config under
            the family's name); its baseline is the model it was made from.
        label_params: the parameters its label shows.
        param_layers: the methods the runner's ``start_layer`` / ``end_layer`` do not apply to: their layers
            are a parameter (``op.layers``, e.g. PyramidDrop's stage boundaries) or they have none (VisionZip
            merges before the LLM).
    """

    name: str
    methods: Callable[[], Mapping[str, Mapping[str, Any]]]
    resolve: Callable[..., tuple[tuple[int, ...], dict]]
    execute: str
    flops: str
    trained: bool = False
    label_params: tuple[str, ...] = ()
    param_layers: tuple[str, ...] = ()
    _loaded: dict = field(default_factory=dict, compare=False, repr=False)

    def checkpoint_params(self, method: str, settings: dict) -> dict:
        """The parameters of ``method`` as a trained checkpoint's saved ``settings`` give them."""
        return {k: settings[k] for k in self.methods()[method] if k in settings}

    def load(self, what: str):
        """The callable named by ``execute`` or ``flops`` (imported on first use)."""
        if what not in self._loaded:
            module, _, attribute = getattr(self, what).partition(":")
            self._loaded[what] = getattr(importlib.import_module(module), attribute)
        return self._loaded[what]


FAMILIES: dict[str, Family] = {}


def register_family(fam: Family) -> Family:
    """Register ``fam``; a second family of the same name, or a method another family has, is an error."""
    if fam.name in FAMILIES:
        raise ValueError(f"variant family {fam.name!r} is already registered")
    taken = {m: f.name for f in FAMILIES.values() for m in f.methods()}
    clash = sorted(set(fam.methods()) & set(taken))
    if clash:
        raise ValueError(f"family {fam.name!r}: method(s) {clash} already belong to {taken[clash[0]]!r}")
    FAMILIES[fam.name] = fam
    return fam


def _families() -> dict[str, Family]:
    if not FAMILIES:
        importlib.import_module("analysis.families")  # registers the built-in families
    return FAMILIES


def family(name: str) -> Family:
    try:
        return _families()[name]
    except KeyError:
        raise ValueError(f"unknown variant family {name!r}; known: {', '.join(sorted(_families()))}") from None


def methods() -> dict[str, str]:
    """Every method (the options of the ``op`` config group) -> its family."""
    return {m: f.name for f in _families().values() for m in f.methods()}


def family_of(method: str) -> Family:
    """The family of ``method``; an unknown one is a ValueError listing the known methods."""
    known = methods()
    if method not in known:
        raise ValueError(f"unknown op {method!r}; known ops: {', '.join(sorted(known))}")
    return FAMILIES[known[method]]


def resolve_variant(method: str, num_layers: int, *, start_layer: int | None = None, end_layer: int | None = None,
                    layers: Iterable[int] | None = None, params: Mapping | None = None, blind: bool = False,
                    checkpoint: str | None = None) -> Variant:
    """The one place a variant is resolved: family, validated layers and parameters.

    ``layers`` or ``start_layer``/``end_layer`` (end exclusive, default the last layer); an identity
    method (the baseline) has no layers. Raises ValueError / TypeError with a message naming the fix.
    """
    fam = family_of(method)
    defaults = dict(fam.methods()[method])
    given = dict(params or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"op {method!r} takes no parameter(s) {unknown}"
                         + (f"; its parameters: {', '.join(sorted(defaults))}" if defaults else ""))
    chosen, resolved = fam.resolve(method, {**defaults, **given}, num_layers, start_layer, end_layer,
                                   None if layers is None else list(layers))
    return Variant(fam.name, method, tuple(chosen), _params(resolved), bool(blind), checkpoint)
