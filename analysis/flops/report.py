"""The count: :func:`count_flops` of a variant on a prefill, as a :class:`FlopsReport` beside the baseline."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..ops import Operator
from ..variant import Variant
from .decoder import (
    LayerFlops,
    OperatorVariant,
    VariantFlops,
    baseline_flops,
    by_component,
    by_group,
)
from .dims import TextDims, vision_flops
from .qwen import is_qwen, qwen_vision_flops
from .tokens import PrefillTokens
from .variants import make_variant


@dataclass(frozen=True)
class FlopsReport:
    """Prefill FLOPs of a variant beside the baseline. Decoder figures exclude the LM head and vision."""

    variant: str
    layers: tuple[int, ...]
    per_layer: tuple[LayerFlops, ...]
    baseline_per_layer: tuple[LayerFlops, ...]
    lm_head: int
    vision: int | None
    batch: int
    seq_len: int
    # its parts, where a variant changes the vision side (VisionZip: tower, visionzip, projector) and for Qwen-VL
    # (tower: patch embedding + blocks, merger: the PatchMerger, deepstack: Qwen3-VL's DeepStack mergers, else 0)
    vision_parts: dict[str, int] | None = None

    @property
    def total(self) -> int:
        """Executed decoder FLOPs of the variant."""
        return sum(layer.total for layer in self.per_layer)

    @property
    def baseline(self) -> int:
        return sum(layer.total for layer in self.baseline_per_layer)

    @property
    def reduction(self) -> float:
        """(baseline - total) / baseline, executed."""
        return (self.baseline - self.total) / self.baseline

    @property
    def theoretical(self) -> int:
        return sum(layer.theoretical_total for layer in self.per_layer)

    @property
    def theoretical_baseline(self) -> int:
        return sum(layer.theoretical_total for layer in self.baseline_per_layer)

    @property
    def theoretical_reduction(self) -> float:
        return (self.theoretical_baseline - self.theoretical) / self.theoretical_baseline

    def components(self, theoretical: bool = False) -> dict[str, int]:
        """Decoder FLOPs per component, summed over layers."""
        return _sum_dicts(by_component(layer.theoretical if theoretical else layer.executed)
                          for layer in self.per_layer)

    def groups(self, theoretical: bool = False) -> dict[str, int]:
        """Decoder FLOPs per token group (vision / text / padding), summed over layers."""
        return _sum_dicts(by_group(layer.theoretical if theoretical else layer.executed) for layer in self.per_layer)

    def to_dict(self) -> dict:
        per_layer = []
        for layer, base in zip(self.per_layer, self.baseline_per_layer):
            per_layer.append({
                "layer": layer.layer,
                "ablated": layer.ablated,
                "flops": layer.total,
                "baseline_flops": base.total,
                "theoretical_flops": layer.theoretical_total,
                "theoretical_baseline_flops": base.theoretical_total,
                "components": by_component(layer.executed),
                "groups": by_group(layer.executed),
                "theoretical_components": by_component(layer.theoretical),
                "theoretical_groups": by_group(layer.theoretical),
            })
        return {
            "op": self.variant,
            "layers": list(self.layers),
            "batch": self.batch,
            "seq_len": self.seq_len,
            "total_flops": self.total,
            "baseline_flops": self.baseline,
            "reduction": self.reduction,
            "theoretical_flops": self.theoretical,
            "theoretical_baseline_flops": self.theoretical_baseline,
            "theoretical_reduction": self.theoretical_reduction,
            "total_multiply_adds": self.total // 2,  # fvcore's unit
            "lm_head_flops": self.lm_head,
            "vision_flops": self.vision,
            **({} if self.vision_parts is None else {"vision_parts": dict(self.vision_parts)}),
            "components": self.components(),
            "groups": self.groups(),
            "theoretical_components": self.components(theoretical=True),
            "theoretical_groups": self.groups(theoretical=True),
            "per_layer": per_layer,
        }


def _sum_dicts(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for key, value in d.items():
            out[key] = out.get(key, 0) + value
    return out


def count_flops(config, tokens: PrefillTokens, variant: Variant | str | Operator | VariantFlops = "none",
                layers: Iterable[int] | None = None, *, start_layer: int | None = None, end_layer: int | None = None,
                lm_head: str = "all", **options) -> FlopsReport:
    """Analytic prefill FLOPs of ``variant`` against the baseline.

    Args:
        config: a LLaVA config (``text_config``, ``vision_config``) or a bare text-backbone config.
        tokens: the prefill's tokens, e.g. :meth:`PrefillTokens.from_batch` or :meth:`PrefillTokens.from_counts`.
        variant: an :class:`analysis.variant.Variant` (counted by its family's FLOPs), or an op / method
            name (or :class:`~analysis.ops.Operator`) resolved with ``layers`` / ``start_layer`` /
            ``end_layer`` (as for :func:`analysis.ablation.ablate`, end exclusive, default every layer)
            and ``options``, or a layer-FLOPs variant object.
        lm_head: ``"all"`` (logits at every position, as ``model(**batch)``; for a variant that drops rows,
            every row its forward outputs, e.g. B·N after token reduction) or ``"last"`` (one per sample, as
            ``generate()``'s prefill with ``logits_to_keep=1``).
        options: with a name, the method's parameters (e.g. ProxyV's ``reduce_factor``); otherwise, and
            for anything a method does not declare, extras for its family's FLOPs (ProxyV's ``shapes``).

    A variant that reads the model config binds it (``with_config``, VisionZip: its tower and placeholders); one
    that changes the vision side gives the vision figure as parts (``vision_parts(config, tokens)``: ``tower``,
    ``visionzip``, ``projector``, ...), kept in :attr:`FlopsReport.vision_parts`; the others leave it ``None``.
    """
    dims = TextDims.from_config(config)
    if lm_head not in ("all", "last"):
        raise ValueError(f"lm_head must be 'all' or 'last', got {lm_head!r}")
    options = {**_model_extras(config, variant), **options}
    counted = make_variant(variant, dims.layers, layers, start_layer=start_layer, end_layer=end_layer, **options)
    if is_qwen(config):
        _check_qwen_variant(counted)
    if hasattr(counted, "with_config"):  # a variant that reads the model config itself (VisionZip: its tower)
        counted = counted.with_config(config)
    baseline = baseline_flops()
    if lm_head == "last":
        head_rows = tokens.batch
    else:  # every row the decoder outputs: (B, T), or fewer where the variant drops rows (token reduction)
        output_rows = getattr(counted, "output_rows", None)
        head_rows = tokens.batch * tokens.seq_len if output_rows is None else output_rows(tokens)
    parts_of = getattr(counted, "vision_parts", None)  # a variant that changes the vision side (VisionZip)
    if is_qwen(config):  # the tower on every image / video grid, its merger and DeepStack mergers
        parts = qwen_vision_flops(config, tokens.vision_grids).parts()
        vision = sum(parts.values())
    else:
        parts = None if parts_of is None or getattr(config, "vision_config", None) is None else parts_of(config, tokens)
        vision = vision_flops(config, tokens.crops) if parts is None else parts["tower"] + parts["visionzip"] + parts[
            "projector"]
    return FlopsReport(
        variant=counted.name,
        layers=tuple(counted.layers),
        per_layer=tuple(counted.layer_flops(i, dims, tokens) for i in range(dims.layers)),
        baseline_per_layer=tuple(baseline.layer_flops(i, dims, tokens) for i in range(dims.layers)),
        lm_head=2 * head_rows * dims.hidden * dims.vocab,
        vision=vision,
        batch=tokens.batch,
        seq_len=tokens.seq_len,
        vision_parts=parts,
    )


def _check_qwen_variant(counted) -> None:
    """On Qwen-VL configs: the operators and the baseline, FastV and PyramidDrop (their rows, (query, key) pairs and
    rankings need only the token masks; the vision side runs unchanged), and ProxyV (its ``shapes=``
    from :func:`analysis.proxyv.proxyv_shapes` of the batch, or :func:`analysis.flops.proxyv.qwen_shapes` of the
    tokens), and FastV / PyramidDrop on a ProxyV checkpoint (:class:`analysis.flops.proxyv_reduction.
    ProxyVReductionFlops`: the plan of the block alive at the start layer). VisionZip is not counted for these
    classes."""
    from .proxyv import ProxyVFlops
    from .proxyv_reduction import ProxyVReductionFlops
    from .reduction import ReductionFlops

    if isinstance(counted, ProxyVFlops):  # shapes= of the batch, or the plan of the layout the tokens record
        return
    if not (isinstance(counted, OperatorVariant) or type(counted) in (ReductionFlops, ProxyVReductionFlops)):
        raise NotImplementedError(f"FLOPs of {counted.name!r} on Qwen-VL models are not modelled yet; the operators "
                                  f"of analysis.ops, fastv, pdrop, proxyv and the baseline are")


def _model_extras(config, variant) -> dict:
    """What the model itself adds to a variant's count: a ProxyV checkpoint's settings for token reduction
    (the reduction runs on its ProxyV layers), and its learned-proxy count for ProxyV itself."""
    settings = getattr(config, "proxyv", None)
    if not settings or hasattr(variant, "layer_flops"):
        return {}
    from ..variant import family_of

    name = variant.method if isinstance(variant, Variant) else getattr(variant, "name", variant)
    try:
        family_name = family_of(name).name
    except ValueError:
        return {}
    if family_name == "reduction":
        return {"proxyv_settings": dict(settings)}
    if family_name == "proxyv" and settings.get("learned_proxies"):  # the checkpoint's own learned count
        return {"learned_proxies": settings["learned_proxies"]}
    return {}
