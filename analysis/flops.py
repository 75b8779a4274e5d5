"""FLOPs of a LLaVA model's prefill: one analytic model per variant, exact against what executes.

    python -m analysis.flops --config llava-1.5-7b --vision-tokens 576 --text-tokens 64 \
        --op skip_ffn --start-layer 12 --json

    from analysis.flops import TokenLayout, count_flops
    report = count_flops(model.config, TokenLayout.from_batch(batch, model.config), "skip_ffn", range(12, 32))
    report.total, report.baseline, report.reduction, report.theoretical

Conventions
-----------
* Only matrix products are counted, and one multiply-add is 2 FLOPs: an (m, k) @ (k, n) product
  costs ``2·m·k·n``, as ``torch.utils.flop_counter`` counts it (fvcore counts multiply-adds, i.e.
  half; see :mod:`analysis.flops_measure`). Not counted: norms, the rotary embedding, activations,
  softmax, bias and residual additions, the embedding lookup -- O(T·D) work beside the O(T·D²) of
  the products, and counted by neither torch's counter nor fvcore. (In transformers 5.x the rotary
  angles are a broadcast multiply, not a matmul, so the decoder has no FLOPs outside its layers;
  the tests check that.)
* Decoder layer, with D hidden, H query heads, Hkv key/value heads, hd head dim, F FFN width,
  R rows (tokens) a sub-layer runs on and K keys each query row is scored against::

      q_proj  2·R_attn·D·H·hd        k_proj, v_proj  2·R·D·Hkv·hd each      o_proj  2·R_attn·H·hd·D
      attn_scores (Q K^T)  2·H·hd per (query row, key)    attn_values (A V)  2·H·hd per (query row, key)
      gate_proj, up_proj  2·R_ffn·D·F each                down_proj  2·R_ffn·F·D

  Attention is counted per *query* head also under GQA: eager repeats K/V to all heads
  (``repeat_kv``) and the SDPA kernels do the same work.
* **Executed** figure: what the kernels execute for the whole padded (B, T) batch. Attention is the
  full rectangle (every query row against all T keys; causal and padding masks are applied to a
  computed score matrix, not skipped). HF's own layers run on all B·T rows, padding included.
  Where an op skips attention or the FFN for vision tokens, :func:`analysis.ablation.ablate` gathers
  each sample's non-vision rows (text and padding) into a (B, N) block, N the largest such count in
  the batch (:func:`analysis.rows.select_rows`): R_attn (or R_ffn) = B·N, which includes filler slots
  of samples with fewer non-vision rows. Mask-only ops (``mask_v2v``, ``drop_v2t``) execute exactly
  the baseline's work. This figure equals ``FlopCounterMode`` on the real forward, exactly.
* **Theoretical** figure: what an ideal kernel needs, per sample, padding removed. Projections and
  FFN run on the sample's valid tokens (minus its vision tokens where the op skips that sub-layer);
  attention costs 2·H·hd (scores) + 2·H·hd (weighted sum) per *allowed* (query, key) pair: the key
  is not after the query (causal), within the sliding window if the layer has one, allowed by the
  op's mask (``Operator.allowed``), and the query always keeps itself (the diagonal). So the
  baseline's attention is the causal half incl. the diagonal, n(n+1)/2 pairs for n tokens.
* Token groups: every row and every (query, key) pair is attributed to its *query* token:
  ``vision`` (positions the op treats as vision, LLaVA-NeXT newline tokens per ``newline_tokens``),
  ``text``, and, executed only, ``padding`` (padding tokens and filler slots: computed, discarded).
* Separate figures: the LM head (``2·rows·D·V``; rows = every position of the forward, or one per
  sample as ``generate()`` computes with ``logits_to_keep=1``) and the vision tower + projector
  (all crops, the tower runs on every crop in full; see :func:`vision_flops`).

Variants: every operator of :mod:`analysis.ops` is counted from its own declaration
(``skip_attention``, ``skip_ffn``, ``allowed``), so a new operator is counted without a change here.
A variant that is not an operator (ProxyV) implements :class:`Variant` -- ``layer_flops(layer,
dims, layout) -> LayerFlops`` -- and registers a factory in :data:`VARIANTS`; the CLI dispatches
``--op NAME`` on that registry. ProxyV (:mod:`analysis.proxyv.flops_variant`; ``--op proxyv
--proxy-reduce F [--proxy-init learned]``) registers itself when first used (:data:`DEFERRED_VARIANTS`),
so importing this module does not import transformers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from .layers import resolve_layers  # the same layer selection (and errors) as ablate()
from .layout import compute_layout
from .ops import OPERATORS, Operator, get_operator

CONFIG_DIR = Path(__file__).with_name("configs")
COMPONENTS = ("q_proj", "k_proj", "v_proj", "o_proj", "attn_scores", "attn_values",
              "gate_proj", "up_proj", "down_proj")
GROUPS = ("vision", "text", "padding")

# component -> group -> FLOPs
Breakdown = dict[str, dict[str, int]]


# ----------------------------------------------------------------------------- model dimensions

@dataclass(frozen=True)
class TextDims:
    """What the FLOPs of a Llama-family decoder depend on (Llama, Qwen2, Mistral; GQA; any head_dim)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    vocab: int
    windows: tuple[int | None, ...]  # sliding window of each layer (None: full causal)

    @classmethod
    def from_config(cls, config) -> TextDims:
        """From a LLaVA config (its ``text_config``) or a bare text-backbone config."""
        text = getattr(config, "text_config", None) or config
        if getattr(text, "model_type", None) not in ("llama", "qwen2", "mistral"):
            raise ValueError(f"FLOPs model supports llama, qwen2, mistral text backbones, "
                             f"got {getattr(text, 'model_type', None)!r}")
        heads = text.num_attention_heads
        n_layers = text.num_hidden_layers
        window = getattr(text, "sliding_window", None)
        layer_types = getattr(text, "layer_types", None)
        if layer_types is not None and text.model_type == "qwen2":  # Qwen2 windows only its later layers
            windows = tuple(window if kind == "sliding_attention" else None for kind in layer_types)
        else:
            windows = (window,) * n_layers
        return cls(
            hidden=text.hidden_size,
            heads=heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            intermediate=text.intermediate_size,
            layers=n_layers,
            vocab=text.vocab_size,
            windows=windows,
        )


