"""An independent reference for token reduction (FastV, PyramidDrop).

Plain loops, one sample at a time, padding removed: the decoder is recomputed from the weights
(helpers of tests/reference.py) on the list of alive tokens, each layer with an explicit (m, m) mask,
and the ranking is an explicit per-head softmax of the ranking token's scores, sorted in Python.
Shares no code with ``analysis``; reads only the weights and the embeddings / position ids HF feeds its
language model (image merging is HF's, not under test).
"""

from __future__ import annotations

import math

import torch
from reference import language_model_inputs, linear, rms_norm, rotary


def kept_count(method, keep, n_vision, stage):
    """FastV ceil(keep * n); PyramidDrop int(n * keep**stage) as its official code (Python floats)."""
    if method == "fastv":
        return math.ceil(keep * n_vision)
    return int(n_vision * keep**stage)


def last_token_probs(q_row, keys, allowed, heads, kv_heads, hd):
    """Mean over heads of the explicit softmax of one query row. q_row: (heads, hd); keys: (m, kv_heads, hd)."""
    group = heads // kv_heads
    total = torch.zeros(keys.shape[0], dtype=torch.float64)
    for h in range(heads):
        scores = (keys[:, h // group, :] @ q_row[h]) / math.sqrt(hd)  # (m,)
        scores = scores.double()
        scores[~allowed] = -math.inf
        weights = torch.exp(scores - scores.max())
        total += weights / weights.sum()
    return total / heads


def choose(probs, alive, vision, count):
    """The ``count`` alive vision tokens of highest probability (ties: lower index), by Python sort."""
    candidates = [i for i, token in enumerate(alive) if vision[token]]
    best = sorted(candidates, key=lambda i: (-float(probs[i]), i))[:count]
    return {alive[i] for i in best}


def reference_sample(lm, lm_head, config, embeds, positions, vision, method, layers, keep, position_mode,
                     rank_token=None, stop_at=None):
    """One sample without padding: embeds (n, D), positions (n,) original position ids, vision (n,) bool.

    ``rank_token``: the index of the token whose attention ranks (default the last one; the last prompt
    token when the sequence continues with generated tokens). Returns (logits over the alive tokens in
    order (m, V), their indices into 0..n-1, per stage the sorted indices of the kept vision tokens).
    ``stop_at``: return (hidden states (m, D) entering that layer after its drop, alive indices, positions)
    instead.
    """
    n = embeds.shape[0]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    hd = config.hidden_size // heads
    theta = config.rope_parameters["rope_theta"]
    eps = config.rms_norm_eps
    rank_token = n - 1 if rank_token is None else rank_token
    boundaries = [layers[0]] if method == "fastv" else list(layers)
    n_vision = int(vision.sum())
    alive = list(range(n))
    pos = positions.clone()
    h = embeds.clone()
    kept_per_stage, fastv_probs = [], None
    for index, layer in enumerate(lm.layers):
        attn = layer.self_attn
        if index in boundaries:
            stage = boundaries.index(index) + 1
            r = alive.index(rank_token)
            causal = torch.tensor([a <= rank_token for a in alive])
            if method == "fastv":
                probs = fastv_probs
            else:  # this layer's own norm, q on the ranking row, k on every alive row, current positions
                x = rms_norm(h, layer.input_layernorm.weight, eps)
                q_row = rotary(linear(x[r:r + 1], attn.q_proj).view(1, heads, hd), pos[r:r + 1], theta)[0]
                keys = rotary(linear(x, attn.k_proj).view(len(alive), kv_heads, hd), pos, theta)
                probs = last_token_probs(q_row, keys, causal, heads, kv_heads, hd)
            kept = choose(probs, alive, vision, kept_count(method, keep, n_vision, stage))
            kept_per_stage.append(sorted(kept))
            rows = [i for i, token in enumerate(alive) if not vision[token] or token in kept]
            alive = [alive[i] for i in rows]
            h = h[rows]
            if position_mode == "renumber":
                pos = torch.arange(len(alive))
            else:
                pos = positions[alive]
        if index == stop_at:
            return h, alive, pos
        m = len(alive)
        x = rms_norm(h, layer.input_layernorm.weight, eps)
        q = rotary(linear(x, attn.q_proj).view(m, heads, hd), pos, theta)
        k = rotary(linear(x, attn.k_proj).view(m, kv_heads, hd), pos, theta)
        v = linear(x, attn.v_proj).view(m, kv_heads, hd)
        if method == "fastv" and index == boundaries[0] - 1:
            r = alive.index(rank_token)
            causal = torch.tensor([a <= rank_token for a in alive])
            fastv_probs = last_token_probs(q[r], k, causal, heads, kv_heads, hd)
        allowed = torch.tensor([[alive[j] <= alive[i] for j in range(m)] for i in range(m)])
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("ihd,jhd->hij", q, k) / hd**0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = torch.einsum("hij,jhd->ihd", scores.softmax(-1), v).reshape(m, heads * hd)
        h = h + linear(out, attn.o_proj)
        x = rms_norm(h, layer.post_attention_layernorm.weight, eps)
        mlp = layer.mlp
        h = h + linear(torch.nn.functional.silu(linear(x, mlp.gate_proj)) * linear(x, mlp.up_proj), mlp.down_proj)
    return linear(rms_norm(h, lm.norm.weight, eps), lm_head), alive, kept_per_stage


def vision_tokens(model, batch, embeds, newline_tokens):
    """(B, T) bool: image tokens, without LLaVA-NeXT's newline tokens when they count as text."""
    image = batch["input_ids"] == model.config.image_token_id
    if newline_tokens == "text" and hasattr(model.model, "image_newline"):
        image = image & ~(embeds == model.model.image_newline).all(-1)  # they carry exactly that vector
    return image


def reference_batch(model, batch, method, layers, keep, position_mode="original", newline_tokens="vision",
                    **forward_kwargs):
    """Per sample (padding dropped): (logits (m, V) of the alive tokens, their indices into the padded
    sequence, per stage the padded-sequence indices of the kept vision tokens)."""
    embeds, positions = language_model_inputs(model, batch, **forward_kwargs)
    vision = vision_tokens(model, batch, embeds, newline_tokens)
    valid = batch["attention_mask"].bool()
    out = []
    with torch.no_grad():
        for b in range(embeds.shape[0]):
            where = valid[b].nonzero().flatten()
            logits, alive, kept = reference_sample(
                model.model.language_model, model.lm_head, model.config.text_config, embeds[b][where],
                positions[b][where], vision[b][where], method, list(layers), keep, position_mode,
            )
            out.append((logits, where[alive], [where[torch.tensor(k, dtype=torch.long)].tolist() for k in kept]))
    return out


def reference_greedy(model, batch, method, layers, keep, position_mode, steps, suppressed=(),
                     newline_tokens="vision"):
    """Greedy decoding, left-padded batch, by recomputing prompt + generated tokens from scratch each
    step with the ranking token fixed at the prompt's last token (what a cache built at prefill computes);
    ``suppressed`` ids are never chosen. Returns (ids (B, T + steps), per step (B, V) logits)."""
    embeds, positions = language_model_inputs(model, batch, position_ids=(batch["attention_mask"].cumsum(-1) - 1)
                                               .clamp(min=0))
    vision = vision_tokens(model, batch, embeds, newline_tokens)
    valid = batch["attention_mask"].bool()
    table = model.model.language_model.embed_tokens.weight
    ids = batch["input_ids"].clone()
    per_step = []
    with torch.no_grad():
        generated = [[] for _ in range(ids.shape[0])]
        for _ in range(steps):
            rows = []
            for b in range(ids.shape[0]):
                where = valid[b].nonzero().flatten()
                new = torch.tensor(generated[b], dtype=torch.long)
                e = torch.cat([embeds[b][where], table[new]])
                n_prompt = len(where)
                p = torch.cat([positions[b][where], positions[b][where][-1] + 1 + torch.arange(len(new))])
                vis = torch.cat([vision[b][where], torch.zeros(len(new), dtype=torch.bool)])
                logits, _, _ = reference_sample(
                    model.model.language_model, model.lm_head, model.config.text_config, e, p, vis, method,
                    list(layers), keep, position_mode, rank_token=n_prompt - 1,
                )
                rows.append(logits[-1])
            last = torch.stack(rows)
            per_step.append(last)
            choice = last.masked_fill(torch.isin(torch.arange(last.shape[-1]), torch.tensor(suppressed)), -torch.inf)
            choice = choice.argmax(-1)
            for b in range(ids.shape[0]):
                generated[b].append(int(choice[b]))
            ids = torch.cat([ids, choice[:, None]], dim=1)
    return ids, per_step
