"""What runs: the ProxyV container module, its per-forward state, and the ProxyV decoder-layer forward.

Per ProxyV layer (index >= start layer), in a forward whose chunk holds vision cells (prefill)::

    x, xp  = input_layernorm(h), input_layernorm(p)         # h (B, T, D) sequence, p (B, P, D) proxies
    out    = attention(queries=[xp, x[text]], keys=[x (cached), xp (not cached)], mask=plan.allowed)
    p, h[text] += out                                        # (B, P + Nt, D)
    p, h[text] += mlp(post_attention_layernorm([p, h[text]]))
    h[vision]  = GuidedUpdate(h[vision], context_proj(p) at each cell's proxy)

Full vision rows are never queries and never enter the FFN; their keys and values are computed
(text reads them, and they are cached).

Rotary positions of the proxies: LLaVA (1-D) as the official code, proxy k of an image at
``position(image's first token) + k``. Qwen-VL (M-RoPE, a (temporal, height, width) position per token): a
proxy's position is its cells' positions downsampled exactly like its features -- spatial proxies by the
same bilinear taps, so a proxy sits at the (fractional) centre of its f x f block, in its block's temporal
position; learned proxies (no spatial place) at the mean position of their crop's cells. The official 1-D
rule would put a grid's proxies on a line after its first token, giving them temporal and spatial positions
no vision token has. With ``init="none"`` there are no proxies (P = 0): queries are
the text rows, keys the sequence, and the vision rows get the context-free ``LightUpdate(h[vision])``. Chunks without vision cells (decode steps, text-only
input) and layers below the start layer run HF's own forward untouched.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..attention import project_kv, split_attention
from ..layout import compute_layout
from .modules import GuidedUpdate, LearnedProxies, LightUpdate, spatial_proxies
from .plan import ProxyPlan, build_plan


def take(x: torch.Tensor, flat: torch.Tensor, n: int) -> torch.Tensor:
    """Rows ``flat`` (B*n,) of ``x`` (B, T, *F) flattened over (B, T): returns (B, n, *F)."""
    return x.reshape(-1, *x.shape[2:]).index_select(0, flat).view(x.shape[0], n, *x.shape[2:])


def put(out: torch.Tensor, put_index: tuple, values: torch.Tensor) -> None:
    """Write the valid slots of ``values`` (B, N, D) into ``out`` (B*T, D) in place (see ProxyPlan.text_put)."""
    slots, rows = put_index
    values = values.reshape(-1, values.shape[-1])
    out.index_put_((rows,), values if slots is None else values.index_select(0, slots))


@dataclass
class ForwardState:
    """The proxies of the forward in flight, carried from layer to layer."""

    plan: ProxyPlan
    allowed: torch.Tensor  # (B, P + Nt, K + P) bool
    proxies: torch.Tensor | None = None  # (B, P, D)
    splat: torch.Tensor | None = None  # (C, S, n), learned only
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # proxies' (cos, sin), each (B, P, hd)
    mrope: torch.Tensor | None = None  # Qwen-VL: (3, B, T) M-RoPE positions of the chunk's rows, else None
    q_rope: tuple[torch.Tensor, torch.Tensor] | None = None  # queries' [proxies, text] (cos, sin), (B, P + Nt, hd)

    def start(self, hidden: torch.Tensor, position_ids: torch.Tensor, position_embeddings, rotary,
              initializer) -> None:
        """Initialise the proxies from the start layer's input ``hidden`` (B, T, D), and their rotary."""
        plan = self.plan
        B, T, D = hidden.shape
        Nt = plan.text_rows.shape[1]
        if plan.n_proxies == 0:  # init="none": no proxies; the queries are the text rows
            self.proxies = hidden.new_zeros(B, 0, D)
            self.q_rope = tuple(take(t.expand(B, -1, -1), plan.text_flat, Nt) for t in position_embeddings)
            return
        C, S = plan.cell_src.shape
        cells = hidden.reshape(B * T, D).index_select(0, plan.cell_src.flatten()).view(C, S, D)
        if plan.learned:
            per_crop, self.splat = initializer(cells, plan.cell_valid)  # (C, n, D), (C, S, n)
        else:
            per_crop = spatial_proxies(cells.view(C, *plan.grid, D), plan.factor)  # (C, n, D)
        self.proxies = self._slotted(per_crop, B)
        if self.mrope is None:
            positions = position_ids.expand(B, T).gather(1, plan.proxy_start) + plan.proxy_rank  # (B, P)
        else:
            positions = self._mrope_positions(B)  # (3, B, P) float
        self.rope = rotary(hidden, positions)
        self.q_rope = tuple(torch.cat([proxy, take(t.expand(B, -1, -1), plan.text_flat, Nt)], dim=1)
                            for proxy, t in zip(self.rope, position_embeddings))

    def _slotted(self, per_crop: torch.Tensor, B: int) -> torch.Tensor:
        """(C, n, F) per-crop values -> (B, P, F) in the proxy slots (zeros where no proxy exists)."""
        plan = self.plan
        sources, slots = plan.proxy_slots
        F = per_crop.shape[-1]
        flat = per_crop.new_zeros(B * plan.n_proxies, F)
        return flat.index_copy(0, slots, per_crop.reshape(-1, F).index_select(0, sources)).view(B, plan.n_proxies, F)

    def _mrope_positions(self, B: int) -> torch.Tensor:
        """(3, B, P) float M-RoPE positions of the proxies, downsampled from their cells' like the features."""
        plan = self.plan
        C, S = plan.cell_src.shape
        cells = self.mrope.reshape(3, -1).index_select(1, plan.cell_src.flatten()).view(3, C, S).permute(1, 2, 0)
        cells = cells.double()  # (C, S, 3); exact for positions of any size
        if plan.learned:
            valid = plan.cell_valid[..., None]
            centre = (cells * valid).sum(1) / valid.sum(1)  # (C, 3): the mean position of the crop's cells
            per_crop = centre[:, None, :].expand(C, plan.crop_proxy.shape[1], 3)
        else:
            per_crop = spatial_proxies(cells.view(C, *plan.grid, 3), plan.factor)
        return self._slotted(per_crop, B).permute(2, 0, 1).float()

    def context(self, projected: torch.Tensor) -> torch.Tensor:
        """Each full vision row's proxy context (B, Nv, I), from ``context_proj(proxies)`` (B, P, I)."""
        plan = self.plan
        B, P, I = projected.shape
        flat = projected.reshape(B * P, I)
        if not plan.learned:
            per_cell = flat  # the proxy of each cell's f x f block
        else:
            C, n = plan.crop_proxy.shape
            per_crop = flat.index_select(0, plan.crop_proxy.flatten()).view(C, n, I)
            per_cell = (self.splat @ per_crop).reshape(-1, I)  # (C, S, n) @ (C, n, I) -> (C*S, I)
        return per_cell.index_select(0, plan.row_context.flatten()).view(B, -1, I)  # (B, Nv, I)


