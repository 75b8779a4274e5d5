"""An independent reference for the ablation operators.

A plain re-implementation of the Llama-family decoder (RMSNorm, rotary embedding, GQA, SwiGLU),
one sample at a time, padding removed, with the op written as an explicit boolean (N, N) mask and
an explicit choice of which rows receive each sub-layer's update. It shares no code with
``analysis``: it reads only the model's weights, and takes the input embeddings and position ids
the HF model feeds its language model (image merging is HF's, not under test).
"""

from __future__ import annotations

import torch


def rms_norm(x, weight, eps):
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def linear(x, module):
    y = x @ module.weight.T
    return y + module.bias if module.bias is not None else y


def rotary(x, positions, theta):
    """x: (N, heads, hd), positions: (N,)."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    angles = positions.float()[:, None] * inv_freq[None, :]  # (N, hd/2)
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None, :]
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None, :]
    half = hd // 2
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


def reference_sample(lm, lm_head, config, embeds, positions, vision, op, layers):
    """Logits (N, V) of one sample without padding. embeds: (N, D); positions, vision: (N,)."""
    n = embeds.shape[0]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    hd = config.hidden_size // heads
    theta = config.rope_parameters["rope_theta"]
    eps = config.rms_norm_eps
    causal = torch.ones(n, n).tril().bool()
    window = getattr(config, "sliding_window", None)
    if window is not None:  # key within the last `window` positions of the query
        causal &= ~torch.ones(n, n).tril(-window).bool()
    h = embeds.clone()
    for index, layer in enumerate(lm.layers):
        active = op if index in layers else "none"
        attn = layer.self_attn
        x = rms_norm(h, layer.input_layernorm.weight, eps)
        q = rotary(linear(x, attn.q_proj).view(n, heads, hd), positions, theta)
        k = rotary(linear(x, attn.k_proj).view(n, kv_heads, hd), positions, theta)
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
    return linear(rms_norm(h, lm.norm.weight, eps), lm_head)


def language_model_inputs(model, batch, **forward_kwargs):
    """(inputs_embeds, position_ids) as the HF model hands them to its language model, from a vanilla run."""
    captured = {}

    def hook(module, args, kwargs):
        captured.update(kwargs)

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch, **forward_kwargs)
    finally:
        handle.remove()
    embeds = captured["inputs_embeds"]
    positions = captured.get("position_ids")
    if positions is None:
        positions = torch.arange(embeds.shape[1])[None]
    return embeds, positions.expand(embeds.shape[0], -1)


def reference_logits(model, batch, op, layers, newline_tokens="vision", **forward_kwargs):
    """Per-sample reference logits: a list of (n_valid_b, V) tensors, padding positions dropped."""
    embeds, positions = language_model_inputs(model, batch, **forward_kwargs)
    config = model.config.text_config
    image = batch["input_ids"] == model.config.image_token_id
    if newline_tokens == "text" and hasattr(model.model, "image_newline"):
        # Newline tokens carry exactly the image_newline vector.
        image = image & ~(embeds == model.model.image_newline).all(-1)
    valid = batch["attention_mask"].bool()
    out = []
    with torch.no_grad():
        for b in range(embeds.shape[0]):
            keep = valid[b]
            out.append(reference_sample(
                model.model.language_model, model.lm_head, config, embeds[b][keep], positions[b][keep],
                image[b][keep], op, set(layers),
            ))
    return out
