"""An independent reference for ProxyV on Qwen2-VL / Qwen2.5-VL / Qwen3-VL: plain loops, one sample at a time.

Padding removed. Below the start layer: the plain Qwen-VL decoder (M-RoPE from the model's ``get_rope_index``
positions, DeepStack features added after the early layers). From the start layer on, the sample is repacked as
[full vision tokens, proxies, text], the mask written pair by pair from docs/qwen.md's rules, and every proxy built
cell by cell: one proxy set per image and per temporal block of a video, each block's grid padded up to a
multiple of f by repeating its last row / column; a spatial proxy is the bilinear mix of its block's cells and its
M-RoPE position the same mix of their (t, h, w) positions; a learned proxy sits at the mean position of its block.

Which tokens form which grid is derived here from ``image_grid_thw`` / ``video_grid_thw`` alone (the k-th vision
tokens of a kind in batch order belong to the k-th grid rows, raster order); nothing is taken from ``analysis``.
"""

from __future__ import annotations

import torch
from proxyv_reference import bilinear_taps, ffn, guided_update, learned_crop_proxies
from qwen_reference import deepstack_rows, language_model_inputs, linear, mrope, rms_norm


def attention(layer, config, x_q, pos_q, x_kv, pos_kv, allowed):
    """Output (Nq, D) of queries x_q over x_kv under allowed (Nq, Nk); positions (3, N) (floats allowed)."""
    attn = layer.self_attn
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = config.rope_parameters
    args = (rope["rope_theta"], list(rope["mrope_section"]), bool(rope.get("mrope_interleaved", False)))
    q = linear(x_q, attn.q_proj).view(len(x_q), heads, hd)
    k = linear(x_kv, attn.k_proj).view(len(x_kv), kv_heads, hd)
    if hasattr(attn, "q_norm"):
        q = rms_norm(q, attn.q_norm.weight, attn.q_norm.variance_epsilon)
        k = rms_norm(k, attn.k_norm.weight, attn.k_norm.variance_epsilon)
    q, k = mrope(q, pos_q, *args), mrope(k, pos_kv, *args)
    v = linear(x_kv, attn.v_proj).view(len(x_kv), kv_heads, hd)
    k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
    scores = torch.einsum("ihd,jhd->hij", q, k) / hd**0.5
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return linear(torch.einsum("hij,jhd->ihd", probs, v).reshape(len(x_q), heads * hd), attn.o_proj)


def sample_grids(batch, config):
    """Per sample: [(first token position, [block grids (h, w) of padded positions])], in sequence order."""
    ids = batch["input_ids"]
    merge = config.vision_config.spatial_merge_size
    per_sample = [[] for _ in range(ids.shape[0])]
    for token, key in ((config.image_token_id, "image_grid_thw"), (config.video_token_id, "video_grid_thw")):
        where = (ids == token).nonzero().tolist()  # [(b, t)] in batch order
        cursor = 0
        for t, h, w in (batch.get(key) if batch.get(key) is not None else torch.zeros(0, 3)).tolist():
            h, w = int(h) // merge, int(w) // merge
            blocks = []
            for _ in range(int(t)):
                cells = where[cursor:cursor + h * w]
                cursor += h * w
                blocks.append(torch.tensor([p for _, p in cells]).view(h, w))
            per_sample[cells[0][0]].append((int(blocks[0][0, 0]), blocks))
    return [sorted(grids, key=lambda g: g[0]) for grids in per_sample]


