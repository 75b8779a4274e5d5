"""An independent reference for the ablation operators on Qwen2-VL / Qwen2.5-VL / Qwen3-VL.

A plain re-implementation of the Qwen-VL text decoder (RMSNorm, M-RoPE, GQA with q/k/v biases or Qwen3's
per-head q/k RMSNorm, SwiGLU), one sample at a time with its padding removed; each op written as an explicit
boolean (N, N) mask and an explicit choice of which rows receive each sub-layer's update. The M-RoPE rotation
is computed here from the model's ``get_rope_index`` positions ``(3, B, T)`` and the config's ``mrope_section``
(contiguous T | H | W chunks of the rotary frequencies for Qwen2/2.5-VL, interleaved for Qwen3-VL, as
docs/qwen.md states them). DeepStack (Qwen3-VL): the tower's extra feature maps are added to the vision rows
after decoder layers 0 .. n-1, here by a loop over the sample's vision positions.

It shares no code with ``analysis``: it reads the weights, and takes from a vanilla HF run only what the
tower and the feature merging produce (``inputs_embeds``, ``deepstack_visual_embeds``, ``visual_pos_masks``).
"""

from __future__ import annotations

import torch


def rms_norm(x, weight, eps):
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def linear(x, module):
    y = x @ module.weight.T
    return y + module.bias if module.bias is not None else y


def frequency_axes(half: int, section, interleaved: bool) -> list[int]:
    """For each of the ``half`` rotary frequencies, the M-RoPE axis (0 temporal, 1 height, 2 width) it reads."""
    assert sum(section) == half
    if not interleaved:  # contiguous: the first section[0] frequencies T, the next section[1] H, the rest W
        return [0] * section[0] + [1] * section[1] + [2] * section[2]
    axes = []
    for i in range(half):
        if i % 3 == 1 and i < 3 * section[1]:
            axes.append(1)
        elif i % 3 == 2 and i < 3 * section[2]:
            axes.append(2)
        else:
            axes.append(0)
    return axes


def mrope(x, positions, theta, section, interleaved):
    """x: (N, heads, hd); positions: (3, N) -- every row rotated by its own (t, h, w) position."""
    hd = x.shape[-1]
    half = hd // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    angles = torch.empty(x.shape[0], half)
    for i, axis in enumerate(frequency_axes(half, section, interleaved)):
        angles[:, i] = positions[axis].float() * inv_freq[i]
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None, :]
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None, :]
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def op_mask(op, vision):
    """(N, N) bool: pairs the op keeps (before causality). vision: (N,) bool."""
    qv, kv = vision[:, None], vision[None, :]
    if op == "mask_v2v":
        return ~(qv & kv)
    if op == "drop_v2t":
        return ~(~qv & kv)
    return torch.ones(len(vision), len(vision), dtype=torch.bool)