class ProxyV(nn.Module):
    """All ProxyV parameters of a model (registered as ``<llava core>.proxyv``) and its runtime.

    ``layers[str(i)]`` is the :class:`GuidedUpdate` (init "none": :class:`LightUpdate`) of decoder layer i >= L;
    ``initializer`` the :class:`LearnedProxies` (learned variant only).
    """

    def __init__(self, settings, n_layers: int, hidden: int, learned_proxies: int, norm_factory):
        super().__init__()
        self.settings = settings
        width = settings.light_width
        update = LightUpdate if settings.init == "none" else GuidedUpdate
        self.layers = nn.ModuleDict(
            {str(i): update(hidden, width, norm_factory()) for i in range(settings.start_layer, n_layers)}
        )
        if settings.init == "learned":
            self.initializer = LearnedProxies(hidden, width, learned_proxies)
        else:
            self.initializer = None
        self.state: ForwardState | None = None
        self.layout = None  # the token layout of the chunk in flight (None without vision cells)
        self.bound: list = []  # (layer, forward) pairs that apply_proxyv attached
        self.host = None  # a token reduction running the ProxyV layers on its kept rows (analysis.reduction)
        self._key_vision: torch.Tensor | None = None  # (B, K) full-vision mask of every cache position
        self.locator = None  # the VisionTracker that finds each call's vision tokens (set by apply_proxyv)
        self._warned_embeds = False

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.settings.to_dict().items())

    # -- hooks on the LLaVA core -----------------------------------------------------------------
    def pre_hook(self, core, args, kwargs):
        """Before the core's forward: build the plan of this chunk (or none), track vision positions."""
        self.state = self.layout = None
        for layer, forward in self.bound if self.host is None else ():
            if vars(layer).get("forward") is not forward:
                raise RuntimeError(f"decoder layer {layer.self_attn.layer_idx} no longer runs ProxyV (its forward was "
                                   "replaced, e.g. by ablate()); ablate() and ProxyV do not combine")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        pixels = kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None
        encoded = any(v is not None for v in (kwargs.get("mm_encoder_outputs") or {}).values())
        if input_ids is None:
            if (pixels or encoded) and not self._warned_embeds:
                warnings.warn("ProxyV locates vision tokens from input_ids; called with inputs_embeds, the "
                              "model runs without ProxyV", stacklevel=2)
                self._warned_embeds = True
            self._key_vision = None
            return
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("ProxyV supports 2-D (batch, seq) attention masks only")
        plan = None
        # Vision-token ids are vision tokens only in a call that carries their features (the locator decides).
        chunk_mask = attention_mask[:, past:] if attention_mask is not None else None
        compute = getattr(self.host, "proxyv_layout", compute_layout)  # VisionZip: its merged tokens
        layout = self.locator.layout_of_call(input_ids, chunk_mask, kwargs, compute)
        if layout is not None:
            self.layout = layout
            plan = build_plan(layout, self.settings)
        vision = plan.vision if plan is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        if past == 0:
            self._key_vision = vision
        elif self._key_vision is not None and self._key_vision.shape[1] == past:
            self._key_vision = torch.cat([self._key_vision, vision], dim=1)
        elif plan is not None:
            raise RuntimeError("ProxyV: the KV cache holds tokens this model's forward did not see; "
                               "build the cache with this model")
        else:
            self._key_vision = None
        if plan is not None:
            valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(self._key_vision)
            self.state = ForwardState(plan, plan.allowed(past, valid, self._key_vision))

    def record_positions(self, language_model, args, kwargs):
        """Pre-hook on a Qwen-VL language model: keep the (3, B, T) M-RoPE positions of this call."""
        positions = kwargs.get("position_ids")
        if self.state is not None:
            if positions is None or positions.dim() != 3:
                raise RuntimeError("ProxyV on Qwen-VL: the language model was called without M-RoPE position_ids "
                                   "(3, batch, seq); call the model with input_ids so it computes them")
            self.state.mrope = positions[-3:]  # (4, B, T) carries the text positions first

    def post_hook(self, core, args, output):
        self.state = self.layout = None  # free the proxies (and their graph) once the forward is done


