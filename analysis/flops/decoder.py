"""FLOPs of one decoder layer: the formulas of a Llama-family layer, and the operators of :mod:`analysis.ops`.

A *layer-FLOPs variant* (:class:`VariantFlops`) is what :func:`analysis.flops.count_flops` asks,
layer by layer: ``layer_flops(layer, dims, tokens) -> LayerFlops``. :class:`OperatorVariant` is that
of an operator, counted from its own declaration (``skip_attention``, ``skip_ffn``, ``allowed``)
exactly as :func:`analysis.ablation.ablate` executes it, so a new operator is counted with no change
here. ProxyV's is :class:`analysis.flops.proxyv.ProxyVFlops`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from ..ops import Operator, get_operator
from .dims import TextDims
from .tokens import PrefillTokens

COMPONENTS = ("q_proj", "k_proj", "v_proj", "o_proj", "attn_scores", "attn_values",
              "gate_proj", "up_proj", "down_proj")
GROUPS = ("vision", "text", "padding")

# component -> group -> FLOPs
Breakdown = dict[str, dict[str, int]]


@dataclass(frozen=True)
class LayerFlops:
    """One decoder layer: executed and theoretical FLOPs, component -> token group -> FLOPs."""

    layer: int
    ablated: bool
    executed: Breakdown
    theoretical: Breakdown

    @property
    def total(self) -> int:
        return total(self.executed)

    @property
    def theoretical_total(self) -> int:
        return total(self.theoretical)


def total(breakdown: Breakdown) -> int:
    return sum(sum(groups.values()) for groups in breakdown.values())


def by_component(breakdown: Breakdown) -> dict[str, int]:
    return {name: sum(groups.values()) for name, groups in breakdown.items()}


def by_group(breakdown: Breakdown) -> dict[str, int]:
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


def _row_groups(tokens: PrefillTokens) -> dict[str, int]:
    """Every (B, T) position by group."""
    vision, valid = tokens.vision, tokens.valid
    return {"vision": int(vision.sum()), "text": int((valid & ~vision).sum()), "padding": int((~valid).sum())}


def _gathered_row_groups(tokens: PrefillTokens) -> dict[str, int]:
    """The (B, N) block of non-vision rows that ablate() gathers (select_rows(~vision)), by group."""
    per_sample = (~tokens.vision).sum(dim=1)
    slots = tokens.batch * int(per_sample.max())
    text = int((tokens.valid & ~tokens.vision).sum())
    return {"vision": 0, "text": text, "padding": slots - text}


class VariantFlops(Protocol):
    """What :func:`analysis.flops.count_flops` needs of a variant: the FLOPs of each decoder layer."""

    name: str
    layers: tuple[int, ...]

    def layer_flops(self, layer: int, dims: TextDims, tokens: PrefillTokens) -> LayerFlops: ...


@dataclass(frozen=True)
class OperatorVariant:
    """An operator of :mod:`analysis.ops` applied at ``layers``, counted from its declaration,
    exactly as :func:`analysis.ablation.ablate` executes it."""

    op: Operator
    layers: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.op.name

    def layer_flops(self, layer: int, dims: TextDims, tokens: PrefillTokens) -> LayerFlops:
        # ablate() runs HF's own layer where the op changes nothing for this batch (op.affects)
        ablated = layer in self.layers and self.op.affects(tokens.vision, tokens.vision)
        executed = self._executed(dims, tokens, ablated)
        return LayerFlops(layer, ablated, executed, self._theoretical(dims, tokens, ablated, dims.windows[layer]))

    def _executed(self, dims: TextDims, tokens: PrefillTokens, ablated: bool) -> Breakdown:
        every = _row_groups(tokens)
        gathered = _gathered_row_groups(tokens) if ablated else every
        attn_rows = gathered if self.op.skip_attention else every
        ffn_rows = gathered if self.op.skip_ffn else every
        pairs = {group: n * tokens.seq_len for group, n in attn_rows.items()}  # full rectangle
        return decoder_layer_breakdown(dims, attn_rows, every, ffn_rows, pairs)

    def _theoretical(self, dims: TextDims, tokens: PrefillTokens, ablated: bool, window: int | None) -> Breakdown:
        skip_attention = ablated and self.op.skip_attention
        every = {"vision": int(tokens.vision.sum()), "text": int((tokens.valid & ~tokens.vision).sum())}
        text_only = {"vision": 0, "text": every["text"]}
        attn_rows = text_only if skip_attention else every
        ffn_rows = text_only if ablated and self.op.skip_ffn else every
        pairs = tokens.allowed_pairs(self.op if ablated else None, window, skip_attention)
        return decoder_layer_breakdown(dims, attn_rows, every, ffn_rows, pairs)


def baseline_flops() -> OperatorVariant:
    """The baseline's layer FLOPs (the identity operator ``none``, no layers)."""
    return OperatorVariant(get_operator("none"), ())
