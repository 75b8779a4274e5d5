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
from qwen_reference import reduced_sample, sample_inputs


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
    config = model.config
    out = []
    with torch.no_grad():
        inputs = sample_inputs(model, batch, generated=generated)
        for (where, e, p, vis, ds, rank), grids in zip(inputs, sample_grids(batch, config)):
            index = torch.zeros(batch["input_ids"].shape[1], dtype=torch.long)
            index[where] = torch.arange(len(where))  # padded position -> unpadded index
            grids = [(int(index[start]), [index[g] for g in blocks]) for start, blocks in grids]
            logits, alive, kept = reference_sample(model, e, p, vis, grids, method, boundaries, keep, ds, rank)
            out.append((logits, alive, [where[torch.tensor(k, dtype=torch.long)].tolist() for k in kept]))
    return out