def spatial_block_proxies(h, pos, grid, factor):
    """[(proxy (D,), position (3,), [cells of its f x f block])] of one block grid (h, w) of sample indices."""
    rows, cols = grid.shape
    H, W = -(-rows // factor) * factor, -(-cols // factor) * factor
    out = []
    for i in range(H // factor):
        for j in range(W // factor):
            block = [int(grid[r, c]) for r in range(i * factor, min((i + 1) * factor, rows))
                     for c in range(j * factor, min((j + 1) * factor, cols))]
            value, where = h.new_zeros(h.shape[1]), torch.zeros(3, dtype=torch.float64)
            for r, wr in bilinear_taps(i, factor, H):
                for c, wc in bilinear_taps(j, factor, W):
                    cell = int(grid[min(r, rows - 1), min(c, cols - 1)])  # padding repeats the last row / column
                    value = value + wr * wc * h[cell]
                    where = where + wr * wc * pos[:, cell].double()
            out.append((value, where.float(), block))
    return out


def proxyv_sample(model, embeds, positions, grids, deepstack):
    """Logits (n, V) of one unpadded sample: embeds (n, D), positions (3, n), grids as :func:`sample_grids`
    gives them (in unpadded indices), deepstack: per early layer an (n, D) addition."""
    lm, config = model.model.language_model, model.config.text_config
    L, eps = model.config.proxyv["start_layer"], config.rms_norm_eps
    n = len(embeds)
    h = embeds.clone()
    last = L if grids else len(lm.layers)
    for index in range(last):
        layer = lm.layers[index]
        x = rms_norm(h, layer.input_layernorm.weight, eps)
        h = h + attention(layer, config, x, positions, x, positions, torch.ones(n, n).tril().bool())
        h = h + ffn(layer, rms_norm(h, layer.post_attention_layernorm.weight, eps))
        if index < len(deepstack):
            h = h + deepstack[index]
    if not grids:
        return linear(rms_norm(h, lm.norm.weight, eps), model.lm_head)
    return proxyv_layers(model, h, positions, grids)


def proxyv_layers(model, h, positions, grids):
    """Logits (n, V) after the ProxyV layers L.. of one unpadded sequence h (n, D) entering layer L; positions
    (3, n); grids [(start, [block grids])]: a proxy sees the text before index ``start``; a block grid's cells
    are indices into h, -1 for a removed cell (learned proxies only: over the block's remaining cells, at
    their mean position; a block with no cell left has no proxy)."""
    lm, config = model.model.language_model, model.config.text_config
    settings, proxyv = model.config.proxyv, model.model.proxyv
    L, f, learned = settings["start_layer"], settings["reduce_factor"], settings["init"] == "learned"
    eps = config.rms_norm_eps
    n = len(h)
    proxies, proxy_pos, proxy_start, owner, splats = [], [], [], {}, {}
    for start, blocks in grids:
        for grid in blocks:
            if not (grid >= 0).any():
                continue
            if learned:
                values, cells, splat = learned_crop_proxies(h, grid, proxyv.initializer)
                centre = positions[:, cells].double().mean(1).float()
                for cell_i, cell in enumerate(cells):
                    splats[cell] = (len(proxies), splat[cell_i])
                made = [(values[k], centre, []) for k in range(len(values))]
            else:
                made = spatial_block_proxies(h, positions, grid, f)
            for value, where, cells in made:
                for cell in cells:
                    owner[cell] = len(proxies)
                proxies.append(value)
                proxy_pos.append(where)
                proxy_start.append(start)
    vision = sorted(splats if learned else owner)
    is_vision = set(vision)
    text = [i for i in range(n) if i not in is_vision]
    nv, npx = len(vision), len(proxies)
    packed = torch.cat([h[vision], torch.stack(proxies), h[text]])
    pos = torch.cat([positions[:, vision].float(), torch.stack(proxy_pos, 1), positions[:, text].float()], 1)
    rows = []
    for a in range(npx):  # proxy: no vision token; earlier proxies and itself; text before its grid
        rows.append([False] * nv + [b <= a for b in range(npx)] + [t < proxy_start[a] for t in text])
    for q in text:  # text: causal over vision and text, never proxies
        rows.append([v <= q for v in vision] + [False] * npx + [t <= q for t in text])
    allowed = torch.tensor(rows)
    for index in range(L, len(lm.layers)):
        layer, guide = lm.layers[index], proxyv.layers[str(index)]
        x = rms_norm(packed, layer.input_layernorm.weight, eps)
        queries = packed[nv:] + attention(layer, config, x[nv:], pos[:, nv:], x, pos, allowed)
        queries = queries + ffn(layer, rms_norm(queries, layer.post_attention_layernorm.weight, eps))
        new = queries[:npx]
        contexts = []
        for v in vision:
            if learned:
                first, weights = splats[v]
                contexts.append(weights @ new[first:first + len(weights)])
            else:
                contexts.append(new[owner[v]])
        packed = torch.cat([guided_update(guide, eps, packed[:nv], torch.stack(contexts)), queries])
    h = torch.zeros_like(h)
    h[vision], h[text] = packed[:nv], packed[nv + npx:]
    return linear(rms_norm(h, lm.norm.weight, eps), model.lm_head)


def qwen_proxyv_reference_logits(model, batch):
    """Per-sample reference logits: a list of (n_valid_b, V) tensors, padding dropped."""
    embeds, visual_pos_masks, deepstack = language_model_inputs(model, batch)
    keys = ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "attention_mask",
            "second_per_grid_ts")
    with torch.no_grad():
        positions, _ = model.model.get_rope_index(**{k: batch[k] for k in keys if k in batch})  # (3, B, T)
    valid = batch["attention_mask"].bool()
    B, T, D = embeds.shape
    out = []
    with torch.no_grad():
        for b, grids in enumerate(sample_grids(batch, model.config)):
            keep = valid[b]
            index = keep.long().cumsum(0) - 1  # padded position -> unpadded index
            grids = [(int(index[start]), [index[g] for g in blocks]) for start, blocks in grids]
            extra = [e[keep] for e in deepstack_rows(visual_pos_masks, deepstack, b, T, D)]
            out.append(proxyv_sample(model, embeds[b][keep], positions[:, b][:, keep], grids, extra))
    return out
