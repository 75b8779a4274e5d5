"""An independent reference for token reduction on a ProxyV model (learned proxies, every drop at or before
ProxyV's start layer L): per sample, the plain-loop reduction reference up to layer L (its drops included),
then the plain-loop ProxyV reference on the tokens still alive, each crop's proxies planned over its cells
that survived (the removed ones are -1 in the crop grid) and each image starting at its first alive cell.
"""

from __future__ import annotations

import torch
from proxyv_reference import proxyv_layers
from reduction_reference import reference_sample, vision_tokens
from reference import language_model_inputs

from analysis.layout import compute_layout


def reference_one(model, embeds, positions, vision, crops, method, layers, keep, position_mode, rank_token=None):
    """Logits (m, V) of one unpadded sequence's alive tokens, and their indices into it.
    crops: per image, its crop grids of indices into the sequence (-1 removed)."""
    lm, config = model.model.language_model, model.config.text_config
    L = model.config.proxyv["start_layer"]
    h, alive, pos = reference_sample(lm, model.lm_head, config, embeds, positions, vision, method, list(layers), keep,
                                     position_mode, rank_token=rank_token, stop_at=L)
    to_alive = {a: i for i, a in enumerate(alive)}
    images = []
    for grids in crops:
        grids = [g.clone().apply_(lambda p: to_alive.get(p, -1)) for g in grids]
        cells = [int(x) for g in grids for x in g.flatten() if x >= 0]
        if cells:
            images.append((min(cells), grids))
    if not images:  # no vision cell left: the plain decoder from L on
        logits, alive, _ = reference_sample(lm, model.lm_head, config, embeds, positions, vision, method,
                                            list(layers), keep, position_mode, rank_token=rank_token)
        return logits, alive
    return proxyv_layers(model, h, pos, images), alive


def _sample_crops(sample, where):
    """A layout sample's crop grids as indices into its unpadded sequence (``where``: its valid positions)."""
    index = {int(p): i for i, p in enumerate(where)}
    return [[c.positions.clone().apply_(lambda p: index.get(p, -1)) for c in image.crops] for image in sample.images]


def reference_batch(model, batch, method, layers, keep, position_mode="original", newline_tokens="vision",
                    **forward_kwargs):
    """Per sample (padding dropped): (logits (m, V) of the alive tokens, their indices into the padded sequence)."""
    embeds, positions = language_model_inputs(model, batch, **forward_kwargs)
    vision = vision_tokens(model, batch, embeds, newline_tokens)
    layout = compute_layout(batch["input_ids"], model.config, batch["attention_mask"], batch.get("image_sizes"))
    valid = batch["attention_mask"].bool()
    out = []
    with torch.no_grad():
        for b, sample in enumerate(layout.samples):
            where = valid[b].nonzero().flatten()
            logits, alive = reference_one(model, embeds[b][where], positions[b][where], vision[b][where],
                                          _sample_crops(sample, where), method, layers, keep, position_mode)
            out.append((logits, where[torch.tensor(alive)]))
    return out


def reference_greedy(model, batch, method, layers, keep, position_mode, steps, suppressed=()):
    """Greedy decoding of a left-padded batch by recomputing prompt + generated tokens from scratch each step,
    the ranking token fixed at the prompt's last token (what a cache built at the prefill computes).
    Returns (ids (B, T + steps), per step (B, V) logits)."""
    mask = batch["attention_mask"]
    embeds, positions = language_model_inputs(model, batch, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    vision = vision_tokens(model, batch, embeds, "vision")
    layout = compute_layout(batch["input_ids"], model.config, mask, batch.get("image_sizes"))
    valid = mask.bool()
    table = model.model.language_model.embed_tokens.weight
    ids, generated, per_step = batch["input_ids"].clone(), [[] for _ in range(len(valid))], []
    with torch.no_grad():
        for _ in range(steps):
            rows = []
            for b, sample in enumerate(layout.samples):
                where = valid[b].nonzero().flatten()
                new = torch.tensor(generated[b], dtype=torch.long)
                e = torch.cat([embeds[b][where], table[new]])
                p = torch.cat([positions[b][where], positions[b][where][-1] + 1 + torch.arange(len(new))])
                v = torch.cat([vision[b][where], torch.zeros(len(new), dtype=torch.bool)])
                logits, _ = reference_one(model, e, p, v, _sample_crops(sample, where), method, layers, keep,
                                          position_mode, rank_token=len(where) - 1)
                rows.append(logits[-1])
            last = torch.stack(rows)
            per_step.append(last)
            banned = torch.isin(torch.arange(last.shape[-1]), torch.tensor(list(suppressed), dtype=torch.long))
            choice = last.masked_fill(banned, -torch.inf).argmax(-1)
            for b in range(len(generated)):
                generated[b].append(int(choice[b]))
            ids = torch.cat([ids, choice[:, None]], dim=1)
    return ids, per_step


def visionzip_reference_batch(model, batch, dominant, contextual):
    """VisionZip on a ProxyV model (learned proxies), per sample: (logits (m, V) of the shortened sequence, the
    original indices of its tokens). The shortened embeddings come from the VisionZip reference; each crop's
    D + C tokens are the first D + C cells (row-major) of its grid, the rest removed; then the ProxyV reference."""
    from proxyv_reference import reference_sample as proxyv_sample
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
    from visionzip_reference import shortened_samples

    config = model.config
    K = dominant + contextual
    side = config.vision_config.image_size // config.vision_config.patch_size
    if config.model_type == "llava_next":
        crops = [image_size_to_num_patches(s.tolist(), config.image_grid_pinpoints, config.vision_config.image_size)
                 for s in batch["image_sizes"]]
    else:
        crops = [1] * len(batch.get("pixel_values", []))
    crops = iter(crops)
    ids = batch["input_ids"]
    out = []
    with torch.no_grad():
        for b, (embeds, where, _) in enumerate(shortened_samples(model, batch, dominant, contextual)):
            rows = [i for i, w in enumerate(where) if ids[b, w] == config.image_token_id]  # image rows, in order
            images, cursor = [], 0
            while cursor < len(rows):
                n = next(crops)
                grids = []
                for c in range(n):
                    grid = torch.full((side * side,), -1, dtype=torch.long)
                    grid[:K] = torch.tensor(rows[cursor + c * K:cursor + (c + 1) * K])
                    grids.append(grid.view(side, side))
                images.append((rows[cursor], grids))
                cursor += n * K
            out.append((proxyv_sample(model, embeds, torch.arange(len(where)), images), where))
    return out
