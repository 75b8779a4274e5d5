"""Executing a token-reduction variant: per-instance hooks, pruned layers, the per-stage cache book.

Stage 0 (the layers before the first boundary) is HF's own code on the full batch. At each boundary
the vision tokens still alive are ranked (:mod:`.ranking`) and the kept rows gathered (:mod:`.prune`);
that layer and the following ones run on those rows only: their attention is
:func:`analysis.attention.split_attention` with an explicit mask, their cache holds only those rows.
Decode steps (no vision token) run every layer >= the first boundary on the new rows against that
shorter cache.

Qwen2-VL / Qwen2.5-VL / Qwen3-VL (docs/qwen.md, "Token reduction"): vision tokens are image and video tokens
(:class:`~analysis.ablation.QwenVisionTracker`); every kept row keeps HF's own per-row M-RoPE (cos, sin)
(``positions='original'`` only); Qwen3-VL's DeepStack features are added after layers 0..n-1 to the vision
rows still alive, each its own feature (pruned rows' features are dropped).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from ..ablation import QwenVisionTracker, VisionTracker
from .. import attention
from ..attention import check_backend, split_attention
from ..models import (
    decoder_layers,
    is_qwen_vl_model,
    patch_instance,
    renumber_refusal,
    text_config_of,
    vlm_core,
)
from ..rows import gather_rows
from .counts import fastv_kept, pdrop_kept
from .prune import Rows, decode_mask, prefill_mask, right_aligned
from .ranking import fastv_scores, pdrop_scores, top_vision
from .rules import check_on_proxyv, drops

METHODS = ("fastv", "pdrop")


@dataclass
class StageCache:
    """What the KV cache of one stage's layers holds, slot by slot (B, Nc), and the next renumbered position."""

    valid: torch.Tensor
    index: torch.Tensor
    next_pos: torch.Tensor  # (B,)


