"""Few query rows against a long sequence: what the explicit-mask attention of the ablated and ProxyV layers costs
under each way torch can compute it (``experiments/bench_attention.py``; docs/qwen.md, "Long-video benchmark").

The operators' layers and ProxyV's attend with a handful of query rows (the text rows; ProxyV's proxies and text
rows) against every key of a long prompt, under an explicit boolean mask (:func:`analysis.attention.split_attention`
through transformers' sdpa interface). On the GPU that attention took far longer than its FLOPs (docs/qwen.md). This
benchmark times the same attention, on the same shapes and masks, computed each way below, and checks every way's
output against an fp32 reference on the same inputs:

* ``hf_sdpa``: what runs now -- transformers' ``sdpa_attention_forward`` with the boolean mask (under a mask it
  repeats the key / value heads to the query heads, then torch's SDPA picks its backend);
* ``sdpa_<backend>``: the same repeated heads and mask with one SDPA backend forced (cuDNN, memory-efficient, math);
* ``sdpa_gqa``: SDPA with ``enable_gqa=True`` and the mask (no repeated heads; what transformers' environment
  switch ``TRANSFORMERS_SDPA_FORCE_GQA=1`` asks for);
* ``eager_grouped``: the attention written out (bf16 products, fp32 softmax, as HF's eager attention), the query
  heads that share a key head stacked into one product instead of repeating the keys;
* ``flash_pieces``: the mask cut into pieces that are each lower-right causal over a set of key ranges -- a run of
  consecutive text rows over the keys up to the run's end; ProxyV's proxies over the prefix then the proxies -- one
  SDPA call per piece with torch's lower-right causal bias (``torch.nn.attention.bias.causal_lower_right``), which
  flash attention computes without a mask. Exact in value, but it computes only the allowed pairs (ProxyV's proxies no
  longer meet the 8,424 vision keys they must ignore): fewer FLOPs than the counted rectangle.

Shapes (batch 1, the head counts of a shipped config): ``text_rows`` -- the ``--prefix`` and ``--suffix`` text
rows of a prompt with ``--vision`` vision tokens between them, each reading every key up to itself (the
``skip_attn`` / ``skip_attn_ffn`` layers' text queries); ``proxyv`` -- ``--proxies`` proxy rows (reading the prefix
and the proxies up to themselves) and the text rows (every prompt key up to themselves, no proxy), against the prompt's
keys then the proxies' (:meth:`analysis.proxyv.plan.ProxyPlan.allowed`).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from .bench import timed

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


@dataclass
class Shape:
    """One attention problem: which keys each query row reads, as a mask and as lower-right causal pieces."""

    name: str
    allowed: torch.Tensor  # (Nq, Nk) bool
    # (first row, end row, key ranges): rows [a, b) read, of the keys of the ranges in that order, exactly a lower-right
    # causal pattern; the pieces cover every row
    pieces: list[tuple[int, int, list[tuple[int, int]]]]


def text_rows(prefix: int, vision: int, suffix: int) -> Shape:
    """The text rows of a prompt [prefix text, vision, suffix text], each reading every key up to itself."""
    T = prefix + vision + suffix
    positions = torch.cat([torch.arange(prefix), torch.arange(T - suffix, T)])
    allowed = torch.arange(T)[None, :] <= positions[:, None]
    pieces = [(0, prefix, [(0, prefix)]), (prefix, prefix + suffix, [(0, T)])]
    return Shape("text_rows", allowed, pieces)


def proxyv_rows(prefix: int, vision: int, suffix: int, proxies: int) -> Shape:
    """ProxyV's queries [proxies, text rows] against keys [prompt, proxies] (the rule of ProxyPlan.allowed)."""
    T = prefix + vision + suffix
    rows = text_rows(prefix, vision, suffix)
    text = rows.allowed
    proxy_keys = (torch.arange(T) < prefix)[None, :].expand(proxies, T)  # the text before the video
    proxy_proxy = torch.ones(proxies, proxies, dtype=torch.bool).tril()
    allowed = torch.cat([torch.cat([proxy_keys, proxy_proxy], 1),
                         torch.cat([text, text.new_zeros(text.shape[0], proxies)], 1)], 0)
    pieces = [(0, proxies, [(0, prefix), (T, T + proxies)])] + [(a + proxies, b + proxies, keys)
                                                                 for a, b, keys in rows.pieces]
    return Shape("proxyv", allowed, pieces)


def repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


def hf_sdpa(q, k, v, allowed, scale):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], is_causal=False, training=False)
    out, _ = sdpa_attention_forward(module, q, k, v, allowed[None, None], scaling=scale, is_causal=False)
    return out.transpose(1, 2)  # (B, Nq, H, hd) -> (B, H, Nq, hd)


def sdpa_backend(backend: SDPBackend) -> Callable:
    def attend(q, k, v, allowed, scale):
        groups = q.shape[1] // k.shape[1]
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, repeat_heads(k, groups), repeat_heads(v, groups),
                                                  attn_mask=allowed[None, None], scale=scale)
    return attend


