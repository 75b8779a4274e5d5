"""``ablate``: remove an operator's computations on vision tokens in chosen decoder layers.

    from analysis import ablate
    with ablate(model, "skip_ffn", layers=range(12, 32)):
        model.generate(**batch)

Scoped, per instance, and exact: entering attaches one forward pre-hook to the LLaVA or Qwen-VL core (to
read where the image / video tokens are) and replaces ``forward`` on the chosen decoder-layer
*instances* only; leaving removes both in ``finally``. No transformers class is patched and no
parameter or buffer is touched, so the model is bit-identical afterwards. Layers outside the
range, and chunks the op does not affect (text-only input, most decode steps), run HF's own code.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .attention import check_backend, split_attention
from .frozen_rows import FrozenRows
from .layers import resolve_layers
from .layout import compute_layout, image_token_id
from .models import (
    QWEN_VL_METHODS,
    decoder_layers,
    is_qwen_vl_model,
    patch_instance,
    qwen_params,
    text_config_of,
    vlm_core,
)
from .ops import OPERATORS, Operator, get_operator
from .rows import gather_rows, put_rows, scatter_add_rows, select_rows


@dataclass
class Chunk:
    """What the layers of one forward call need: where vision tokens are, in query and cache space."""

    query_vision: torch.Tensor  # (B, T) bool, rows of this chunk
    key_vision: torch.Tensor  # (B, K) bool, every cache position incl. this chunk
    key_valid: torch.Tensor  # (B, K) bool, the attention mask
    past: int  # cache positions before this chunk
    masks: dict = field(default_factory=dict)  # (queries, window) -> (B, Nq, K) allowed
    affected: bool = True  # whether the op changes anything in this chunk (set by prepare)
    frozen: FrozenRows = field(default_factory=FrozenRows)  # unit-normalised rows an op freezes (skip_attn_ffn)
    _text_rows: tuple | None = None

    def text_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, valid), each (B, N): the non-vision rows of this chunk, computed once per forward."""
        if self._text_rows is None:
            self._text_rows = select_rows(~self.query_vision)
        return self._text_rows

    def prepare(self, op: Operator) -> None:
        """Decide everything that reads the masks' values back to the host -- whether ``op`` changes this chunk,
        how many non-vision rows there are -- before the forward runs (the core's pre-hook, ahead of the vision
        tower). A read inside a decoder layer would stop the host from queueing work ahead of the device, so
        every later layer would wait for its kernels to be launched one by one."""
        self.affected = op.affects(self.query_vision, self.key_vision)
        if self.affected and (op.skip_attention or op.skip_ffn):
            self.text_rows()


