"""An independent reference for ProxyV: plain loops over the packed sequence [vision, proxies, text].

One sample at a time, padding removed. Below the start layer it is the plain decoder of
``reference.py``; from the start layer on, the sample is repacked as [full vision tokens,
proxies, text], the attention mask is written out pair by pair from the rules of docs/proxyv.md,
proxies come from an explicit bilinear formula (spatial) or an explicit softmax (learned), and the
guided update follows the official code literally (learned: splat the proxies first, then
project). ``init="none"`` (no proxies: text rows attend over every row, vision rows get a context-free
light MLP) is written out token by token in :func:`lightmlp_layers`. It reads only the model's weights and ProxyV settings; shared with ``analysis`` are the
token layout's crop grids (tested in test_layout.py) and the HF inputs to the language model.
"""

from __future__ import annotations

import math

import torch
from reference import language_model_inputs, linear, rms_norm, rotary

from analysis.layout import compute_layout


def attention(layer, config, x_q, pos_q, x_kv, pos_kv, allowed):
    """Attention output (Nq, D) of query rows x_q (Nq, D) over x_kv (Nk, D) under allowed (Nq, Nk) bool."""
    attn = layer.self_attn
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    hd = config.hidden_size // heads
    theta = config.rope_parameters["rope_theta"]
    q = rotary(linear(x_q, attn.q_proj).view(len(x_q), heads, hd), pos_q, theta)
    k = rotary(linear(x_kv, attn.k_proj).view(len(x_kv), kv_heads, hd), pos_kv, theta)
    v = linear(x_kv, attn.v_proj).view(len(x_kv), kv_heads, hd)
    k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
    scores = torch.einsum("ihd,jhd->hij", q, k) / hd**0.5
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return linear(torch.einsum("hij,jhd->ihd", probs, v).reshape(len(x_q), heads * hd), attn.o_proj)


def ffn(layer, x):
    mlp = layer.mlp
    return linear(torch.nn.functional.silu(linear(x, mlp.gate_proj)) * linear(x, mlp.up_proj), mlp.down_proj)


def bilinear_taps(i: int, factor: int, size: int):
    """(index, weight) pairs of output cell i when ``size`` cells shrink by ``factor`` (align_corners=False)."""
    src = max((i + 0.5) * factor - 0.5, 0.0)
    i0 = math.floor(src)
    i1 = min(i0 + 1, size - 1)
    return [(i0, 1.0 - (src - i0)), (i1, src - i0)]