def vision_flops(config, crops: int) -> int | None:
    """FLOPs of the vision tower and projector for ``crops`` crops; ``None`` without a vision tower.

    Per crop of S tokens (P = (image/patch)² patches, + 1 CLS token for CLIP; SigLIP has none), with
    Dv hidden, Fv MLP width and L layers -- every layer runs, also when ``vision_feature_layer``
    selects an earlier one::

        patch embedding  2·P·(3·p²)·Dv
        each layer       4·2·S·Dv² (q, k, v, o) + 2·2·S²·Dv (scores, weighted sum) + 2·2·S·Dv·Fv (MLP)
        projector        2·R·(Dv·n_feature_layers)·D + 2·R·D·D,  R = S - 1 ("default" drops CLS) or S

    LLaVA-NeXT runs the tower and projector on every crop (base + high-res) before unpadding.
    """
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return None
    kind = getattr(vision, "model_type", None)
    if kind not in ("clip_vision_model", "siglip_vision_model"):
        raise ValueError(f"vision FLOPs support CLIP and SigLIP towers, got {kind!r}")
    patches = (vision.image_size // vision.patch_size) ** 2
    seq = patches + (1 if kind == "clip_vision_model" else 0)
    dv, fv = vision.hidden_size, vision.intermediate_size
    embed = 2 * patches * vision.num_channels * vision.patch_size ** 2 * dv
    layer = 4 * 2 * seq * dv * dv + 2 * 2 * seq * seq * dv + 2 * 2 * seq * dv * fv
    feature_layers = config.vision_feature_layer
    n_features = 1 if isinstance(feature_layers, int) else len(feature_layers)
    rows = seq - 1 if config.vision_feature_select_strategy == "default" else seq
    d = config.text_config.hidden_size
    projector = 2 * rows * dv * n_features * d + 2 * rows * d * d
    return crops * (embed + vision.num_hidden_layers * layer + projector)


def tokens_per_crop(config) -> int | None:
    """LM tokens one crop becomes: (image_size / patch_size)², as LLaVA-1.5 / NeXT lay them out."""
    vision = getattr(config, "vision_config", None)
    return None if vision is None else (vision.image_size // vision.patch_size) ** 2


# ----------------------------------------------------------------------------- token layout

@dataclass(frozen=True)
class TokenLayout:
    """Which positions of a (padded) prefill batch are vision tokens and which are padding.

    ``vision`` and ``valid`` are (B, T) bool; vision positions are the ones an op treats as vision
    (LLaVA-NeXT newline tokens included or not, per the ``newline_tokens`` choice it was built with).
    ``crop_shapes[b]`` lists the (rows, cols) patch grid of every crop of sample b, in order; their
    number is how many crops run through the vision tower.
    """

    vision: torch.Tensor
    valid: torch.Tensor
    crop_shapes: tuple[tuple[tuple[int, int], ...], ...] = ()
    _pairs: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "vision", self.vision.bool().cpu())
        object.__setattr__(self, "valid", self.valid.bool().cpu())
        if self.vision.shape != self.valid.shape or self.vision.dim() != 2:
            raise ValueError(f"vision {tuple(self.vision.shape)} and valid {tuple(self.valid.shape)} "
                             "must both be (batch, seq)")
        if bool((self.vision & ~self.valid).any()):
            raise ValueError("a vision position is marked as padding")

    @property
    def batch(self) -> int:
        return self.vision.shape[0]

    @property
    def seq_len(self) -> int:
        return self.vision.shape[1]

    @property
    def crops(self) -> int:
        return sum(len(shapes) for shapes in self.crop_shapes)

    def allowed_pairs(self, op: Operator | None, window: int | None, skip_vision_queries: bool) -> dict[str, int]:
        """:func:`allowed_pair_counts` summed over the samples (padding removed), by query group; cached."""
        key = (None if op is None else op.name, window, skip_vision_queries)
        if key not in self._pairs:
            totals = {"vision": 0, "text": 0}
            for vision, valid in zip(self.vision, self.valid):
                for group, n in allowed_pair_counts(vision[valid], op, window, skip_vision_queries).items():
                    totals[group] += n
            self._pairs[key] = totals
        return self._pairs[key]

    @classmethod
    def from_counts(cls, vision_tokens: int, text_tokens: int, tokens_per_crop: int, newline_tokens: int = 0,
                    text_before_image: int = 0, newline_as: str = "vision") -> TokenLayout:
        """One sample, no padding: ``text_before_image`` text tokens, the image, then the other text.

        The image block holds ``vision_tokens`` crop tokens (a whole number of crops of
        ``tokens_per_crop``) and ``newline_tokens`` newline tokens. As in LLaVA-NeXT, the first crop
        (the base image) has no newline tokens; the newline tokens are spread evenly through the
        following (high-res) crops, one after each equal run of tokens (a single crop: through it).
        Only the theoretical figure depends on this order, and only where newline tokens count as
        text (``newline_as="text"``).
        """
        for name, value in (("vision_tokens", vision_tokens), ("text_tokens", text_tokens),
                            ("tokens_per_crop", tokens_per_crop), ("newline_tokens", newline_tokens),
                            ("text_before_image", text_before_image)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if tokens_per_crop <= 0:
            raise ValueError(f"tokens_per_crop must be positive, got {tokens_per_crop}")
        if vision_tokens % tokens_per_crop:
            raise ValueError(f"vision_tokens={vision_tokens} is not a whole number of crops of "
                             f"tokens_per_crop={tokens_per_crop} tokens")
        if text_before_image > text_tokens:
            raise ValueError(f"text_before_image={text_before_image} exceeds text_tokens={text_tokens}")
        if newline_as not in ("vision", "text"):
            raise ValueError(f"newline_as must be 'vision' or 'text', got {newline_as!r}")
        crops = vision_tokens // tokens_per_crop
        spread = vision_tokens - tokens_per_crop if crops > 1 else vision_tokens
        if newline_tokens > spread:
            raise ValueError(f"newline_tokens={newline_tokens} exceed the {spread} tokens they follow "
                             "(newline tokens follow rows of the high-res crops)")
        # image block: True = crop token; newline j follows the crop token ending run j
        ends = {tokens_per_crop * (crops > 1) + (j + 1) * spread // newline_tokens - 1 for j in range(newline_tokens)}
        image = []
        for i in range(vision_tokens):
            image.append(True)
            if i in ends:
                image.append(newline_as == "vision")
        sequence = [False] * text_before_image + image + [False] * (text_tokens - text_before_image)
        vision = torch.tensor([sequence], dtype=torch.bool)
        side = math.isqrt(tokens_per_crop)
        shape = (side, side) if side * side == tokens_per_crop else (1, tokens_per_crop)
        return cls(vision, torch.ones_like(vision), ((shape,) * crops,))

    @classmethod
    def from_batch(cls, batch: Mapping, config, newline_tokens: str = "vision") -> TokenLayout:
        """The layout of a processor batch (``input_ids``, ``attention_mask``, ``pixel_values``,
        ``image_sizes``) for the LLaVA model of ``config``, exactly as :func:`analysis.ablation.ablate`
        sees it in the prefill: image tokens are vision tokens only when the batch carries pixels.
        """
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        valid = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        if batch.get("pixel_values") is None:
            empty = ((),) * input_ids.shape[0]
            return cls(torch.zeros_like(valid), valid, empty)
        layout = compute_layout(input_ids, config, mask, batch.get("image_sizes"))
        shapes = tuple(tuple(crop.shape for image in sample.images for crop in image.crops)
                       for sample in layout.samples)
        return cls(layout.vision_mask(newline_tokens).cpu(), valid.cpu(), shapes)


# ----------------------------------------------------------------------------- per-layer counts

@dataclass(frozen=True)
class LayerFlops:
    """One decoder layer: executed and theoretical FLOPs, component -> token group -> FLOPs."""

    layer: int
    ablated: bool
    executed: Breakdown
    theoretical: Breakdown

    @property
    def total(self) -> int:
        return _total(self.executed)

    @property
    def theoretical_total(self) -> int:
        return _total(self.theoretical)


def _total(breakdown: Breakdown) -> int:
    return sum(sum(groups.values()) for groups in breakdown.values())


def _by_component(breakdown: Breakdown) -> dict[str, int]:
    return {name: sum(groups.values()) for name, groups in breakdown.items()}


def _by_group(breakdown: Breakdown) -> dict[str, int]:
    out: dict[str, int] = {}
    for groups in breakdown.values():
        for group, flops in groups.items():
            out[group] = out.get(group, 0) + flops
    return out


def _scale(rows: Mapping[str, int], per_row: int) -> dict[str, int]:
    return {group: int(n) * per_row for group, n in rows.items()}


def decoder_layer_breakdown(dims: TextDims, attn_rows: Mapping[str, int], kv_rows: Mapping[str, int],
                            ffn_rows: Mapping[str, int], attn_pairs: Mapping[str, int]) -> Breakdown:
    """FLOPs of one Llama-family decoder layer from its row and (query, key) pair counts per group.

    ``attn_rows``: query rows (q_proj, o_proj); ``kv_rows``: key/value rows (k_proj, v_proj);
    ``ffn_rows``: FFN rows; ``attn_pairs``: (query row, key) pairs scored, by the query's group.
    """
    q_width, kv_width = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    per_pair = 2 * dims.heads * dims.head_dim
    return {
        "q_proj": _scale(attn_rows, 2 * dims.hidden * q_width),
        "k_proj": _scale(kv_rows, 2 * dims.hidden * kv_width),
        "v_proj": _scale(kv_rows, 2 * dims.hidden * kv_width),
        "o_proj": _scale(attn_rows, 2 * q_width * dims.hidden),
        "attn_scores": _scale(attn_pairs, per_pair),
        "attn_values": _scale(attn_pairs, per_pair),
        "gate_proj": _scale(ffn_rows, 2 * dims.hidden * dims.intermediate),
        "up_proj": _scale(ffn_rows, 2 * dims.hidden * dims.intermediate),
        "down_proj": _scale(ffn_rows, 2 * dims.intermediate * dims.hidden),
    }


def _row_groups(layout: TokenLayout) -> dict[str, int]:
    """Every (B, T) position by group."""
    vision, valid = layout.vision, layout.valid
    return {"vision": int(vision.sum()), "text": int((valid & ~vision).sum()), "padding": int((~valid).sum())}


def _gathered_row_groups(layout: TokenLayout) -> dict[str, int]:
    """The (B, N) block of non-vision rows that ablate() gathers (select_rows(~vision)), by group."""
    per_sample = (~layout.vision).sum(dim=1)
    slots = layout.batch * int(per_sample.max())
    text = int((layout.valid & ~layout.vision).sum())
    return {"vision": 0, "text": text, "padding": slots - text}


def allowed_pair_counts(vision: torch.Tensor, op: Operator | None, window: int | None,
                        skip_vision_queries: bool, block: int = 1024) -> dict[str, int]:
    """(query, key) pairs an ideal kernel scores for one sample without padding, by query group.

    ``vision``: (n,) bool, the sample's valid tokens in order. A pair is allowed if the key is not
    after the query, within ``window`` (if any), allowed by ``op.allowed`` (if ``op``), or is the
    diagonal. Vision queries are left out if ``skip_vision_queries``. Counted in query blocks.
    """
    n = vision.shape[0]
    keys = torch.arange(n)
    counts = {"vision": 0, "text": 0}
    for start in range(0, n, block):
        queries = torch.arange(start, min(start + block, n))
        offset = queries[:, None] - keys[None, :]  # (q, n)
        allowed = offset >= 0
        if window is not None:
            allowed &= offset < window
        if op is not None:
            rule = op.allowed(vision[None, queries], vision[None, :])
            if rule is not None:
                allowed &= rule[0]
        allowed |= offset == 0
        per_query = allowed.sum(dim=1)
        q_vision = vision[queries]
        counts["vision"] += 0 if skip_vision_queries else int(per_query[q_vision].sum())
        counts["text"] += int(per_query[~q_vision].sum())
    return counts


class Variant(Protocol):
    """What :func:`count_flops` needs of a variant: the FLOPs of each decoder layer."""

    name: str
    layers: tuple[int, ...]

    def layer_flops(self, layer: int, dims: TextDims, layout: TokenLayout) -> LayerFlops: ...


@dataclass(frozen=True)
class OperatorVariant:
    """An operator of :mod:`analysis.ops` applied at ``layers``, counted from its declaration,
    exactly as :func:`analysis.ablation.ablate` executes it."""

    op: Operator
    layers: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.op.name

    def layer_flops(self, layer: int, dims: TextDims, layout: TokenLayout) -> LayerFlops:
        # ablate() runs HF's own layer where the op changes nothing for this batch (op.affects)
        ablated = layer in self.layers and self.op.affects(layout.vision, layout.vision)
        executed = self._executed(dims, layout, ablated)
        return LayerFlops(layer, ablated, executed, self._theoretical(dims, layout, ablated, dims.windows[layer]))

    def _executed(self, dims: TextDims, layout: TokenLayout, ablated: bool) -> Breakdown:
        every = _row_groups(layout)
        gathered = _gathered_row_groups(layout) if ablated else every
        attn_rows = gathered if self.op.skip_attention else every
        ffn_rows = gathered if self.op.skip_ffn else every
        pairs = {group: n * layout.seq_len for group, n in attn_rows.items()}  # full rectangle
        return decoder_layer_breakdown(dims, attn_rows, every, ffn_rows, pairs)

    def _theoretical(self, dims: TextDims, layout: TokenLayout, ablated: bool, window: int | None) -> Breakdown:
        skip_attention = ablated and self.op.skip_attention
        every = {"vision": int(layout.vision.sum()), "text": int((layout.valid & ~layout.vision).sum())}
        text_only = {"vision": 0, "text": every["text"]}
        attn_rows = text_only if skip_attention else every
        ffn_rows = text_only if ablated and self.op.skip_ffn else every
        pairs = layout.allowed_pairs(self.op if ablated else None, window, skip_attention)
        return decoder_layer_breakdown(dims, attn_rows, every, ffn_rows, pairs)


# Variants that are not operators (ProxyV): name -> factory(layers, **options) -> Variant
VARIANTS: dict[str, Callable[..., Variant]] = {}
# Variants registered by a module of their own, imported on first use (it pulls in transformers):
# name -> the module whose import calls register_variant(name, ...).
DEFERRED_VARIANTS: dict[str, str] = {"proxyv": "analysis.proxyv.flops_variant"}


def register_variant(name: str, factory: Callable[..., Variant]) -> None:
    """Make ``name`` countable by :func:`make_variant` and ``--op NAME`` (e.g. ProxyV)."""
    if name in VARIANTS or name in OPERATORS:
        raise ValueError(f"variant {name!r} is already registered")
    VARIANTS[name] = factory


def known_variants() -> list[str]:
    return sorted({*OPERATORS, *VARIANTS, *DEFERRED_VARIANTS})


def make_variant(name: str | Operator | Variant, layers: Iterable[int], **options) -> Variant:
    """The variant called ``name`` (an operator or a registered variant) applied at ``layers``."""
    if isinstance(name, Operator):
        return OperatorVariant(name, tuple(layers))
    if not isinstance(name, str):
        return name  # already a Variant
    if name in OPERATORS:
        if options:
            raise ValueError(f"op {name!r} takes no options, got {sorted(options)}")
        return OperatorVariant(get_operator(name), tuple(layers))
    if name not in VARIANTS and name in DEFERRED_VARIANTS:
        importlib.import_module(DEFERRED_VARIANTS[name])  # registers it
    if name in VARIANTS:
        return VARIANTS[name](tuple(layers), **options)
    raise ValueError(f"unknown op {name!r}; known ops: {', '.join(known_variants())}")


# ----------------------------------------------------------------------------- the report

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
        return _sum_dicts(_by_component(layer.theoretical if theoretical else layer.executed)
                          for layer in self.per_layer)

    def groups(self, theoretical: bool = False) -> dict[str, int]:
        """Decoder FLOPs per token group (vision / text / padding), summed over layers."""
        return _sum_dicts(_by_group(layer.theoretical if theoretical else layer.executed) for layer in self.per_layer)

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
                "components": _by_component(layer.executed),
                "groups": _by_group(layer.executed),
                "theoretical_components": _by_component(layer.theoretical),
                "theoretical_groups": _by_group(layer.theoretical),
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


def count_flops(config, layout: TokenLayout, op: str | Operator | Variant = "none", layers: Iterable[int] | None = None,
                *, start_layer: int | None = None, end_layer: int | None = None, lm_head: str = "all",
                **options) -> FlopsReport:
    """Analytic prefill FLOPs of ``op`` at ``layers`` (default every layer) against the baseline.

    Args:
        config: a LLaVA config (``text_config``, ``vision_config``) or a bare text-backbone config.
        layout: the token layout, e.g. :meth:`TokenLayout.from_batch` or :meth:`TokenLayout.from_counts`.
        op: an operator name or instance, a registered variant name, or a :class:`Variant`.
        layers / start_layer / end_layer: as for :func:`analysis.ablation.ablate` (end exclusive).
        lm_head: ``"all"`` (logits at every position, as ``model(**batch)``) or ``"last"`` (one per
            sample, as ``generate()``'s prefill with ``logits_to_keep=1``).
        options: variant options (e.g. ProxyV's reduce factor).
    """
    dims = TextDims.from_config(config)
    chosen = resolve_layers(dims.layers, layers, start_layer, end_layer)
    variant = make_variant(op, chosen, **options)
    baseline = OperatorVariant(get_operator("none"), ())
    if lm_head not in ("all", "last"):
        raise ValueError(f"lm_head must be 'all' or 'last', got {lm_head!r}")
    head_rows = layout.batch * (layout.seq_len if lm_head == "all" else 1)
    return FlopsReport(
        variant=variant.name,
        layers=tuple(chosen),
        per_layer=tuple(variant.layer_flops(i, dims, layout) for i in range(dims.layers)),
        baseline_per_layer=tuple(baseline.layer_flops(i, dims, layout) for i in range(dims.layers)),
        lm_head=2 * head_rows * dims.hidden * dims.vocab,
        vision=vision_flops(config, layout.crops),
        batch=layout.batch,
        seq_len=layout.seq_len,
    )


# ----------------------------------------------------------------------------- configs

def shipped_configs() -> list[str]:
    """Names of the checkpoint configs shipped in ``analysis/configs`` (usable as ``--config NAME``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(path_or_name: str | Path):
    """A HF config object from a config.json path or a shipped name (e.g. ``"llava-1.5-7b"``)."""
    from transformers import AutoConfig

    path = Path(path_or_name)
    if not path.is_file():
        shipped = CONFIG_DIR / f"{path_or_name}.json"
        if not shipped.is_file():
            raise ValueError(f"--config {path_or_name!r} is neither a file nor a shipped config; "
                             f"shipped: {', '.join(shipped_configs())}")
        path = shipped
    data = json.loads(path.read_text())
    if "model_type" not in data:
        raise ValueError(f"{path} has no model_type; is it a HF config.json?")
    return AutoConfig.for_model(**data)


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.flops",
        description="Analytic prefill FLOPs of a LLaVA model under an op (see docs/flops.md).",
    )
    parser.add_argument("--config", required=True,
                        help=f"config.json (LLaVA or bare text backbone) or a shipped name: {', '.join(shipped_configs())}")
    parser.add_argument("--vision-tokens", type=int, default=None,
                        help="vision tokens of the image(s) without newline tokens (default: one crop)")
    parser.add_argument("--tokens-per-crop", type=int, default=None,
                        help="LM tokens per crop (default: (image_size/patch_size)^2 of the config)")
    parser.add_argument("--newline-tokens", type=int, default=0, help="LLaVA-NeXT image_newline tokens")
    parser.add_argument("--text-tokens", type=int, required=True, help="text tokens of the prompt")
    parser.add_argument("--text-before-image", type=int, default=0,
                        help="how many of the text tokens precede the image (e.g. a system prompt); default 0")
    parser.add_argument("--newline-as", choices=("vision", "text"), default=None,
                        help="whether ops treat newline tokens as vision tokens (ablate()'s default) or text "
                             "(always text for --op proxyv)")
    parser.add_argument("--op", default="none", help=f"one of: {', '.join(known_variants())}")
    parser.add_argument("--start-layer", type=int, default=0)
    parser.add_argument("--proxy-reduce", type=int, default=None, metavar="F",
                        help="--op proxyv: reduce factor, (side/F)^2 proxies per crop (spatial; default 4)")
    parser.add_argument("--proxy-init", choices=("spatial", "learned"), default=None,
                        help="--op proxyv: proxy initialiser (default spatial)")
    parser.add_argument("--end-layer", type=int, default=None, help="exclusive; default the number of layers")
    parser.add_argument("--lm-head", choices=("all", "last"), default="all",
                        help="logits at every position (a forward) or at the last (generate's prefill)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _format_table(report: FlopsReport, title: str) -> str:
    def tf(x: int) -> str:
        return f"{x / 1e12:9.4f}"

    header = f"{'layer':>5} {'ablated':>7} {'TFLOPs':>9} {'baseline':>9} {'saved':>6} {'theory':>9} {'th. base':>9}"
    lines = [title, header]
    for layer, base in zip(report.per_layer, report.baseline_per_layer):
        saved = 1 - layer.total / base.total
        lines.append(f"{layer.layer:>5} {'yes' if layer.ablated else '':>7} {tf(layer.total)} {tf(base.total)} "
                     f"{saved:6.1%} {tf(layer.theoretical_total)} {tf(base.theoretical_total)}")
    lines.append(f"{'all':>5} {'':>7} {tf(report.total)} {tf(report.baseline)} {report.reduction:6.1%} "
                 f"{tf(report.theoretical)} {tf(report.theoretical_baseline)}")
    lines.append("")
    lines.append(f"decoder executed     {report.total / 1e12:.4f} TFLOPs  (baseline {report.baseline / 1e12:.4f}, "
                 f"reduction {report.reduction:.2%})")
    lines.append(f"decoder theoretical  {report.theoretical / 1e12:.4f} TFLOPs  (baseline "
                 f"{report.theoretical_baseline / 1e12:.4f}, reduction {report.theoretical_reduction:.2%})")
    lines.append(f"LM head              {report.lm_head / 1e12:.4f} TFLOPs")
    if report.vision is not None:
        lines.append(f"vision tower + proj. {report.vision / 1e12:.4f} TFLOPs")
    components = report.components()
    lines.append("executed by component: " + ", ".join(f"{k} {v / 1e12:.3f}" for k, v in components.items()))
    lines.append("executed by group:     " + ", ".join(f"{k} {v / 1e12:.3f}" for k, v in report.groups().items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = _variant_options(args)
        config = load_config(args.config)
        # a bare text backbone has no crop size: its vision tokens are one block unless told otherwise
        per_crop = args.tokens_per_crop or tokens_per_crop(config) or max(args.vision_tokens or 0, 1)
        vision_tokens = args.vision_tokens if args.vision_tokens is not None else tokens_per_crop(config) or 0
        layout = TokenLayout.from_counts(vision_tokens, args.text_tokens, per_crop, args.newline_tokens,
                                         args.text_before_image, args.newline_as)
        report = count_flops(config, layout, args.op, start_layer=args.start_layer, end_layer=args.end_layer,
                             lm_head=args.lm_head, **options)
    except (ValueError, TypeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        out = {"config": str(args.config), "vision_tokens": vision_tokens, "tokens_per_crop": per_crop,
               "newline_tokens": args.newline_tokens, "text_tokens": args.text_tokens,
               "text_before_image": args.text_before_image,
               **_proxy_flags(options), **report.to_dict()}
        print(json.dumps(out))
    else:
        detail = "".join(f", {k.removeprefix('proxy_')} {v}" for k, v in _proxy_flags(options).items())
        print(_format_table(report, f"{args.config}: op {report.variant}{detail} at layers {_span(report.layers)}, "
                                    f"{layout.seq_len} tokens ({vision_tokens} vision, {args.newline_tokens} newline, "
                                    f"{args.text_tokens} text)"))
    return 0


def _variant_options(args) -> dict:
    """The variant options of the command line (ProxyV's), checked against ``--op``; sets ``args.newline_as``."""
    if args.op != "proxyv":
        given = [flag for flag, value in (("--proxy-reduce", args.proxy_reduce), ("--proxy-init", args.proxy_init))
                 if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} to --op proxyv "
                             f"only, not --op {args.op}")
        args.newline_as = args.newline_as or "vision"
        return {}
    if args.newline_as == "vision":
        raise ValueError("ProxyV computes newline tokens as text; drop --newline-as vision")
    args.newline_as = "text"
    return {"reduce_factor": 4 if args.proxy_reduce is None else args.proxy_reduce,
            "init": args.proxy_init or "spatial"}


def _proxy_flags(options: dict) -> dict:
    """ProxyV's options under their command-line names (for the JSON and the table title)."""
    return {"proxy_reduce": options["reduce_factor"], "proxy_init": options["init"]} if options else {}


def _span(layers: tuple[int, ...]) -> str:
    if layers and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return ",".join(map(str, layers))


if __name__ == "__main__":
    # Run the importable module's main: variants register with ``analysis.flops`` (e.g. ProxyV), not ``__main__``.
    from analysis.flops import main as _main

    sys.exit(_main())
