"""An independent reference for VisionZip on LLaVA-1.5 and LLaVA-NeXT.

Plain loops from the weights, one image (crop) and one sample at a time: the CLIP tower by hand up to the
feature layer (patch embedding as an explicit patch-by-patch dot product, LayerNorm, per-head attention),
the CLS row's per-head softmax, the dominant choice by a Python sort, the contextual targets and the
assignment by explicit cosine similarities, the merge as a running sum, the projector, the shortened
sequence (text embeddings + D + C features per image, positions 0..m-1), and the decoder of
tests/reference.py. Shares no code with ``analysis``.

LLaVA-NeXT: image i's crops are ``pixel_values[i][:n_i]`` (n_i from HF's ``image_size_to_num_patches``, the
count the model itself uses), each zipped alone as above; the image's features are its crops' D + C rows one
crop after the other (base crop first); in the sequence, an image is a run of consecutive image tokens, of which
the first n_i * (D + C) hold those features and the rest are dropped.
"""

from __future__ import annotations

import math

import torch
from reference import linear, reference_sample


def layer_norm(x, module, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * module.weight + module.bias


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def clip_layer(layer, h, heads, eps):
    """One CLIP encoder layer on (N, d); returns (output, its normalised input)."""
    n, d = h.shape
    hd = d // heads
    attn = layer.self_attn
    x = layer_norm(h, layer.layer_norm1, eps)
    q, k, v = linear(x, attn.q_proj), linear(x, attn.k_proj), linear(x, attn.v_proj)
    out = torch.zeros(n, d)
    for head in range(heads):
        cols = slice(head * hd, (head + 1) * hd)
        weights = ((q[:, cols] @ k[:, cols].T) / math.sqrt(hd)).softmax(-1)
        out[:, cols] = weights @ v[:, cols]
    h = h + linear(out, attn.out_proj)
    y = layer_norm(h, layer.layer_norm2, eps)
    return h + linear(quick_gelu(linear(y, layer.mlp.fc1)), layer.mlp.fc2), x


def zip_one(model, pixels, dominant, contextual):
    """One image (3, S, S): (D + C, text width) projected features, kept tower indices, target tower indices."""
    tower = model.model.vision_tower
    vc = model.config.vision_config
    eps, heads, p = vc.layer_norm_eps, vc.num_attention_heads, vc.patch_size
    side = vc.image_size // p
    weight = tower.embeddings.patch_embedding.weight  # (d, 3, p, p)
    rows = [tower.embeddings.class_embedding]
    for i in range(side):
        for j in range(side):
            patch = pixels[:, i * p:(i + 1) * p, j * p:(j + 1) * p]
            rows.append((weight * patch).sum(dim=(1, 2, 3)))
    h = torch.stack(rows) + tower.embeddings.position_embedding.weight
    h = layer_norm(h, tower.pre_layrnorm, eps)
    depth = len(tower.encoder.layers)
    index = model.config.vision_feature_layer % (depth + 1)
    for layer in tower.encoder.layers[:index]:
        last = layer
        h_in = h
        h, x = clip_layer(layer, h, heads, eps)
    # the feature layer's attention: the CLS row, per head, post-softmax, summed over heads over the patches
    hd = vc.hidden_size // heads
    attn = last.self_attn
    x = layer_norm(h_in, last.layer_norm1, eps)
    q, k = linear(x, attn.q_proj), linear(x, attn.k_proj)
    n1 = h.shape[0]
    score = [0.0] * n1
    for head in range(heads):
        cols = slice(head * hd, (head + 1) * hd)
        row = ((k[:, cols] @ q[0, cols]) / math.sqrt(hd)).double().softmax(-1)
        for j in range(1, n1):
            score[j] += float(row[j])
    best = sorted(range(1, n1), key=lambda j: (-score[j], j))[:dominant - 1]
    kept = [0] + sorted(best)
    rest = [j for j in range(n1) if j not in kept]
    tokens = [h[j] for j in kept]
    targets = []
    if contextual:
        metric = {}
        for j in rest:
            key = sum(k[j, head * hd:(head + 1) * hd] for head in range(heads)) / heads
            metric[j] = key / key.norm()
        step = max(1, len(rest) // contextual)
        targets = [rest[i] for i in range(0, len(rest), step)][:contextual]
        sums = {t: torch.zeros_like(h[0]) for t in targets}
        counts = {t: 0 for t in targets}
        for j in rest:
            if j in targets:
                continue
            sims = [float(metric[j] @ metric[t]) for t in targets]
            choice = targets[sims.index(max(sims))]
            sums[choice] = sums[choice] + h[j]
            counts[choice] += 1
        tokens += [h[t] + sums[t] / max(counts[t], 1) for t in targets]
    proj = model.model.multi_modal_projector
    features = linear(torch.nn.functional.gelu(linear(torch.stack(tokens), proj.linear_1)), proj.linear_2)
    return features, kept, targets


def next_images(model, batch, dominant, contextual):
    """LLaVA-NeXT: per image (features (n_i * (D + C), d), [(kept, targets) per crop])."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    out = []
    for pixels, size in zip(batch["pixel_values"], batch["image_sizes"], strict=True):
        n = image_size_to_num_patches(size.tolist(), config.image_grid_pinpoints, config.vision_config.image_size)
        rows, info = [], []
        for crop in range(n):
            features, kept, targets = zip_one(model, pixels[crop], dominant, contextual)
            rows.append(features)
            info.append((kept, targets))
        out.append((torch.cat(rows), info))
    return out


def next_shortened_samples(model, batch, dominant, contextual):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    image_id = model.config.image_token_id
    table = model.model.language_model.embed_tokens.weight
    images = next_images(model, batch, dominant, contextual) if "pixel_values" in batch else []
    image = 0
    out = []
    for b in range(ids.shape[0]):
        rows, where, info = [], [], []
        features, slot, previous_image = None, 0, False
        for i in range(ids.shape[1]):
            if not mask[b, i]:
                continue
            is_image = bool(ids[b, i] == image_id)
            if not is_image:
                rows.append(table[ids[b, i]])
                where.append(i)
            else:
                if not previous_image:  # a new run of image tokens: the next image
                    features, crops = images[image]
                    info.extend(crops)
                    image += 1
                    slot = 0
                if slot < len(features):
                    rows.append(features[slot])
                    where.append(i)
                slot += 1
            previous_image = is_image
        out.append((torch.stack(rows), where, info))
    assert image == len(images)
    return out


def shortened_samples(model, batch, dominant, contextual):
    """Per sample (padding dropped): (embeddings (m, d) of the shortened sequence, the original indices of its
    tokens, [(kept, targets) per image (LLaVA-NeXT: per crop)])."""
    if model.config.model_type == "llava_next":
        return next_shortened_samples(model, batch, dominant, contextual)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    image_id = model.config.image_token_id
    vc = model.config.vision_config
    per_image = (vc.image_size // vc.patch_size) ** 2 + (model.config.vision_feature_select_strategy == "full")
    table = model.model.language_model.embed_tokens.weight
    zipped = [zip_one(model, pixels, dominant, contextual) for pixels in batch.get("pixel_values", [])]
    image = 0
    out = []
    for b in range(ids.shape[0]):
        rows, where, info, seen = [], [], [], 0
        for i in range(ids.shape[1]):
            if not mask[b, i]:
                continue
            if ids[b, i] != image_id:
                rows.append(table[ids[b, i]])
                where.append(i)
                continue
            if seen % per_image == 0:
                features, kept, targets = zipped[image]
                info.append((kept, targets))
                image += 1
            slot = seen % per_image
            if slot < dominant + contextual:
                rows.append(features[slot])
                where.append(i)
            seen += 1
        out.append((torch.stack(rows), where, info))
    return out


def reference_batch(model, batch, dominant, contextual):
    """Per sample: (logits (m, V) at positions 0..m-1, original indices of the m tokens, per image (kept, targets))."""
    lm = model.model.language_model
    out = []
    with torch.no_grad():
        for embeds, where, info in shortened_samples(model, batch, dominant, contextual):
            logits = reference_sample(lm, model.lm_head, model.config.text_config, embeds, torch.arange(len(where)),
                                      torch.zeros(len(where), dtype=torch.bool), "none", [])
            out.append((logits, where, info))
    return out


def reference_greedy(model, batch, dominant, contextual, steps, suppressed=()):
    """Greedy decoding by recomputing the shortened prompt + generated tokens from scratch every step.
    Returns (ids (B, T + steps), per step (B, V) logits)."""
    lm = model.model.language_model
    table = lm.embed_tokens.weight
    ids = batch["input_ids"].clone()
    per_step = []
    with torch.no_grad():
        prompts = [embeds for embeds, _, _ in shortened_samples(model, batch, dominant, contextual)]
        generated = [[] for _ in prompts]
        for _ in range(steps):
            rows = []
            for b, prompt in enumerate(prompts):
                e = torch.cat([prompt, table[torch.tensor(generated[b], dtype=torch.long)]])
                logits = reference_sample(lm, model.lm_head, model.config.text_config, e, torch.arange(len(e)),
                                          torch.zeros(len(e), dtype=torch.bool), "none", [])
                rows.append(logits[-1])
            last = torch.stack(rows)
            per_step.append(last)
            banned = torch.isin(torch.arange(last.shape[-1]), torch.tensor(list(suppressed)))
            choice = last.masked_fill(banned, -torch.inf).argmax(-1)
            for b in range(len(prompts)):
                generated[b].append(int(choice[b]))
            ids = torch.cat([ids, choice[:, None]], dim=1)
    return ids, per_step