def reference_sample(lm, lm_head, config, embeds, positions, vision, op, layers, deepstack=()):
    """Logits (N, V) of one sample without padding. embeds: (N, D); positions: (3, N); vision: (N,);
    deepstack: per early layer an (N, D) tensor added after that layer (zero on text rows)."""
    n = embeds.shape[0]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = config.rope_parameters
    theta, section = rope["rope_theta"], list(rope["mrope_section"])
    interleaved = bool(rope.get("mrope_interleaved", False))
    eps = config.rms_norm_eps
    causal = torch.ones(n, n).tril().bool()
    h = embeds.clone()
    for index, layer in enumerate(lm.layers):
        active = op if index in layers else "none"
        attn = layer.self_attn
        x = rms_norm(h, layer.input_layernorm.weight, eps)
        q = linear(x, attn.q_proj).view(n, heads, hd)
        k = linear(x, attn.k_proj).view(n, kv_heads, hd)
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before the rotation
            q = rms_norm(q, attn.q_norm.weight, attn.q_norm.variance_epsilon)
            k = rms_norm(k, attn.k_norm.weight, attn.k_norm.variance_epsilon)
        q = mrope(q, positions, theta, section, interleaved)
        k = mrope(k, positions, theta, section, interleaved)
        v = linear(x, attn.v_proj).view(n, kv_heads, hd)
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        allowed = (causal & op_mask(active, vision)) | torch.eye(n, dtype=torch.bool)
        scores = torch.einsum("ihd,jhd->hij", q, k) / hd**0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = torch.einsum("hij,jhd->ihd", scores.softmax(-1), v).reshape(n, heads * hd)
        out = linear(out, attn.o_proj)
        attn_rows = ~vision if active in ("skip_attn", "skip_attn_ffn") else torch.ones(n, dtype=torch.bool)
        h = h + out * attn_rows[:, None]
        x = rms_norm(h, layer.post_attention_layernorm.weight, eps)
        mlp = layer.mlp
        ffn = linear(torch.nn.functional.silu(linear(x, mlp.gate_proj)) * linear(x, mlp.up_proj), mlp.down_proj)
        ffn_rows = ~vision if active in ("skip_ffn", "skip_attn_ffn") else torch.ones(n, dtype=torch.bool)
        h = h + ffn * ffn_rows[:, None]
        if index < len(deepstack):  # DeepStack: the ops never move tokens, so the features stay where they were
            h = h + deepstack[index]
    return linear(rms_norm(h, lm.norm.weight, eps), lm_head)


def language_model_inputs(model, batch):
    """What the HF model hands its language model in a vanilla run: inputs_embeds (B, T, D) and, for
    Qwen3-VL, visual_pos_masks (B, T) and the list of deepstack_visual_embeds (n_vision, D)."""
    captured = {}

    def hook(module, args, kwargs):
        captured.update(kwargs)

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return captured["inputs_embeds"], captured.get("visual_pos_masks"), captured.get("deepstack_visual_embeds")


def deepstack_rows(visual_pos_masks, deepstack_visual_embeds, b, T, D) -> list[torch.Tensor]:
    """Per DeepStack layer, a (T, D) tensor holding sample ``b``'s rows of the feature map at its vision
    positions (the features are listed over the batch's vision positions in row-major order)."""
    if deepstack_visual_embeds is None:
        return []
    start = int(visual_pos_masks[:b].sum())
    cols = visual_pos_masks[b].nonzero().flatten().tolist()
    out = []
    for feature in deepstack_visual_embeds:
        full = torch.zeros(T, D)
        for k, col in enumerate(cols):
            full[col] = feature[start + k]
        out.append(full)
    return out


def reference_logits(model, batch, op, layers, *, with_deepstack=True):
    """Per-sample reference logits: a list of (n_valid_b, V) tensors, padding positions dropped."""
    embeds, visual_pos_masks, deepstack = language_model_inputs(model, batch)
    keys = ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "attention_mask",
            "second_per_grid_ts")
    with torch.no_grad():
        positions, _ = model.model.get_rope_index(**{k: batch[k] for k in keys if k in batch})  # (3, B, T)
    config = model.config
    ids = batch["input_ids"]
    vision = (ids == config.image_token_id) | (ids == config.video_token_id)
    valid = batch["attention_mask"].bool()
    B, T, D = embeds.shape
    out = []
    with torch.no_grad():
        for b in range(B):
            keep = valid[b]
            extra = deepstack_rows(visual_pos_masks, deepstack, b, T, D) if with_deepstack else []
            out.append(reference_sample(
                model.model.language_model, model.lm_head, config.text_config, embeds[b][keep],
                positions[:, b][:, keep], vision[b][keep], op, set(layers), [e[keep] for e in extra],
            ))
    return out


# ----------------------------------------------------------------------------- token reduction (FastV, PyramidDrop)

