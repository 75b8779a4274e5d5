"""Matrix-product FLOPs of a ProxyV decoder layer, written next to what :mod:`.runtime` executes.

Conventions as :mod:`analysis.flops`: an (m, k) @ (k, n) product costs 2·m·k·n (torch's
``FlopCounterMode``); norms, rotary, softmax, interpolation, gathers and additions are not counted.
Dims: D hidden, H / Hkv query / key-value heads, hd head dim, F FFN width, I light width; shapes
from :func:`analysis.proxyv.proxyv_shapes`: B, T, P, Nv, Nt, C crops, S cells, n proxies per crop.

One ProxyV layer executes, on the padded batch (``executed``)::

    q_proj, o_proj        B·(P+Nt) rows        2·rows·D·H·hd each      queries = [proxies, text]
    k_proj, v_proj        B·(T+P) rows         2·rows·D·Hkv·hd each    keys = [sequence (cached), proxies]
    attn_scores, values   B·H·(P+Nt)·(T+P)     2·hd per (row, key)     full rectangle; K/V repeated to H heads
    gate, up, down_proj   B·(P+Nt) rows        2·rows·D·F each
    light input_proj      B·Nv rows            2·rows·D·I              GuidedUpdate on full vision tokens
    light context_proj    B·P rows             2·rows·D·I              on proxies, before gather / splat to cells
    light fuse            B·Nv rows            2·rows·2I·I
    light out_proj        B·Nv rows            2·rows·I·D
    splat (learned)       C·S·n·I              2 per multiply-add      (C, S, n) @ (C, n, I)
  start layer only, learned:
    init key_proj         C·S rows             2·rows·D·I
    init logits           C·n·S·I              queries (n, I) x keys (C, S, I)
    init pooling          C·n·S·D              attn (C, n, S) @ cells (C, S, D)

``theoretical`` counts per sample without padding or filler slots (P_b, Nv_b, Nt_b, T_b = Nv_b + Nt_b)
and attention only over allowed pairs (``sample_pairs``), as the theoretical figure of
:mod:`analysis.flops`.
"""

from __future__ import annotations


def text_dims(config) -> dict:
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    return {"D": text.hidden_size, "H": heads, "Hkv": getattr(text, "num_key_value_heads", None) or heads,
            "hd": getattr(text, "head_dim", None) or text.hidden_size // heads, "F": text.intermediate_size}


def _layer(d: dict, B: int, T: int, P: int, Nv: int, Nt: int, keys_per_row: int | None, pairs: int | None,
           I: int, C: int, S: int, n: int, learned: bool, first: bool) -> dict[str, int]:
    D, H, Hkv, hd, F = d["D"], d["H"], d["Hkv"], d["hd"], d["F"]
    rows, kv_rows = B * (P + Nt), B * (T + P)
    attention = B * H * (P + Nt) * keys_per_row * 2 * hd if pairs is None else 2 * H * hd * pairs
    out = {
        "q_proj": 2 * rows * D * H * hd, "k_proj": 2 * kv_rows * D * Hkv * hd, "v_proj": 2 * kv_rows * D * Hkv * hd,
        "o_proj": 2 * rows * H * hd * D, "attn_scores": attention, "attn_values": attention,
        "gate_proj": 2 * rows * D * F, "up_proj": 2 * rows * D * F, "down_proj": 2 * rows * F * D,
        "light_input_proj": 2 * B * Nv * D * I, "light_context_proj": 2 * B * P * D * I,
        "light_fuse": 2 * B * Nv * 2 * I * I, "light_out_proj": 2 * B * Nv * I * D,
    }
    if learned:
        out["splat"] = 2 * C * S * n * I
        if first:
            out.update(init_key_proj=2 * C * S * D * I, init_logits=2 * C * n * S * I, init_pooling=2 * C * n * S * D)
    return out


def proxyv_layer_flops(config, shapes, first: bool, theoretical: bool = False) -> dict[str, int]:
    """FLOPs by component of one ProxyV layer in a prefill (``first``: the start layer).

    ``config``: the LLaVA config; ``shapes``: :class:`analysis.proxyv.ProxyVShapes` of the batch.
    """
    d, s = text_dims(config), shapes
    crop = {"I": s.light_width, "C": s.crops, "S": s.cells_per_crop, "n": s.proxies_per_crop,
            "learned": s.learned, "first": first}
    if not theoretical:
        return _layer(d, s.batch, s.rows, s.proxies, s.vision_rows, s.text_rows, s.rows + s.proxies, None, **crop)
    total: dict[str, int] = {}
    for b, (P, Nv, Nt, pairs) in enumerate(zip(s.sample_proxies, s.sample_vision, s.sample_text, s.sample_pairs)):
        # Crop-level work (learned splat / init) is shared by the batch: count it once, with sample 0.
        part = _layer(d, 1, Nv + Nt, P, Nv, Nt, None, pairs, **{**crop, "C": crop["C"] if b == 0 else 0})
        total = {k: total.get(k, 0) + v for k, v in part.items()}
    return total


def baseline_layer_flops(config, tokens: int) -> int:
    """Theoretical FLOPs of one plain decoder layer on ``tokens`` tokens (causal attention, one sample)."""
    d = text_dims(config)
    D, H, Hkv, hd, F = d["D"], d["H"], d["Hkv"], d["hd"], d["F"]
    projections = 2 * tokens * D * (2 * H * hd + 2 * Hkv * hd) + 3 * 2 * tokens * D * F
    return projections + 2 * 2 * H * hd * tokens * (tokens + 1) // 2