class EncoderRecorder:
    """``core.get_image_features`` (Qwen-VL: also ``get_video_features``) of a ProxyV model: records what the
    layout needs from an encoder call, then calls the class's method.

    generate() encodes images (and videos) before the first forward and passes the features without
    ``image_sizes`` (LLaVA-NeXT's layout needs them) or ``image_grid_thw`` / ``video_grid_thw`` (Qwen-VL's).
    Qwen3-VL's video encoder calls the image encoder with the video's grid: only the outermost call records.
    (A callable object rather than a closure, so that ``copy.deepcopy`` of the model points the copy at the copy.)
    """

    def __init__(self, core, proxyv: ProxyV, kind: str = "image"):
        self.core, self.proxyv, self.kind = core, proxyv, kind

    def _method(self):
        """The class's own encoder, bound to the core."""
        return functools.partial(getattr(type(self.core), f"get_{self.kind}_features"), self.core)

    @property
    def __signature__(self):  # generate() picks the encoder's arguments by its signature
        return inspect.signature(self._method())

    def __call__(self, *args, **kwargs):
        return self.proxyv.locator.encoder_call(self.kind, self._method(), args, kwargs)


def proxyv_layer_forward(layer, proxyv: ProxyV, rotary, hidden_states, attention_mask=None, position_ids=None,
                         past_key_values=None, use_cache=False, position_embeddings=None, **kwargs):
    """A decoder layer's forward under ProxyV (bound per instance with ``functools.partial``).

    Under HF gradient checkpointing (``model.gradient_checkpointing_enable()``, training mode) the layer's work
    runs in the layer's checkpoint function with the proxies as an explicit input and output, so the backward
    pass recomputes it from this layer's own inputs (not from the proxies the last layer left in the state).
    """
    state = proxyv.state
    if state is None:
        return type(layer).forward(
            layer, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=use_cache, position_embeddings=position_embeddings,
            **kwargs,
        )
    index = layer.self_attn.layer_idx
    if index == proxyv.settings.start_layer:
        state.start(hidden_states, position_ids, position_embeddings, rotary, proxyv.initializer)
    elif state.proxies is None:
        raise RuntimeError(f"ProxyV layer {index} ran before the start layer {proxyv.settings.start_layer}")
    guide: GuidedUpdate | LightUpdate = proxyv.layers[str(index)]
    if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
        # HF drops the cache in a checkpointed layer too (a recomputation would write it twice)
        step = functools.partial(_layer_step, layer, guide, state, position_embeddings, None)
        new, state.proxies = layer._gradient_checkpointing_func(step, hidden_states, state.proxies)
    else:
        new, state.proxies = _layer_step(layer, guide, state, position_embeddings, past_key_values, hidden_states,
                                         state.proxies)
    return new