class Reduction:
    """The state of one ``reduction_context`` block (what the block yields).

    Attributes:
        method, keep, positions: the variant's method and options (fastv: ``positions='original'``).
        layers: the variant's layers (fastv: K..depth-1; pdrop: the boundaries).
        boundaries: the layers before which vision tokens are ranked and dropped.
        kept_vision: after a prefill with images, per stage a list (one per sample) of the original
            sequence indices of the vision tokens kept by that stage's boundary.
    """

    def __init__(self, core, variant, newline_tokens: str):
        self.method = variant.method
        options = variant.options
        self.keep = options["keep"]
        self.positions = options.get("positions", "original") if self.method == "pdrop" else "original"
        self.layers = tuple(variant.layers)
        self.boundaries = drops(self.method, self.layers)
        self.tracker = (QwenVisionTracker if is_qwen_vl_model(core) else VisionTracker)(core.config, newline_tokens)
        self.rotary = core.language_model.rotary_emb
        self.kept_vision: list[list[torch.Tensor]] = []
        self.active = self.prefill = self.capturing = False
        self.captured: dict[str, torch.Tensor] = {}
        self.caches: dict[int, StageCache] = {}
        self.n_vision: torch.Tensor | None = None
        self.rank_attn = None  # fastv: layer K-1's attention (its q/k are captured)
        self.rows: Rows | None = None
        self.allowed: torch.Tensor | None = None
        # whether ``allowed`` is exactly causal (sdpa then runs its causal kernel): asked once where a mask is made,
        # since the question reads the mask back to the host, which in every pruned layer would stall the launch queue
        self.causal = False
        self.proxyv = getattr(core, "proxyv", None)  # a ProxyV model: its layers run on the kept rows

    def stage_of(self, layer_index: int) -> int:
        return sum(k <= layer_index for k in self.boundaries)

    # ------------------------------------------------------------------ per forward call

    def start_chunk(self, module, args, kwargs):
        """Core forward pre-hook (after the tracker's): a prefill resets everything, a decode step continues."""
        chunk = self.tracker.chunk
        self.rows = self.allowed = None
        self.captured.clear()
        self.prefill = chunk.past == 0
        if self.prefill:
            self.active = bool(chunk.query_vision.any())
            self.n_vision = chunk.query_vision.sum(dim=1)
            self.caches, self.kept_vision = {}, []
        elif self.active and bool(chunk.query_vision.any()):
            raise NotImplementedError(
                f"{self.method}: image tokens after the prefill; token reduction ranks and drops vision tokens "
                "in the prefill only (start a new prefill for a new image)"
            )
        self.capturing = self.active and self.prefill and self.method == "fastv"

    def capture(self, name: str):
        """Forward hook on layer K-1's q_proj / k_proj (fastv): keep the output of a prefill for the ranking."""
        def hook(module, args, output):
            if self.capturing:
                self.captured[name] = output
        return hook

    def enter_stage(self, layer, stage: int, hidden, position_ids, position_embeddings, cache):
        """At a boundary layer: drop (prefill) or extend the stage's rows (decode); returns the layer's input."""
        if self.prefill:
            return self._drop(layer, stage, hidden, position_ids, position_embeddings, cache)
        self._extend(layer, stage, hidden, position_ids, position_embeddings, cache)
        return hidden

    def _drop(self, layer, stage, hidden, position_ids, position_embeddings, cache):
        B, T, _ = hidden.shape
        if stage == 1:
            chunk = self.tracker.chunk
            cos, sin = (t.expand(B, -1, -1) for t in position_embeddings)
            index = torch.arange(T, device=hidden.device).expand(B, T)
            pos = index if position_ids is None else position_ids.expand(B, T)  # Qwen-VL layers get None
            prev = Rows(index, chunk.key_valid, chunk.query_vision, pos, cos, sin)
        else:
            prev = self.rows
        n_vision = self.n_vision.tolist()
        if self.method == "fastv":
            self.capturing = False
            q, k = self.captured.pop("q"), self.captured.pop("k")
            scores = fastv_scores(self.rank_attn, q, k, prev.cos, prev.sin, prev.index, prev.valid)
            wanted = [fastv_kept(n, self.keep) for n in n_vision]
        else:
            scores = pdrop_scores(layer, hidden, prev.cos, prev.sin, prev.index, prev.valid)
            wanted = [pdrop_kept(n, self.keep, stage) for n in n_vision]
        alive = prev.vision & prev.valid
        chosen = top_vision(scores, alive, torch.tensor(wanted, device=hidden.device))
        rows, valid = right_aligned(prev.valid & (~prev.vision | chosen))
        new = prev.gather(rows)
        new.valid, new.vision = valid, new.vision & valid
        if self.positions == "renumber":
            new.pos = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
            new.cos, new.sin = self.rotary(hidden, new.pos)
        self.rows, self.allowed = new, prefill_mask(new)
        self.causal = attention.is_causal_mask(self.allowed)
        if cache is not None:
            self.caches[stage] = StageCache(valid, new.index, valid.sum(dim=1))
        self.kept_vision.append([new.index[b][new.vision[b]] for b in range(B)])
        return gather_rows(hidden, rows)

    def _extend(self, layer, stage, hidden, position_ids, position_embeddings, cache):
        chunk = self.tracker.chunk
        B, t, _ = hidden.shape
        book = self.caches.get(stage)
        if book is None or cache is None or cache.get_seq_length(layer.self_attn.layer_idx) != book.valid.shape[1]:
            raise RuntimeError(
                f"{self.method}: the KV cache of layer {layer.self_attn.layer_idx} is not the one this block built; "
                "build the cache (prefill, with use_cache) inside the same `with ablate(...)` block"
            )
        new_valid = chunk.key_valid[:, chunk.past:chunk.past + t]
        index = chunk.past + torch.arange(t, device=hidden.device).expand(B, t)
        if self.positions == "renumber":
            pos = book.next_pos[:, None] + (new_valid.long().cumsum(dim=1) - 1).clamp(min=0)
            cos, sin = self.rotary(hidden, pos)
            book.next_pos = book.next_pos + new_valid.sum(dim=1)
        else:
            pos = index if position_ids is None else position_ids.expand(B, t)
            cos, sin = (x.expand(B, -1, -1) for x in position_embeddings)
        self.allowed = decode_mask(book.valid, new_valid)
        self.causal = attention.is_causal_mask(self.allowed)
        book.valid = torch.cat([book.valid, new_valid], dim=1)
        book.index = torch.cat([book.index, index], dim=1)
        self.rows = Rows(index, new_valid, torch.zeros_like(new_valid), pos, cos, sin)

    def output_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` (B, T) of the last prefill, gathered to the rows its forward output (B, N_S): each slot's
        original token's label; -100 on filler slots and on a sample's first real slot (fillers come first: the
        slot before it is a filler, which must predict nothing), for a causal-LM loss under the reduction."""
        if not self.active or self.rows is None:
            return labels
        valid = self.rows.valid.to(labels.device)
        predicted = torch.cat([valid.new_zeros(valid.shape[0], 1), valid[:, :-1]], dim=1)  # a real slot before it
        out = torch.gather(labels, 1, self.rows.index.to(labels.device))
        return out.masked_fill(~(valid & predicted), -100)

    # ------------------------------------------------------------------ a ProxyV model

    def proxyv_layer(self, layer, hidden, cache):
        """A ProxyV layer of a pruned stage: ProxyV's own layer forward on the stage's rows. In a prefill, at the
        start layer, its proxies are planned over the vision cells still alive (learned proxies; Qwen-VL: per image
        and video block, at the mean M-RoPE position of the block's surviving cells, gathered from the chunk's
        positions); a decode step (no vision row) is the plain pruned layer, as ProxyV's own decode steps are HF's
        layer."""
        from ..proxyv.plan import build_plan, remap_layout
        from ..proxyv.runtime import ForwardState, proxyv_layer_forward

        proxyv, rows = self.proxyv, self.rows
        if self.prefill and layer.self_attn.layer_idx == proxyv.settings.start_layer:
            mrope = proxyv.state.mrope if proxyv.state is not None else None  # Qwen-VL: (3, B, T) of the chunk
            proxyv.state = None
            if proxyv.layout is not None:
                slot_of = torch.full(proxyv.layout.image_mask.shape, -1, dtype=torch.long, device=hidden.device)
                sample, slot = rows.valid.nonzero(as_tuple=True)
                slot_of[sample, rows.index[sample, slot]] = slot  # fillers map nowhere
                plan = build_plan(remap_layout(proxyv.layout, slot_of, rows.valid), proxyv.settings)
                if plan is not None:
                    proxyv.state = ForwardState(plan, plan.allowed(0, rows.valid, plan.vision))
                    if mrope is not None:  # Qwen-VL: the kept rows' own positions; a learned proxy's is the
                        # mean of its block's surviving cells' (ForwardState._mrope_positions over cell_valid)
                        index = rows.index.to(mrope.device)[None].expand(mrope.shape[0], -1, -1)
                        proxyv.state.mrope = mrope.gather(2, index)  # (3, B, N)
        if proxyv.state is None:  # a decode step, or no vision cell left: the plain pruned layer
            return pruned_layer(layer, self, hidden, cache)
        return proxyv_layer_forward(layer, proxyv, self.rotary, hidden, position_ids=rows.pos,
                                    past_key_values=cache, position_embeddings=(rows.cos, rows.sin))

    def deepstack(self, original):
        """Qwen3-VL's ``_deepstack_process`` (this instance): after a pruned layer of a prefill, each vision row
        still alive gets its own feature (the features are listed over ``visual_pos_masks`` row-major); the
        features of pruned rows are dropped. Before the first boundary, and in calls without pruning, HF's."""
        def process(hidden_states, visual_pos_masks, visual_embeds):
            rows = self.rows
            if not (self.active and self.prefill and rows is not None):
                return original(hidden_states, visual_pos_masks, visual_embeds)
            mask = visual_pos_masks.to(hidden_states.device)
            feature_of = (mask.flatten().long().cumsum(0) - 1).view(mask.shape)  # (B, T) row of each vision pos
            alive = rows.vision & rows.valid & torch.gather(mask, 1, rows.index)
            which = torch.gather(feature_of, 1, rows.index)[alive]
            hidden_states = hidden_states.clone()
            hidden_states[alive] = hidden_states[alive] + visual_embeds.to(hidden_states)[which]
            return hidden_states
        return process

    def release(self):
        self.captured.clear()
        self.rows = self.allowed = self.tracker.chunk = self.tracker.key_vision = None
        self.active = self.capturing = False


def reduced_layer_forward(layer, state: Reduction, stage: int, boundary: bool, hidden_states, attention_mask=None,
                          position_ids=None, past_key_values=None, use_cache=False, position_embeddings=None, **kwargs):
    """A decoder layer of stage >= 1: on the stage's rows only; HF's own forward when nothing is pruned."""
    if not state.active:
        return type(layer).forward(
            layer, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs,
        )
    if boundary:
        hidden_states = state.enter_stage(layer, stage, hidden_states, position_ids, position_embeddings,
                                          past_key_values)
    if state.proxyv is not None and layer.self_attn.layer_idx >= state.proxyv.settings.start_layer:
        return state.proxyv_layer(layer, hidden_states, past_key_values)
    return pruned_layer(layer, state, hidden_states, past_key_values)


def pruned_layer(layer, state: Reduction, hidden, cache):
    """The layer on the stage's rows only: every component on them, attention under the stage's mask."""
    rope = (state.rows.cos, state.rows.sin)
    x = layer.input_layernorm(hidden)
    hidden = hidden + split_attention(layer.self_attn, x, rope, x, rope, state.allowed, cache,
                                      causal=state.causal)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _window(attn):
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(attn.config, "sliding_window", None)


def _check(core, variant, newline_tokens: str, layers) -> None:
    if getattr(variant, "family", None) != "reduction" or variant.method not in METHODS:
        raise ValueError(f"reduction_context runs the reduction family ({', '.join(METHODS)}), got {variant!r}")
    proxyv = getattr(core, "proxyv", None)
    check_model(proxyv, variant)
    if proxyv is not None:
        check_on_proxyv(variant.method, proxyv.settings.start_layer, drops(variant.method, variant.layers),
                        proxyv.settings.init)
    if newline_tokens not in ("vision", "text"):
        raise ValueError(f"newline_tokens must be 'vision' or 'text', got {newline_tokens!r}")
    if is_qwen_vl_model(core) and variant.options.get("positions", "original") != "original":
        # a Variant built by hand (ablate(), the runner and the plugin apply models.qwen_params before this)
        raise NotImplementedError(renumber_refusal(variant.method, variant.options["positions"]))
    check_backend(text_config_of(core)._attn_implementation, f"op {variant.method!r}")
    windowed = [i for i, layer in enumerate(layers) if _window(layer.self_attn) is not None]
    if windowed:
        raise NotImplementedError(f"{variant.method}: sliding-window attention (layers {windowed}) is not supported "
                                  "by token reduction; use a backbone without sliding_window")
    if not variant.layers or not 1 <= variant.layers[0] < len(layers):
        raise ValueError(f"{variant.method}: layers {list(variant.layers)} out of range 1..{len(layers) - 1}")


def check_model(proxyv, variant) -> None:
    """A variant that names a ProxyV checkpoint (``proxyv=L``) runs on a ProxyV model starting at layer L."""
    wanted = variant.options.get("proxyv")
    if wanted is None:
        return
    if proxyv is None:
        raise TypeError(f"{variant.label} runs on a ProxyV checkpoint starting at layer {wanted}; this model has no "
                        "ProxyV (load the checkpoint with analysis.proxyv.load_proxyv)")
    if proxyv.settings.start_layer != wanted:
        raise ValueError(f"{variant.label} runs on a ProxyV checkpoint starting at layer {wanted}; this model's "
                         f"ProxyV starts at layer {proxyv.settings.start_layer}")


@contextlib.contextmanager
def reduction_context(model, variant, newline_tokens: str = "vision"):
    """The execution of a ``reduction``-family variant; yields the block's :class:`Reduction`."""
    core = vlm_core(model)
    layers = decoder_layers(core)
    _check(core, variant, newline_tokens, layers)
    state = Reduction(core, variant, newline_tokens)
    undo = []

    try:
        undo.append(core.register_forward_pre_hook(state.tracker.pre_hook, with_kwargs=True).remove)
        undo.append(core.register_forward_pre_hook(state.start_chunk, with_kwargs=True).remove)
        undo.append(state.tracker.watch_image_encoder(core))
        if state.method == "fastv":
            attn = layers[state.boundaries[0] - 1].self_attn
            state.rank_attn = attn
            undo.append(attn.q_proj.register_forward_hook(state.capture("q")).remove)
            undo.append(attn.k_proj.register_forward_hook(state.capture("k")).remove)
        language_model = core.language_model
        if hasattr(language_model, "_deepstack_process"):  # Qwen3-VL
            undo.append(patch_instance(language_model, "_deepstack_process",
                                       state.deepstack(language_model._deepstack_process)))
        if state.proxyv is not None:
            state.proxyv.host = state
            undo.append(functools.partial(setattr, state.proxyv, "host", None))
        for i in range(state.boundaries[0], len(layers)):
            layer = layers[i]
            forward = functools.partial(reduced_layer_forward, layer, state, state.stage_of(i), i in state.boundaries)
            undo.append(patch_instance(layer, "forward", forward))  # a ProxyV layer gets its ProxyV forward back
        yield state
    finally:
        for step in reversed(undo):
            step()
        state.release()
        state.rank_attn = state.proxyv = None