def sdpa_gqa(q, k, v, allowed, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[None, None], scale=scale, enable_gqa=True)


def eager_grouped(q, k, v, allowed, scale):
    B, H, Nq, hd = q.shape
    Hkv = k.shape[1]
    grouped = q.reshape(B, Hkv, H // Hkv * Nq, hd)  # query heads h = g * (H / Hkv) + i share key head g
    scores = (grouped @ k.transpose(-1, -2)) * scale  # (B, Hkv, H/Hkv * Nq, Nk)
    scores = scores.view(B, Hkv, H // Hkv, Nq, -1).masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = scores.float().softmax(-1).to(q.dtype).view(B, Hkv, H // Hkv * Nq, -1)
    return (probs @ v).view(B, H, Nq, hd)


def flash_pieces(shape: Shape) -> Callable:
    """One lower-right causal SDPA call per piece of ``shape`` (its key ranges joined where there are several)."""
    def keys_of(x, ranges):
        if len(ranges) == 1:
            return x[:, :, ranges[0][0]:ranges[0][1]]
        return torch.cat([x[:, :, a:b] for a, b in ranges], 2)

    def attend(q, k, v, allowed, scale):
        outs = []
        for a, b, ranges in shape.pieces:
            keys, values = keys_of(k, ranges), keys_of(v, ranges)
            bias = causal_lower_right(b - a, keys.shape[2])
            outs.append(F.scaled_dot_product_attention(q[:, :, a:b], keys, values, attn_mask=bias, scale=scale,
                                                       enable_gqa=True))
        return torch.cat(outs, dim=2)
    return attend


def methods(shape: Shape) -> dict[str, Callable]:
    return {"hf_sdpa": hf_sdpa, **{f"sdpa_{n}": sdpa_backend(b) for n, b in BACKENDS.items()},
            "sdpa_gqa": sdpa_gqa, "eager_grouped": eager_grouped, "flash_pieces": flash_pieces(shape)}


def reference(q, k, v, allowed, scale):
    """fp32 masked softmax attention with the key heads repeated (the definition every method must meet)."""
    groups = q.shape[1] // k.shape[1]
    q, k, v = q.float(), repeat_heads(k, groups).float(), repeat_heads(v, groups).float()
    scores = (q @ k.transpose(-1, -2)) * scale
    return scores.masked_fill(~allowed, -math.inf).softmax(-1) @ v


def timer(device: torch.device) -> Callable[[Callable], float]:
    """Seconds one call takes: CUDA events on a GPU (device time), elsewhere the wall clock
    (:func:`analysis.bench.timed`)."""
    if device.type != "cuda":
        return timed

    def cuda_time(fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    return cuda_time


def run(shapes: list[Shape], heads: int, kv_heads: int, head_dim: int, device: str, dtype: torch.dtype,
        repeats: int, warmup: int, seed: int = 0) -> list[dict]:
    """Every method on every shape: median seconds, ratio to ``hf_sdpa``, max |diff| to the fp32 reference."""
    device = torch.device(device)
    clock = timer(device)
    scale = head_dim ** -0.5
    rows = []
    for shape in shapes:
        Nq, Nk = shape.allowed.shape
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(1, h, n, head_dim, generator=g).to(device, dtype)
                   for h, n in ((heads, Nq), (kv_heads, Nk), (kv_heads, Nk)))
        allowed = shape.allowed.to(device)
        truth = reference(q, k, v, allowed, scale)
        current = None
        for name, attend in methods(shape).items():
            row = {"shape": shape.name, "queries": Nq, "keys": Nk, "method": name}
            try:
                out = attend(q, k, v, allowed, scale)
            except RuntimeError as error:  # a backend that refuses these inputs (e.g. cuDNN on the CPU)
                rows.append({**row, "error": str(error).splitlines()[0][:120]})
                continue
            row["max_abs_diff"] = (out.float() - truth).abs().max().item()
            for _ in range(warmup):
                attend(q, k, v, allowed, scale)
            call = functools.partial(attend, q, k, v, allowed, scale)
            row["median_s"] = statistics.median(clock(call) for _ in range(repeats))
            if name == "hf_sdpa":
                current = row["median_s"]
            row["vs_hf_sdpa"] = row["median_s"] / current if current else None
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    header = (f"{'shape':10} {'queries':>7} {'keys':>6} {'method':15} {'median us':>10} {'vs hf_sdpa':>10} "
              f"{'max |diff| vs fp32':>18}")
    lines = [header]
    for r in rows:
        head = f"{r['shape']:10} {r['queries']:>7} {r['keys']:>6} {r['method']:15}"
        if "error" in r:
            lines.append(f"{head} refused: {r['error']}")
        else:
            ratio = f"{r['vs_hf_sdpa']:.2f}" if r["vs_hf_sdpa"] is not None else "-"
            lines.append(f"{head} {r['median_s'] * 1e6:>10.1f} {ratio:>10} {r['max_abs_diff']:>18.2e}")
    return "\n".join(lines)