def _layer_step(layer, guide: GuidedUpdate | LightUpdate, state: ForwardState, position_embeddings, past_key_values,
                h: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One ProxyV layer on sequence ``h`` (B, T, D) and proxies ``p`` (B, P, D): (new sequence, new proxies).
    Reads only the forward's fixed plan and rotary from ``state``, so it can be recomputed."""
    plan = state.plan
    B, T, D = h.shape
    P, Nt, Nv = p.shape[1], plan.text_rows.shape[1], plan.vision_rows.shape[1]
    attn = layer.self_attn
    cos, sin = (t.expand(B, -1, -1) for t in position_embeddings)  # (B, T, hd)

    x, xp = layer.input_layernorm(h), layer.input_layernorm(p)  # every row: all of them are keys
    queries = torch.cat([xp, take(x, plan.text_flat, Nt)], dim=1)  # (B, P + Nt, D)
    extra_kv = project_kv(attn, xp, *state.rope) if P else None  # proxies' keys/values: attended, never cached
    # never the causal pattern (proxy rows read their own key columns after the cache's), so never ask the mask
    out = split_attention(attn, queries, state.q_rope, x, (cos, sin), state.allowed, past_key_values, extra_kv,
                          causal=False)
    p = p + out[:, :P]
    text = take(h, plan.text_flat, Nt) + out[:, P:]  # (B, Nt, D)

    ffn = layer.mlp(layer.post_attention_layernorm(torch.cat([p, text], dim=1)))  # (B, P + Nt, D)
    p = p + ffn[:, :P]
    text = text + ffn[:, P:]

    context = state.context(guide.context_proj(p)) if P else None  # (B, Nv, I); init "none": no context
    vision = guide(take(h, plan.vision_flat, Nv), context)  # (B, Nv, D)
    # Every row is a text row or a vision row: write both into a fresh tensor.
    new = torch.empty_like(h).view(B * T, D)
    put(new, plan.text_put, text)
    put(new, plan.vision_put, vision)
    return new.view(B, T, D), p
