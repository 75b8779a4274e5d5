"""Ranking vision tokens by the attention the last prompt token pays them.

One score row per sample: the attention probabilities of the sample's last valid token over every
key it may attend (valid and not after it), softmax over all those keys, mean over heads, computed
as HF's eager attention computes probabilities (scores in the model dtype, softmax in float32); Qwen3's
per-head q/k norms where the attention has them, rotary from the rows' own (cos, sin) (M-RoPE included). Only
``B x heads x 1 x N`` scores are formed; the layer itself keeps its own (sdpa or eager) kernel.
"""

from __future__ import annotations

import torch

from ..attention import _head_norm, rope


def last_valid(valid: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last True entry of each row of ``valid`` (B, N) (0 for an empty row)."""
    N = valid.shape[1]
    return (torch.arange(N, device=valid.device) * valid).amax(dim=1)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b]]: (B, N, *F) -> (B, *F)."""
    return x[torch.arange(x.shape[0], device=x.device), index]


def attention_row(attn, query: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """(B, N) float32: softmax over the allowed keys of one query per sample, mean over heads.

    query: (B, heads, hd) rotated; keys: (B, kv_heads, N, hd) rotated; allowed: (B, N) bool.
    """
    B, H, hd = query.shape
    kv_heads = keys.shape[1]
    q = query.view(B, kv_heads, H // kv_heads, hd)  # GQA: head h reads kv head h // group
    scores = torch.matmul(q, keys.transpose(2, 3)) * attn.scaling  # (B, kv_heads, group, N)
    scores = scores.masked_fill(~allowed[:, None, None, :], torch.finfo(scores.dtype).min)
    return scores.softmax(dim=-1, dtype=torch.float32).mean(dim=(1, 2))


def key_mask(index: torch.Tensor, valid: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: the keys the last token attends: valid and not after it (causal by original index)."""
    return valid & (index <= _take(index, last)[:, None])


def fastv_scores(attn, q_states: torch.Tensor, k_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """FastV's row from the layer's own q_proj / k_proj outputs (B, N, H*hd) / (B, N, Hkv*hd), captured
    while the layer ran: rotary on the last valid row's query and on every key, no re-projection."""
    hd = attn.head_dim
    last = last_valid(valid)
    B, N, _ = k_states.shape
    query = _head_norm(attn, "q_norm", _take(q_states, last).view(B, 1, -1, hd)).transpose(1, 2)  # (B, H, 1, hd)
    query = rope(query, _take(cos, last)[:, None], _take(sin, last)[:, None])[:, :, 0]
    keys = rope(_head_norm(attn, "k_norm", k_states.view(B, N, -1, hd)).transpose(1, 2), cos, sin)
    return attention_row(attn, query, keys, key_mask(index, valid, last))


def pdrop_scores(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, index: torch.Tensor,
                 valid: torch.Tensor) -> torch.Tensor:
    """PyramidDrop's row, as its official code: the layer's OWN input_layernorm (every alive row),
    q_proj on the last valid row only (B rows), k_proj on every alive row, rotary at the current positions."""
    attn = layer.self_attn
    hd = attn.head_dim
    last = last_valid(valid)
    B, N, _ = hidden.shape
    x = layer.input_layernorm(hidden)
    query = _head_norm(attn, "q_norm", attn.q_proj(_take(x, last)).view(B, 1, -1, hd)).transpose(1, 2)
    query = rope(query, _take(cos, last)[:, None], _take(sin, last)[:, None])[:, :, 0]
    keys = rope(_head_norm(attn, "k_norm", attn.k_proj(x).view(B, N, -1, hd)).transpose(1, 2), cos, sin)
    return attention_row(attn, query, keys, key_mask(index, valid, last))


def top_vision(scores: torch.Tensor, vision: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: per sample the ``counts[b]`` vision columns of highest score (ties: lower index first)."""
    ranked = scores.float().masked_fill(~vision, -torch.inf)
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return vision & (rank < counts[:, None])