class VisionTracker:
    """Keeps the vision mask of every cache position across prefill and decode steps."""

    vision_words = "image"

    who = "ablate()"  # who is speaking in error messages
    ENCODERS = ("image",)  # the core's get_<kind>_features methods generate() calls before the first forward

    def __init__(self, config, newline_tokens: str, operator: Operator | None = None):
        self.config = config
        self.newline_tokens = newline_tokens
        self.operator = operator  # ablate()'s op: each chunk is prepared for it (Chunk.prepare)
        self.key_vision: torch.Tensor | None = None
        self.chunk: Chunk | None = None
        self.warned_no_image = False
        # generate() encodes images before the first forward and passes the features without
        # image_sizes; remember them from the encoder call (LLaVA-NeXT's layout depends on them).
        self.encoded_image_sizes = None

    def watch_image_encoder(self, core):
        """Wrap the encoders of ``core`` (``get_image_features``; Qwen-VL also ``get_video_features``; this instance
        only) with :meth:`encoder_call`; returns one undo for all."""
        undos = []
        for kind in self.ENCODERS:
            original = getattr(core, f"get_{kind}_features")

            def encoder(*args, _kind=kind, _original=original, **kwargs):
                return self.encoder_call(_kind, _original, args, kwargs)

            # undo puts back what was there (ProxyV's recorder on a ProxyV model)
            undos.append(patch_instance(core, f"get_{kind}_features", functools.wraps(original)(encoder)))

        def undo():
            for u in reversed(undos):
                u()

        return undo

    def encoder_call(self, kind: str, call, args: tuple, kwargs: dict):
        """``call(*args, **kwargs)``, an encoder call of generate(), remembering what the layout of the next forward
        will need: ``image_sizes`` (LLaVA-NeXT; generate() passes the features without them)."""
        self.encoded_image_sizes = kwargs.get("image_sizes")  # HF passes it by keyword
        return call(*args, **kwargs)

    def query_vision(self, input_ids: torch.Tensor, chunk_mask: torch.Tensor | None, kwargs: dict) -> torch.Tensor:
        """(B, T) bool: the vision tokens of this call's ``input_ids``."""
        layout = self.layout_of_call(input_ids, chunk_mask, kwargs)
        if layout is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return layout.vision_mask(self.newline_tokens)

    def layout_of_call(self, input_ids: torch.Tensor, chunk_mask: torch.Tensor | None, kwargs: dict,
                       compute=compute_layout):
        """The token layout of this call's ``input_ids``, or ``None`` where it carries no vision features.
        ``compute``: the layout function (VisionZip under ProxyV passes its merged tokens' layout)."""
        # Image tokens are vision tokens only in a call that carries image features (pixels or
        # pre-encoded); elsewhere, e.g. an <image> id sampled in a decode step, HF embeds them as text.
        pixels = kwargs.get("pixel_values") is not None
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image") is not None
        if not (pixels or encoded) or not bool((input_ids == image_token_id(self.config)).any()):
            return None
        image_sizes = kwargs.get("image_sizes")
        if image_sizes is None and not pixels:
            image_sizes, self.encoded_image_sizes = self.encoded_image_sizes, None
        return compute(input_ids, self.config, chunk_mask, image_sizes)


    def pre_hook(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError(
                "ablate() locates vision tokens from input_ids; call the model with input_ids "
                "(as the processor returns them), not inputs_embeds"
            )
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("ablate() supports 2-D (batch, seq) attention masks only")
        chunk_mask = attention_mask[:, past:] if attention_mask is not None else None
        query_vision = self.query_vision(input_ids, chunk_mask, kwargs)
        if past == 0:
            self.key_vision = query_vision
            if not query_vision.any() and not self.warned_no_image:
                warnings.warn(f"ablate(): the input has no {self.vision_words} tokens, so the op changes nothing",
                              stacklevel=2)
                self.warned_no_image = True
        elif self.key_vision is None or self.key_vision.shape[1] != past:
            raise RuntimeError(
                "ablate(): the KV cache holds tokens this context did not see; build the cache "
                "(prefill) inside the same `with ablate(...)` block"
            )
        else:
            self.key_vision = torch.cat([self.key_vision, query_vision], dim=1)
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(self.key_vision)
        self.chunk = Chunk(query_vision, self.key_vision, valid, past)
        if self.operator is not None:
            self.chunk.prepare(self.operator)


class QwenVisionTracker(VisionTracker):
    """:class:`VisionTracker` for Qwen2-VL / Qwen2.5-VL / Qwen3-VL: image *and* video tokens are vision tokens,
    located by the Qwen token layout (:mod:`analysis.layout_qwen`) from the grids of the call."""

    vision_words = "image or video"
    KINDS = (("image", "pixel_values"), ("video", "pixel_values_videos"))
    ENCODERS = ("image", "video")

    def __init__(self, config, newline_tokens: str, operator: Operator | None = None):
        super().__init__(config, newline_tokens, operator)
        # generate() encodes images and videos before the first forward and passes the features without
        # image_grid_thw / video_grid_thw: remember the grids from the encoder calls.
        self.encoded_grids: dict[str, torch.Tensor | None] = {"image": None, "video": None}

    def encoder_call(self, kind: str, call, args: tuple, kwargs: dict):
        """As :meth:`VisionTracker.encoder_call`, remembering the grid encoded (``{kind}_grid_thw``)."""
        grid = kwargs.get(f"{kind}_grid_thw", args[1] if len(args) > 1 else None)
        before = dict(self.encoded_grids)
        try:
            return call(*args, **kwargs)
        finally:
            # Qwen3-VL's get_video_features calls get_image_features with the video's grid: keep only what the
            # outermost call records.
            self.encoded_grids = {**before, kind: grid}

    def layout_of_call(self, input_ids, chunk_mask, kwargs, compute=compute_layout):
        # As for LLaVA: image / video tokens are vision tokens only in a call carrying that kind's features.
        encoded = kwargs.get("mm_encoder_outputs") or {}
        present = {kind: kwargs.get(pixels) is not None or encoded.get(kind) is not None
                   for kind, pixels in self.KINDS}
        if not any(present.values()):
            return None
        grids = {}
        for kind, pixels in self.KINDS:
            grid = kwargs.get(f"{kind}_grid_thw")
            if grid is None and present[kind] and kwargs.get(pixels) is None:
                grid, self.encoded_grids[kind] = self.encoded_grids[kind], None
            if present[kind] and grid is None:
                raise ValueError(f"{self.who}: the call carries {kind} features but no {kind}_grid_thw; pass the "
                                 f"processor's {kind}_grid_thw with them")
            grids[kind] = grid if present[kind] else None
        types = kwargs.get("mm_token_type_ids")
        if types is not None and types.shape != input_ids.shape:
            types = None
        return compute(input_ids, self.config, chunk_mask, image_grid_thw=grids["image"],
                       video_grid_thw=grids["video"], mm_token_type_ids=types)


def _allowed(chunk: Chunk, op: Operator, window: int | None) -> torch.Tensor:
    """(B, Nq, K) bool: causal, padding, sliding window, the op's rule, and always the diagonal.

    Query rows are every row of the chunk, or its non-vision rows when the op skips attention.
    """
    key = (op.skip_attention, window)
    if key in chunk.masks:
        return chunk.masks[key]
    rows = chunk.text_rows()[0] if op.skip_attention else None
    B, T = chunk.query_vision.shape
    device = chunk.query_vision.device
    local = torch.arange(T, device=device).expand(B, T) if rows is None else rows
    q_pos = chunk.past + local  # (B, Nq) cache position of each query row
    k_pos = torch.arange(chunk.key_vision.shape[1], device=device)
    offset = q_pos[:, :, None] - k_pos[None, None, :]
    allowed = (offset >= 0) & chunk.key_valid[:, None, :]
    if window is not None:
        allowed &= offset < window
    rule = op.allowed(torch.gather(chunk.query_vision, 1, local), chunk.key_vision)
    if rule is not None:
        allowed &= rule
    allowed |= offset == 0
    chunk.masks[key] = allowed
    return allowed


def _window(attn) -> int | None:
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(attn.config, "sliding_window", None)


def ablated_layer_forward(layer, tracker: VisionTracker, hidden_states, attention_mask=None, position_ids=None,
                          past_key_values=None, use_cache=False, position_embeddings=None, **kwargs):
    """A decoder layer's forward with the tracker's operator applied; HF's own forward where it changes nothing."""
    chunk, op = tracker.chunk, tracker.operator
    if chunk is None or not chunk.affected:
        return type(layer).forward(
            layer, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=use_cache, position_embeddings=position_embeddings,
            **kwargs,
        )
    B = hidden_states.shape[0]
    attn = layer.self_attn
    cos, sin = (t.expand(B, -1, -1) for t in position_embeddings)  # (B, T, hd)
    if op.skip_attention and op.skip_ffn:
        return _frozen_vision_layer(layer, op, chunk, hidden_states, (cos, sin), past_key_values)

    if op.changes_attention:
        x = layer.input_layernorm(hidden_states)
        rows, valid = chunk.text_rows() if op.skip_attention else (None, None)  # (B, Nq)
        allowed = _allowed(chunk, op, _window(attn))
        if rows is None:  # mask_v2v / drop_v2t: causal only where the op changes nothing, so never ask the mask
            out = split_attention(attn, x, (cos, sin), x, (cos, sin), allowed, past_key_values, causal=False)
            hidden_states = hidden_states + out
        else:
            q_rope = (gather_rows(cos, rows), gather_rows(sin, rows))
            out = split_attention(attn, gather_rows(x, rows), q_rope, x, (cos, sin), allowed, past_key_values,
                                  causal=False)
            hidden_states = scatter_add_rows(hidden_states, rows, valid, out)
    else:
        residual = hidden_states
        hidden_states, _ = attn(
            hidden_states=layer.input_layernorm(hidden_states), attention_mask=attention_mask,
            position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
            position_embeddings=position_embeddings, **kwargs,
        )
        hidden_states = residual + hidden_states

    if op.skip_ffn:
        rows, valid = chunk.text_rows()
        h = gather_rows(hidden_states, rows)
        out = layer.mlp(layer.post_attention_layernorm(h))
        return scatter_add_rows(hidden_states, rows, valid, out)
    return hidden_states + layer.mlp(layer.post_attention_layernorm(hidden_states))


def _frozen_vision_layer(layer, op: Operator, chunk: Chunk, h: torch.Tensor, rope: tuple, cache) -> torch.Tensor:
    """A layer whose vision rows skip attention and FFN (``skip_attn_ffn``): only the text rows change, so they are
    computed alone and written back once. The same operations on the same values as the general path (which adds
    the attention and the FFN into two copies of the sequence), with one copy, and the input norm of the frozen
    rows reused from the previous ablated layer (:mod:`analysis.frozen_rows`)."""
    attn = layer.self_attn
    rows, valid = chunk.text_rows()
    before = gather_rows(h, rows)  # (B, N, D)
    x = chunk.frozen.input_norm(layer.input_layernorm, h, rows, valid, before)
    q_rope = tuple(gather_rows(t, rows) for t in rope)
    out = split_attention(attn, gather_rows(x, rows), q_rope, x, rope, _allowed(chunk, op, _window(attn)), cache,
                          causal=False)
    text = before + out.to(h.dtype)
    text = text + layer.mlp(layer.post_attention_layernorm(text)).to(h.dtype)
    new = put_rows(h, rows, torch.where(valid[..., None], text, before))
    chunk.frozen.returned(new)
    return new


def ablate(model, op: str | Operator, layers: Iterable[int] | None = None, *, start_layer: int | None = None,
           end_layer: int | None = None, newline_tokens: str = "vision", **params):
    """Apply ``op`` to vision tokens in the given decoder layers for the duration of the block.

    Args:
        model: a ``LlavaForConditionalGeneration`` or ``LlavaNextForConditionalGeneration`` (or their
            ``.model``), with a Llama / Qwen2 / Mistral text backbone; for the operators also a
            ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` or
            ``Qwen3VLForConditionalGeneration`` (or their ``.model``): images and videos are vision tokens,
            M-RoPE positions as the model computes them (docs/qwen.md, "Operators").
        op: an operator name (see :data:`analysis.ops.OPERATORS`) or instance, or the method of another
            registered variant family (:mod:`analysis.families`), whose parameters go in ``params``.
        layers: decoder-layer indices; or ``start_layer``/``end_layer`` (end exclusive, default the
            number of layers). Neither: every layer.
        newline_tokens: how LLaVA-NeXT's ``image_newline`` tokens are treated: ``"vision"`` (default;
            ablated with the vision tokens) or ``"text"`` (full compute, as the official ProxyV).
    Yields:
        the resolved, sorted list of ablated layer indices.
    """
    if isinstance(op, Operator) or op in OPERATORS:
        if params:
            raise ValueError(f"op {getattr(op, 'name', op)!r} takes no parameters, got {sorted(params)}")
        return _ablate_operator(model, op, layers, start_layer=start_layer, end_layer=end_layer,
                                newline_tokens=newline_tokens)
    if is_qwen_vl_model(model):
        if op == "visionzip":
            raise NotImplementedError(
                f"visionzip on {type(model).__name__}: VisionZip picks dominant tokens by the CLS token's attention "
                "and the Qwen-VL vision towers have no CLS token; use fastv or pdrop (they rank with the LLM's "
                "attention and run on these classes)")
        if op not in QWEN_VL_METHODS:  # the methods the runner and the plugin run there: one list
            raise NotImplementedError(
                f"ablate({op!r}) on {type(model).__name__}: the Qwen-VL classes support the operators "
                f"({', '.join(sorted(OPERATORS))}), token reduction (fastv, pdrop) and proxyv; not {op!r}")
        params = qwen_params(op, params)  # pdrop: positions='original' (M-RoPE), renumber refused
    from .variant import family, resolve_variant

    num_layers = text_config_of(vlm_core(model)).num_hidden_layers
    variant = resolve_variant(op, num_layers, start_layer=start_layer, end_layer=end_layer,
                              layers=None if layers is None else list(layers), params=params)
    return family(variant.family).load("execute")(model, variant, newline_tokens=newline_tokens)


@contextlib.contextmanager
def _ablate_operator(model, op: str | Operator, layers: Iterable[int] | None = None, *,
                     start_layer: int | None = None, end_layer: int | None = None, newline_tokens: str = "vision"):
    """:func:`ablate` for an operator of :mod:`analysis.ops`."""
    operator = get_operator(op)
    core = vlm_core(model)
    if getattr(core, "proxyv", None) is not None:
        raise TypeError("ablate() on a ProxyV model is not supported: ProxyV already replaces the vision-token "
                        "computation of its layers; ablate the base model, or compare ProxyV as its own variant")
    layer_modules = decoder_layers(core)
    chosen = resolve_layers(len(layer_modules), layers, start_layer, end_layer)
    if newline_tokens not in ("vision", "text"):
        raise ValueError(f"newline_tokens must be 'vision' or 'text', got {newline_tokens!r}")
    if operator.changes_attention:
        check_backend(text_config_of(core)._attn_implementation, f"op {operator.name!r}")
    tracker = (QwenVisionTracker if is_qwen_vl_model(core) else VisionTracker)(core.config, newline_tokens, operator)
    handles, patched = [], []
    try:
        handles.append(core.register_forward_pre_hook(tracker.pre_hook, with_kwargs=True).remove)
        handles.append(tracker.watch_image_encoder(core))
        if not operator.is_identity:
            for i in chosen:
                layer = layer_modules[i]
                layer.forward = functools.partial(ablated_layer_forward, layer, tracker)
                patched.append(layer)
        yield chosen
    finally:
        for undo in handles:
            undo()
        for layer in patched:
            del layer.forward
        tracker.chunk = tracker.key_vision = None



def ablate_variant(model, variant, newline_tokens: str = "vision"):
    """The execution of an ``ablation``-family :class:`~analysis.variant.Variant` (registered in
    :mod:`analysis.families`): :func:`ablate` on its layers, or nothing for the baseline."""
    if variant.is_baseline:
        return contextlib.nullcontext(())
    return _ablate_operator(model, variant.method, layers=variant.layers, newline_tokens=newline_tokens)
