"""An independent reference for FastV / PyramidDrop on a ProxyV Qwen2-VL / Qwen2.5-VL / Qwen3-VL model (learned
proxies, every drop at or before ProxyV's start layer L), one sample at a time with its padding removed.

Up to layer L: the plain-loop reduction reference (tests/qwen_reference.py ``reduced_sample``: a Python list of
alive tokens, explicit float64 ranking, every kept row its own (t, h, w) M-RoPE position, DeepStack added per
alive row), stopped before layer L runs. From L: the plain-loop ProxyV reference (tests/qwen_proxyv_reference.py
``proxyv_layers``) on the alive tokens, each image / video block's grid with its pruned cells removed (-1):
its learned proxies attend over the block's surviving cells and sit at the mean (t, h, w) position of those
cells; a block with no surviving cell has no proxy; a grid's proxies see the text before the grid's original
first token (text is never pruned). Grids come from ``image_grid_thw`` / ``video_grid_thw`` alone
(``sample_grids``); nothing is taken from ``analysis``.
"""

from __future__ import annotations

import torch
from qwen_proxyv_reference import proxyv_layers, sample_grids
from qwen_reference import deepstack_rows, language_model_inputs, reduced_sample


def reference_sample(model, embeds, positions, vision, grids, method, boundaries, keep, deepstack=(),
                     rank_token=None):
    """One unpadded sequence: embeds (n, D), positions (3, n), vision (n,), grids [(first token, [block grids])]
    in its indices. Returns (logits (m, V) of the alive tokens, their indices, per stage the kept vision indices)."""
    lm, text_config = model.model.language_model, model.config.text_config
    args = (lm, model.lm_head, text_config, embeds, positions, vision, method, list(boundaries), keep, deepstack,
            rank_token)
    h, alive, kept = reduced_sample(*args, stop_at=model.config.proxyv["start_layer"])
    to_alive = {a: i for i, a in enumerate(alive)}
    remapped = []
    for start, blocks in grids:
        blocks = [g.clone().apply_(lambda p: to_alive.get(p, -1)) for g in blocks]
        if any(bool((g >= 0).any()) for g in blocks):
            remapped.append((sum(a < start for a in alive), blocks))  # alive tokens before the grid's first one
    if not remapped:  # no vision cell left: the plain reduced decoder from L on
        return reduced_sample(*args)
    return proxyv_layers(model, h, positions[:, alive], remapped), alive, kept


def reduction_reference(model, batch, method, boundaries, keep, generated=None):
    """Per sample (padding dropped): (logits (m, V) of the alive tokens, their indices into the padded sequence,
    per stage the padded indices of the kept vision tokens). ``generated``: per sample the token ids appended
    after the prompt (text; positions continue the prompt's last on all three axes; the ranking token stays the
    prompt's last), as a KV cache built at the prefill computes them."""
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
    _, T, D = embeds.shape
    out = []
    with torch.no_grad():
        for b, grids in enumerate(sample_grids(batch, config)):
            where = valid[b].nonzero().flatten()
            index = valid[b].long().cumsum(0) - 1  # padded position -> unpadded index
            grids = [(int(index[start]), [index[g] for g in blocks]) for start, blocks in grids]
            e, p, vis = embeds[b][where], positions[:, b][:, where], vision[b][where]
            ds = [x[where] for x in deepstack_rows(visual_pos_masks, deepstack, b, T, D)]
            rank = None
            if generated is not None:
                new = torch.tensor(generated[b], dtype=torch.long)
                rank = len(where) - 1
                e = torch.cat([e, table[new]])
                p = torch.cat([p, p[:, -1:] + 1 + torch.arange(len(new))[None, :]], dim=1)
                vis = torch.cat([vis, torch.zeros(len(new), dtype=torch.bool)])
                ds = [torch.cat([x, torch.zeros(len(new), D)]) for x in ds]
            logits, alive, kept = reference_sample(model, e, p, vis, grids, method, boundaries, keep, ds, rank)
            out.append((logits, alive, [where[torch.tensor(k, dtype=torch.long)].tolist() for k in kept]))
    return out
