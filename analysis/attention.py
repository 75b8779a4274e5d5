"""One attention primitive with separate query rows and key/value rows.

The operators and ProxyV change *which rows* are queries and *which pairs* may attend, never the
attention arithmetic. This module computes a HF attention module's output for an arbitrary set
of query rows against an arbitrary set of key/value rows, each with its own rotary position,
under an explicit boolean mask, and dispatches the kernel through HF's own attention functions
(``eager_attention_forward`` / ``sdpa_attention_forward``), so numerics follow the model's
backend. HF's own mask is never used or edited: it differs per backend (sdpa may pass none and
rely on ``is_causal``), while ours is built from positions and is the same for every backend.
"""

from __future__ import annotations

import sys

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import rotate_half

SUPPORTED_BACKENDS = ("eager", "sdpa")


def check_backend(implementation: str | None, what: str) -> None:
    """Raise a clear error if ``implementation`` cannot run an explicit-mask attention."""
    if implementation not in SUPPORTED_BACKENDS:
        raise NotImplementedError(
            f"{what} needs attention with an explicit (query, key) mask, which attn_implementation="
            f"{implementation!r} cannot take; supported backends: {', '.join(SUPPORTED_BACKENDS)}. "
            "Load the model with attn_implementation='sdpa' (or 'eager')."
        )


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` (B, heads, N, hd) with per-row ``cos``/``sin`` (B, N, hd)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


def _head_norm(attn, name: str, x: torch.Tensor) -> torch.Tensor:
    """``attn.q_norm`` / ``attn.k_norm`` of ``x`` (B, N, heads, hd) where the attention has one (Qwen3's
    per-head RMSNorm before the rotary embedding), else ``x``."""
    norm = getattr(attn, name, None)
    return x if norm is None else norm(x)


def project_kv(attn, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotated keys and values of ``hidden`` (B, N, D): each (B, kv_heads, N, hd)."""
    shape = (*hidden.shape[:-1], -1, attn.head_dim)
    key = _head_norm(attn, "k_norm", attn.k_proj(hidden).view(shape)).transpose(1, 2)
    value = attn.v_proj(hidden).view(shape).transpose(1, 2)
    return rope(key, cos, sin), value


def is_causal_mask(allowed: torch.Tensor) -> bool:
    """Whether ``allowed`` (B, Nq, K) is, for every sample, the square lower-triangular (causal) pattern."""
    Nq, K = allowed.shape[1:]
    if Nq != K or Nq < 2:
        return False
    causal = torch.ones(Nq, K, dtype=torch.bool, device=allowed.device).tril()
    return bool((allowed == causal).all())


def _kernel(attn):
    implementation = attn.config._attn_implementation
    check_backend(implementation, "this attention")
    eager = sys.modules[type(attn).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager), implementation


def split_attention(
    attn,
    queries: torch.Tensor,
    q_rope: tuple[torch.Tensor, torch.Tensor],
    keys_values: torch.Tensor,
    kv_rope: tuple[torch.Tensor, torch.Tensor],
    allowed: torch.Tensor,
    cache=None,
    extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    causal: bool | None = None,
) -> torch.Tensor:
    """Attention output of ``attn`` for query rows against key/value rows, after ``o_proj``.

    Args:
        attn: a HF self-attention module (``q_proj``/``k_proj``/``v_proj``/``o_proj``, ``head_dim``).
        queries: (B, Nq, D) normalised hidden states of the query rows.
        q_rope: (cos, sin), each (B, Nq, hd): rotary embedding of every query row (for M-RoPE models, the
            per-row combination of the temporal / height / width frequencies that HF's text rotary module
            returns as ``position_embeddings``).
        keys_values: (B, Nk, D) normalised hidden states of the new key/value rows; their keys and
            values are appended to ``cache`` for ``attn.layer_idx``.
        kv_rope: (cos, sin), each (B, Nk, hd).
        allowed: (B, Nq, K) bool, K = cached + Nk (+ extra) keys in that order: the pairs that may attend.
            Every row must allow at least one key.
        cache: a HF ``Cache`` or ``None``.
        extra_kv: optional rotated (key, value), each (B, kv_heads, Ne, hd), attended after the cached
            keys but not written to the cache (ProxyV's proxies).
        causal: whether ``allowed`` is exactly the causal pattern (then sdpa runs its causal kernel); ``None``: find
            out from the mask, which reads it back to the host (a device sync in every call); ``False`` is always
            correct (the explicit mask), so a caller that knows its mask is seldom causal passes it.
    Returns:
        (B, Nq, D) attention output.
    """
    kernel, implementation = _kernel(attn)
    q_shape = (*queries.shape[:-1], -1, attn.head_dim)
    query = _head_norm(attn, "q_norm", attn.q_proj(queries).view(q_shape)).transpose(1, 2)
    query = rope(query, *q_rope)  # (B, H, Nq, hd)
    key, value = project_kv(attn, keys_values, *kv_rope)  # (B, Hkv, Nk, hd)
    if cache is not None:
        key, value = cache.update(key, value, attn.layer_idx)
        cached = allowed.shape[-1] - (0 if extra_kv is None else extra_kv[0].shape[2])
        if key.shape[2] < cached:
            # A sliding-window cache returns only its most recent keys; the window mask already
            # excludes the older ones, so keep the mask columns of the keys returned.
            keep = torch.arange(allowed.shape[-1], device=allowed.device) >= cached - key.shape[2]
            allowed = allowed[..., keep]
            causal = None  # the caller's answer was about the whole mask
    if extra_kv is not None:
        key = torch.cat([key, extra_kv[0]], dim=2)
        value = torch.cat([value, extra_kv[1]], dim=2)
    if allowed.shape[-1] != key.shape[2]:
        raise ValueError(f"mask covers {allowed.shape[-1]} keys but attention has {key.shape[2]}")
    if implementation == "sdpa" and (is_causal_mask(allowed) if causal is None else causal):
        # Exactly the causal pattern (e.g. a batch-1 pruned layer): sdpa's causal kernel skips the upper
        # triangle, as HF's own layer does, instead of computing the rectangle under an explicit mask.
        out, _ = kernel(attn, query, key, value, None, dropout=attn.attention_dropout if attn.training else 0.0,
                        scaling=attn.scaling, is_causal=True)
        return attn.o_proj(out.reshape(*queries.shape[:-1], -1))
    mask = allowed[:, None]  # (B, 1, Nq, K)
    if implementation == "eager":
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min
        )
    out, _ = kernel(
        attn, query, key, value, mask,
        dropout=attn.attention_dropout if attn.training else 0.0,
        scaling=attn.scaling,
    )  # (B, Nq, H, hd)
    return attn.o_proj(out.reshape(*queries.shape[:-1], -1))
