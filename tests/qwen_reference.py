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