def spatial_crop_proxies(h, grid, factor):
    """[(proxy (D,), [cells of its block])] of one crop. grid: (side, side) sample indices, -1 removed."""
    side = grid.shape[0]
    kept_rows = [r for r in range(side) if (grid[r] >= 0).any()]
    kept_cols = [c for c in range(side) if (grid[:, c] >= 0).any()]
    fill_r = lambda r: min(max(r, kept_rows[0]), kept_rows[-1])
    fill_c = lambda c: min(max(c, kept_cols[0]), kept_cols[-1])
    out = []
    for i in range(side // factor):
        for j in range(side // factor):
            block = [int(grid[r, c]) for r in range(i * factor, (i + 1) * factor)
                     for c in range(j * factor, (j + 1) * factor) if grid[r, c] >= 0]
            if not block:
                continue
            value = h.new_zeros(h.shape[1])
            for r, wr in bilinear_taps(i, factor, side):
                for c, wc in bilinear_taps(j, factor, side):
                    value = value + wr * wc * h[int(grid[fill_r(r), fill_c(c)])]
            out.append((value, block))
    return out


def learned_crop_proxies(h, grid, init):
    """(proxies (n, D), cells [idx], splat (len(cells), n)) of one crop, from the learned queries."""
    cells = [int(x) for x in grid.flatten() if x >= 0]
    queries = init.queries  # (n, I)
    logits = queries @ linear(h[cells], init.key_proj).T / queries.shape[1] ** 0.5  # (n, cells)
    return logits.softmax(-1) @ h[cells], cells, logits.T.softmax(-1)


def guided_update(guide, eps, v, proxy_context):
    """The official VisionMLP, row-wise: v (N, D) tokens, proxy_context (N, D) their (splatted) proxies."""
    mixed = torch.cat([linear(v, guide.input_proj), linear(proxy_context, guide.context_proj)], dim=-1)
    out = linear(torch.nn.functional.silu(linear(mixed, guide.fuse)), guide.out_proj)
    return rms_norm(v + out, guide.norm.weight, eps)


def light_update(update, eps, v):
    """The context-free light MLP (init "none"), row-wise: RMSNorm(v + W_out SiLU(W_in v)), v (N, D)."""
    return rms_norm(v + linear(torch.nn.functional.silu(linear(v, update.input_proj)), update.out_proj),
                    update.norm.weight, eps)


def lightmlp_layers(model, h, positions, images):
    """init "none" (no proxies, the paper's Table 2 light-MLP variant): logits (n, V) after layers L.. of one
    unpadded sequence h (n, D). Written out token by token: a text token attends causally over every token
    (full vision tokens included) and runs the FFN; a vision token (a cell of a crop grid) gets the light MLP
    of its own hidden state only."""
    lm, config = model.model.language_model, model.config.text_config
    L, eps = model.config.proxyv["start_layer"], config.rms_norm_eps
    is_vision = {int(x) for _, grids in images for grid in grids for x in grid.flatten() if x >= 0}
    text = [i for i in range(len(h)) if i not in is_vision]
    allowed = torch.tensor([[k <= q for k in range(len(h))] for q in text])  # (text, all)
    for index in range(L, len(lm.layers)):
        layer, update = lm.layers[index], model.model.proxyv.layers[str(index)]
        x = rms_norm(h, layer.input_layernorm.weight, eps)
        new = torch.empty_like(h)
        t = h[text] + attention(layer, config, x[text], positions[text], x, positions, allowed)
        new[text] = t + ffn(layer, rms_norm(t, layer.post_attention_layernorm.weight, eps))
        for i in sorted(is_vision):
            new[i] = light_update(update, eps, h[i:i + 1])[0]
        h = new
    return linear(rms_norm(h, lm.norm.weight, eps), model.lm_head)


def reference_sample(model, embeds, positions, images):
    """Logits (n, V) of one unpadded sample. images: [(start index, [crop grids of sample indices])]."""
    lm, config = model.model.language_model, model.config.text_config
    L = model.config.proxyv["start_layer"]
    eps = config.rms_norm_eps
    n = len(embeds)
    h = embeds.clone()
    first_proxyv = L if any((g >= 0).any() for _, grids in images for g in grids) else len(lm.layers)
    for index in range(first_proxyv):  # plain causal decoder (everywhere for a sample without image)
        layer = lm.layers[index]
        x = rms_norm(h, layer.input_layernorm.weight, eps)
        h = h + attention(layer, config, x, positions, x, positions, torch.ones(n, n).tril().bool())
        h = h + ffn(layer, rms_norm(h, layer.post_attention_layernorm.weight, eps))

    if first_proxyv == len(lm.layers):
        return linear(rms_norm(h, lm.norm.weight, eps), model.lm_head)
    return proxyv_layers(model, h, positions, images)


def proxyv_layers(model, h, positions, images):
    """Logits (n, V) after the ProxyV layers L.. of one unpadded sequence h (n, D) entering layer L.
    images: [(start index, [crop grids of indices into h, -1 removed])], start = the image's first token."""
    if model.config.proxyv["init"] == "none":
        return lightmlp_layers(model, h, positions, images)
    lm, config = model.model.language_model, model.config.text_config
    settings, proxyv = model.config.proxyv, model.model.proxyv
    L, f, learned = settings["start_layer"], settings["reduce_factor"], settings["init"] == "learned"
    eps = config.rms_norm_eps
    n = len(h)
    # Proxies from the start layer's input, in order image -> crop -> row-major block.
    proxies, proxy_pos, proxy_start, owner, splats = [], [], [], {}, {}
    for start, grids in images:
        rank = 0
        for grid in grids:
            if not (grid >= 0).any():
                continue
            if learned:
                values, cells, splat = learned_crop_proxies(h, grid, proxyv.initializer)
                first = len(proxies)
                for cell_i, cell in enumerate(cells):
                    splats[cell] = (first, splat[cell_i])  # proxies first.. first+n-1, weights (n,)
                blocks = [(values[k], []) for k in range(len(values))]
            else:
                blocks = spatial_crop_proxies(h, grid, f)
            for value, cells in blocks:
                for cell in cells:
                    owner[cell] = len(proxies)
                proxies.append(value)
                proxy_pos.append(int(positions[start]) + rank)
                proxy_start.append(start)
                rank += 1
    vision = sorted(owner) if not learned else sorted(splats)
    is_vision = set(vision)
    text = [i for i in range(n) if i not in is_vision]
    nv, npx = len(vision), len(proxies)
    # Packed sequence [vision, proxies, text]; queries are [proxies, text].
    packed = torch.cat([h[vision], torch.stack(proxies), h[text]])
    pos = torch.cat([positions[vision], torch.tensor(proxy_pos), positions[text]])
    rows = []
    for a in range(npx):  # proxy query: no vision; earlier proxies and itself; text before its image
        rows.append([False] * nv + [b <= a for b in range(npx)] + [t < proxy_start[a] for t in text])
    for q in text:  # text query: causal over vision and text, never proxies
        rows.append([v <= q for v in vision] + [False] * npx + [t <= q for t in text])
    allowed = torch.tensor(rows)  # (npx + nt, nv + npx + nt)

    for index in range(L, len(lm.layers)):
        layer, guide = lm.layers[index], proxyv.layers[str(index)]
        x = rms_norm(packed, layer.input_layernorm.weight, eps)
        out = attention(layer, config, x[nv:], pos[nv:], x, pos, allowed)
        queries = packed[nv:] + out
        queries = queries + ffn(layer, rms_norm(queries, layer.post_attention_layernorm.weight, eps))
        new_proxies = queries[:npx]
        contexts = []
        for v in vision:
            if learned:
                first, weights = splats[v]
                contexts.append(weights @ new_proxies[first:first + len(weights)])  # splat, then project
            else:
                contexts.append(new_proxies[owner[v]])
        packed = torch.cat([guided_update(guide, eps, packed[:nv], torch.stack(contexts)), queries])
    h = torch.zeros_like(h)
    h[vision], h[text] = packed[:nv], packed[nv + npx:]
    return linear(rms_norm(h, lm.norm.weight, eps), model.lm_head)


def proxyv_reference_logits(model, batch, **forward_kwargs):
    """Per-sample reference logits: a list of (n_valid_b, V) tensors, padding dropped.

    ``forward_kwargs`` (e.g. ``position_ids``) are those the model is run with.
    """
    embeds, positions = language_model_inputs(model, batch, **forward_kwargs)
    layout = compute_layout(batch["input_ids"], model.config, batch["attention_mask"], batch.get("image_sizes"))
    valid = batch["attention_mask"].bool()
    out = []
    with torch.no_grad():
        for b, sample in enumerate(layout.samples):
            index = valid[b].long().cumsum(0) - 1  # padded position -> unpadded index
            images = [(int(index[img.start]), [torch.where(c.positions >= 0, index[c.positions.clamp(min=0)], -1)
                                               for c in img.crops]) for img in sample.images]
            out.append(reference_sample(model, embeds[b][valid[b]], positions[b][valid[b]], images))
    return out