def last_token_probs(q_row, keys, allowed, heads, kv_heads, hd):
    """Mean over heads of the explicit float64 softmax of one (rotated) query row over (rotated) keys (m, kv, hd)."""
    group = heads // kv_heads
    total = torch.zeros(keys.shape[0], dtype=torch.float64)
    for h in range(heads):
        scores = ((keys[:, h // group, :] @ q_row[h]) / hd**0.5).double()
        scores[~allowed] = -float("inf")
        weights = torch.exp(scores - scores.max())
        total += weights / weights.sum()
    return total / heads


def kept_count(method, keep, n_vision, stage):
    """FastV ceil(keep * n); PyramidDrop int(n * keep**stage), as the official code (Python floats)."""
    import math
    return math.ceil(keep * n_vision) if method == "fastv" else int(n_vision * keep**stage)


def reduced_sample(lm, lm_head, config, embeds, positions, vision, method, boundaries, keep, deepstack=(),
                   rank_token=None, stop_at=None):
    """FastV / PyramidDrop on one sample without padding: embeds (n, D); positions (3, n) from get_rope_index;
    vision (n,); deepstack: per early layer an (n, D) tensor (zero on text rows). The alive tokens are a Python
    list; at each boundary the ranking token's attention (FastV: layer K-1's; PyramidDrop: the boundary layer's
    own norm and q/k on the alive rows) picks the vision tokens kept, sorted by (-prob, index); every kept row
    keeps its own (t, h, w) position; DeepStack feature i is added after layer i to each alive row (a pruned
    row's feature is gone with it). Returns (logits (m, V) of the alive tokens, their indices, per stage the
    sorted kept vision indices). ``stop_at=L``: stop before layer L runs (after its drop, if L is a boundary) and
    return (hidden (m, D) of the alive tokens entering layer L, their indices, the kept indices so far)."""
    n = embeds.shape[0]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = config.rope_parameters
    theta, section = rope["rope_theta"], list(rope["mrope_section"])
    interleaved = bool(rope.get("mrope_interleaved", False))
    eps = config.rms_norm_eps
    rank_token = n - 1 if rank_token is None else rank_token
    n_vision = int(vision.sum())
    alive = list(range(n))
    h = embeds.clone()
    kept_per_stage, fastv_probs = [], None

    def project(layer, x, pos):
        attn = layer.self_attn
        m = x.shape[0]
        q = linear(x, attn.q_proj).view(m, heads, hd)
        k = linear(x, attn.k_proj).view(m, kv_heads, hd)
        if hasattr(attn, "q_norm"):
            q = rms_norm(q, attn.q_norm.weight, attn.q_norm.variance_epsilon)
            k = rms_norm(k, attn.k_norm.weight, attn.k_norm.variance_epsilon)
        return mrope(q, pos, theta, section, interleaved), mrope(k, pos, theta, section, interleaved)

    for index, layer in enumerate(lm.layers):
        attn = layer.self_attn
        if index in boundaries:
            stage = boundaries.index(index) + 1
            if method == "fastv":
                probs = fastv_probs
            else:
                x = rms_norm(h, layer.input_layernorm.weight, eps)
                q, k = project(layer, x, positions[:, alive])
                probs = last_token_probs(q[alive.index(rank_token)], k,
                                         torch.tensor([a <= rank_token for a in alive]), heads, kv_heads, hd)
            candidates = [i for i, token in enumerate(alive) if vision[token]]
            best = sorted(candidates, key=lambda i: (-float(probs[i]), i))[:kept_count(method, keep, n_vision, stage)]
            kept = {alive[i] for i in best}
            kept_per_stage.append(sorted(kept))
            rows = [i for i, token in enumerate(alive) if not vision[token] or token in kept]
            alive = [alive[i] for i in rows]
            h = h[rows]
        if index == stop_at:
            return h, alive, kept_per_stage
        m = len(alive)
        x = rms_norm(h, layer.input_layernorm.weight, eps)
        q, k = project(layer, x, positions[:, alive])
        v = linear(x, attn.v_proj).view(m, kv_heads, hd)
        if method == "fastv" and index == boundaries[0] - 1:
            fastv_probs = last_token_probs(q[alive.index(rank_token)], k,
                                           torch.tensor([a <= rank_token for a in alive]), heads, kv_heads, hd)
        at = torch.tensor(alive)
        allowed = at[None, :] <= at[:, None]  # causal by original index
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("ihd,jhd->hij", q, k) / hd**0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = torch.einsum("hij,jhd->ihd", scores.softmax(-1), v).reshape(m, heads * hd)
        h = h + linear(out, attn.o_proj)
        x = rms_norm(h, layer.post_attention_layernorm.weight, eps)
        mlp = layer.mlp
        h = h + linear(torch.nn.functional.silu(linear(x, mlp.gate_proj)) * linear(x, mlp.up_proj), mlp.down_proj)
        if index < len(deepstack):
            h = h + deepstack[index][alive]
    return linear(rms_norm(h, lm.norm.weight, eps), lm_head), alive, kept_per_stage


def sample_inputs(model, batch, *, with_deepstack=True, generated=None):
    """Per sample b (padding dropped): ``(where, embeds, positions, vision, deepstack, rank)``, the sample's real
    positions in the padded sequence, its input embeddings (m, D), M-RoPE positions (3, m), vision mask (m,),
    DeepStack rows and the ranking row (None, or the prompt's last when ``generated[b]`` token ids are appended:
    text, positions continuing the last prompt position on all three axes, as a KV cache built at the prefill
    computes them)."""
    embeds, visual_pos_masks, deepstack = language_model_inputs(model, batch)
    keys = ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "attention_mask",
            "second_per_grid_ts")
    with torch.no_grad():
        positions, _ = model.model.get_rope_index(**{k: batch[k] for k in keys if k in batch})  # (3, B, T)
    config = model.config
    ids = batch["input_ids"]
    vision = (ids == config.image_token_id) | (ids == config.video_token_id)
    valid = batch["attention_mask"].bool()
    table = model.model.language_model.embed_tokens.weight
    B, T, D = embeds.shape
    for b in range(B):
        where = valid[b].nonzero().flatten()
        extra = deepstack_rows(visual_pos_masks, deepstack, b, T, D) if with_deepstack else []
        e, p, vis, ds = embeds[b][where], positions[:, b][:, where], vision[b][where], [x[where] for x in extra]
        rank = None
        if generated is not None:
            new = torch.tensor(generated[b], dtype=torch.long)
            rank = len(where) - 1
            e = torch.cat([e, table[new]])
            p = torch.cat([p, p[:, -1:] + 1 + torch.arange(len(new))[None, :]], dim=1)
            vis = torch.cat([vis, torch.zeros(len(new), dtype=torch.bool)])
            ds = [torch.cat([x, torch.zeros(len(new), D)]) for x in ds]
        yield where, e, p, vis, ds, rank


def reduced_reference(model, batch, method, boundaries, keep, *, with_deepstack=True, generated=None):
    """Per sample (padding dropped): (logits (m, V) of the alive tokens, their indices into the padded sequence,
    per stage the padded-sequence indices of the kept vision tokens). ``generated``: per sample a list of token
    ids appended after the prompt (text, positions continuing the last prompt position on all three axes; the
    ranking token stays the prompt's last)."""
    out = []
    with torch.no_grad():
        for where, e, p, vis, ds, rank in sample_inputs(model, batch, with_deepstack=with_deepstack,
                                                        generated=generated):
            logits, alive, kept = reduced_sample(model.model.language_model, model.lm_head, model.config.text_config,
                                                 e, p, vis, method, list(boundaries), keep, ds, rank)
            out.append((logits, alive, [where[torch.tensor(k, dtype=torch.long)].tolist() for k in kept]))
    return out
