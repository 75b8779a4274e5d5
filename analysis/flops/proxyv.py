"""FLOPs of ProxyV: the matrix products of a ProxyV decoder layer, and the ``proxyv`` family's FLOPs variant.

    from analysis.flops import PrefillTokens, count_flops
    from analysis.variant import resolve_variant
    # from counts (one image of complete crops; what the CLI's --op proxyv counts)
    report = count_flops(config, PrefillTokens.from_counts(576, 64, 576), "proxyv", start_layer=16, reduce_factor=4)
    # a real batch, exactly what the ProxyV model executes (AnyRes unpadding, several images, padding)
    tokens = PrefillTokens.from_batch(batch, config, newline_tokens="text")
    shapes = proxyv_shapes(config, batch["input_ids"], batch["attention_mask"], batch.get("image_sizes"))
    variant = resolve_variant("proxyv", 32, start_layer=16, params={"reduce_factor": 4})
    report = count_flops(config, tokens, variant, shapes=shapes)

Conventions as :mod:`analysis.flops`: an (m, k) @ (k, n) product costs 2·m·k·n (torch's
``FlopCounterMode``); norms, rotary, softmax, interpolation, gathers and additions are not counted.
Dims (:class:`~analysis.flops.TextDims`): D hidden, H / Hkv query / key-value heads, hd head dim,
F FFN width; I light width; shapes from :func:`analysis.proxyv.proxyv_shapes`: B, T, P, Nv, Nt,
C crops, S cells, n proxies per crop.

Layers below the start layer L are the baseline. One ProxyV layer (>= L) executes, on the padded
batch (``executed``, :func:`proxyv_layer_flops`, written next to what :mod:`analysis.proxyv.runtime`
executes and tested equal to torch's counter)::

    q_proj, o_proj        B·(P+Nt) rows        2·rows·D·H·hd each      queries = [proxies, text]
    k_proj, v_proj        B·(T+P) rows         2·rows·D·Hkv·hd each    keys = [sequence (cached), proxies]
    attn_scores, values   B·H·(P+Nt)·(T+P)     2·hd per (row, key)     full rectangle; K/V repeated to H heads
    gate, up, down_proj   B·(P+Nt) rows        2·rows·D·F each
    light input_proj      B·Nv rows            2·rows·D·I              GuidedUpdate on full vision tokens
    light context_proj    B·P rows             2·rows·D·I              on proxies, before gather / splat to cells
    light fuse            B·Nv rows            2·rows·2I·I
    light out_proj        B·Nv rows            2·rows·I·D
    splat (learned)       C·S·n·I              2 per multiply-add      (C, S, n) @ (C, n, I)
  start layer only, learned:
    init key_proj         C·S rows             2·rows·D·I
    init logits           C·n·S·I              queries (n, I) x keys (C, S, I)
    init pooling          C·n·S·D              attn (C, n, S) @ cells (C, S, D)

``init="none"`` (no proxies, P = n = 0: the paper's Table 2 light MLP) is the same table with P = 0 and the
context-free light MLP (:class:`~analysis.proxyv.modules.LightUpdate`): q/o/FFN on B·Nt rows, k/v on B·T
rows, attention B·H·Nt·T, and per vision row only ``light_input_proj`` (2·D·I) and ``light_out_proj``
(2·I·D) -- no ``light_context_proj``, no ``light_fuse``.

``theoretical`` counts per sample without padding or filler slots (P_b, Nv_b, Nt_b, T_b = Nv_b + Nt_b)
and attention only over allowed pairs (``sample_pairs``), as the theoretical figure of the operators.

Shapes come either from ``shapes=`` (:func:`analysis.proxyv.proxyv_shapes` of the real batch: exact
for every layout the model accepts) or are derived from the :class:`~analysis.flops.PrefillTokens`,
which then has to describe ProxyV's full vision tokens, and under these rules:

* the vision positions of a sample are exactly the cells of its crops (``crop_shapes``):
  every crop complete, square (side x side) and all of one size; newline tokens (and anything else)
  are text -- ProxyV computes them as text. ``PrefillTokens.from_counts(..., newline_as="text")``,
  or ``from_batch(..., newline_tokens="text")`` of a LLaVA-1.5 batch, qualify; a LLaVA-NeXT batch
  whose crops lost cells to unpadding does not (error: pass ``shapes=``);
* proxies per crop: (side/F)^2 spatial (F must divide side), side^2 // F^2 learned;
* a sample's crops form one image, so all its proxies read the text before its first vision token
  (only the theoretical attention depends on this; a sample with several images gets its exact
  pairs with ``shapes=``).

On a LLaVA-1.5 batch of single-image samples both ways give the same shapes (tested).

Token groups: proxies (and their rows, keys and pairs) and full vision tokens count as ``vision``;
text rows as ``text``; in the executed figure, padding rows and filler slots (a sample with fewer
proxies, vision or text rows than the batch's largest) as ``padding``. The component totals of
:func:`proxyv_layer_flops` are split over the groups in proportion to their rows (exact: each
component is linear in its rows).

This module imports :mod:`analysis.proxyv` (its shapes and settings); :mod:`analysis.proxyv` never
imports :mod:`analysis.flops`.
"""

from __future__ import annotations

import math

import torch

from ..proxyv.apply import (
    INITS,
    ProxyVSettings,
    ProxyVShapes,
    learned_count,
    shapes_of_layout,
)
from ..variant import Variant
from .decoder import Breakdown, LayerFlops, baseline_flops
from .dims import TextDims
from .tokens import PrefillTokens

QUERY_COMPONENTS = ("q_proj", "o_proj", "attn_scores", "attn_values", "gate_proj", "up_proj", "down_proj")
KV_COMPONENTS = ("k_proj", "v_proj")
VISION_ROW_COMPONENTS = ("light_input_proj", "light_fuse", "light_out_proj")
PROXY_ROW_COMPONENTS = ("light_context_proj",)
DEFAULT_REDUCE_FACTOR = 4
DEFAULT_INIT = "spatial"


# ----------------------------------------------------------------------------- the formulas

def _layer(d: TextDims, B: int, T: int, P: int, Nv: int, Nt: int, keys_per_row: int | None, pairs: int | None,
           I: int, C: int, S: int, n: int, learned: bool, first: bool, context: bool = True) -> dict[str, int]:
    D, H, Hkv, hd, F = d.hidden, d.heads, d.kv_heads, d.head_dim, d.intermediate
    rows, kv_rows = B * (P + Nt), B * (T + P)
    attention = B * H * (P + Nt) * keys_per_row * 2 * hd if pairs is None else 2 * H * hd * pairs
    out = {
        "q_proj": 2 * rows * D * H * hd, "k_proj": 2 * kv_rows * D * Hkv * hd, "v_proj": 2 * kv_rows * D * Hkv * hd,
        "o_proj": 2 * rows * H * hd * D, "attn_scores": attention, "attn_values": attention,
        "gate_proj": 2 * rows * D * F, "up_proj": 2 * rows * D * F, "down_proj": 2 * rows * F * D,
        "light_input_proj": 2 * B * Nv * D * I, "light_context_proj": 2 * B * P * D * I,
        "light_fuse": 2 * B * Nv * 2 * I * I, "light_out_proj": 2 * B * Nv * I * D,
    }
    if not context:  # init "none": the context-free light MLP (no proxies, no fuse)
        del out["light_context_proj"], out["light_fuse"]
    if learned:
        out["splat"] = 2 * C * S * n * I
        if first:
            out.update(init_key_proj=2 * C * S * D * I, init_logits=2 * C * n * S * I, init_pooling=2 * C * n * S * D)
    return out


def proxyv_layer_flops(dims: TextDims, shapes: ProxyVShapes, first: bool, theoretical: bool = False) -> dict[str, int]:
    """FLOPs by component of one ProxyV layer in a prefill (``first``: the start layer).

    ``dims``: the decoder's :class:`TextDims` (or a model config, read through
    :meth:`TextDims.from_config`); ``shapes``: :class:`analysis.proxyv.ProxyVShapes` of the batch.
    """
    d, s = TextDims.of(dims), shapes
    crop = {"I": s.light_width, "C": s.crops, "S": s.cells_per_crop, "n": s.proxies_per_crop,
            "learned": s.learned, "first": first, "context": s.init != "none"}
    if not theoretical:
        return _layer(d, s.batch, s.rows, s.proxies, s.vision_rows, s.text_rows, s.rows + s.proxies, None, **crop)
    total: dict[str, int] = {}
    for b, (P, Nv, Nt, pairs) in enumerate(zip(s.sample_proxies, s.sample_vision, s.sample_text, s.sample_pairs)):
        # Crop-level work (learned splat / init) is shared by the batch: count it once, with sample 0.
        part = _layer(d, 1, Nv + Nt, P, Nv, Nt, None, pairs, **{**crop, "C": crop["C"] if b == 0 else 0})
        total = {k: total.get(k, 0) + v for k, v in part.items()}
    return total


# ----------------------------------------------------------------------------- the family's FLOPs variant

def proxyv_flops(variant: Variant, shapes: ProxyVShapes | None = None, learned_proxies: int = 0) -> ProxyVFlops:
    """The layer-FLOPs variant of a ``proxyv`` :class:`~analysis.variant.Variant` (the family registry's
    ``flops``): its layers, and its ``reduce_factor`` / ``init`` / ``light_width`` options (missing or
    ``None``: 4, spatial, hidden // 4, or those of ``shapes``)."""
    options = variant.options
    return ProxyVFlops(variant.layers, reduce_factor=options.get("reduce_factor"), init=options.get("init"),
                       light_width=options.get("light_width"), shapes=shapes, learned_proxies=learned_proxies)


class ProxyVFlops:
    """ProxyV from ``layers[0]`` through the last layer.

    Args:
        layers: the ProxyV layers, ``range(L, n_layers)``.
        reduce_factor: F (default 4, or that of ``shapes``).
        init: ``"spatial"``, ``"learned"`` or ``"none"`` (default spatial, or that of ``shapes``).
        light_width: I of the light MLP; default hidden // 4 (or that of ``shapes``). ``0`` = default.
        shapes: :class:`~analysis.proxyv.ProxyVShapes` of the counted batch (exact for any batch), or
            ``None``: derived from the tokens (see the module docstring).
    """

    name = "proxyv"

    def __init__(self, layers, reduce_factor: int | None = None, init: str | None = None,
                 light_width: int | None = None, shapes: ProxyVShapes | None = None, learned_proxies: int = 0):
        self.layers = tuple(layers)
        self.learned_proxies = learned_proxies  # learned proxies per crop where set (Qwen-VL: required for learned)
        if not self.layers or list(self.layers) != list(range(self.layers[0], self.layers[-1] + 1)):
            raise ValueError(f"ProxyV runs on consecutive layers from its start layer to the last one, "
                             f"got {list(self.layers)}")
        for option, value in (("reduce_factor", reduce_factor), ("light_width", light_width)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise TypeError(f"{option} must be an int, got {value!r}")
        if reduce_factor is not None and reduce_factor < 1:
            raise ValueError(f"reduce_factor must be >= 1, got {reduce_factor}")
        if init is not None and init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        if light_width is not None and light_width < 0:
            raise ValueError(f"light_width must be >= 1 (or 0 for hidden // 4), got {light_width}")
        if shapes is not None:
            _check_shapes(shapes, reduce_factor, init, light_width)
        self.start = self.layers[0]
        self.reduce_factor = reduce_factor or DEFAULT_REDUCE_FACTOR
        self.init = init or (shapes.init if shapes is not None else DEFAULT_INIT)
        self.light_width = light_width or None
        self.shapes = shapes
        self._cached: tuple | None = None  # (tokens, dims, {first: LayerFlops parts}) of the last tokens counted

    def layer_flops(self, layer: int, dims: TextDims, tokens: PrefillTokens) -> LayerFlops:
        if self.layers[-1] != dims.layers - 1:
            raise ValueError(f"ProxyV runs from start_layer={self.start} through the last layer ({dims.layers - 1}); "
                             f"got layers {self.start}..{self.layers[-1]}: drop end_layer")
        windowed = [i for i in self.layers if dims.windows[i] is not None]
        if windowed:
            raise ValueError(f"ProxyV does not support sliding-window attention (layers {windowed})")
        parts = self._parts(dims, tokens)
        if layer < self.start or parts is None:  # below L, or no vision cells: HF's own layer runs
            return baseline_flops().layer_flops(layer, dims, tokens)
        executed, theoretical = parts[layer == self.start]
        return LayerFlops(layer, True, executed, theoretical)

    def _parts(self, dims: TextDims, tokens: PrefillTokens):
        if self._cached is None or self._cached[0] is not tokens or self._cached[1] != dims:
            self._cached = (tokens, dims, self._compute(dims, tokens))
        return self._cached[2]

    def _compute(self, dims: TextDims, tokens: PrefillTokens):
        width = self.light_width or dims.hidden // 4
        if self.shapes is not None:
            shapes = self.shapes
            _check_tokens(shapes, tokens)
        elif tokens.vision_grids:  # Qwen-VL: the plan of the layout the tokens record
            shapes = qwen_shapes(tokens, self.start, self.reduce_factor, self.init, width, self.learned_proxies,
                                 dims.hidden)
            if shapes is None:
                return None
        else:
            shapes = derive_shapes(tokens, self.reduce_factor, self.init == "learned", width,
                                   proxies=self.init != "none", learned_proxies=self.learned_proxies)
            if shapes is None:
                return None
        groups = _row_groups(shapes, _text_pairs(tokens))
        parts = {}
        for first in (True, False):
            executed = proxyv_layer_flops(dims, shapes, first)
            theoretical = proxyv_layer_flops(dims, shapes, first, theoretical=True)
            parts[first] = (_split(executed, groups["executed"]), _split(theoretical, groups["theoretical"]))
        return parts


def _check_shapes(shapes: ProxyVShapes, reduce_factor, init, light_width) -> None:
    if init is not None and init != shapes.init:
        raise ValueError(f"init={init!r} but shapes= were made for init={shapes.init!r}")
    if light_width and light_width != shapes.light_width:
        raise ValueError(f"light_width={light_width} but shapes= were made for light_width={shapes.light_width}")
    side = math.isqrt(shapes.cells_per_crop)
    # Spatial proxies on square crops (LLaVA): (side/f)^2 each. Learned counts may be set (learned_proxies), and
    # Qwen-VL grids lie on a common H x W grid: their shapes come from the plan itself, nothing to re-derive.
    if reduce_factor is not None and shapes.init == "spatial" and side * side == shapes.cells_per_crop:
        n = (side // reduce_factor) ** 2
        if n != shapes.proxies_per_crop:
            raise ValueError(f"reduce_factor={reduce_factor} gives {n} proxies per {side}x{side} crop, but shapes= "
                             f"have {shapes.proxies_per_crop}")


def _check_tokens(shapes: ProxyVShapes, tokens: PrefillTokens) -> None:
    if (shapes.batch, shapes.rows) != (tokens.batch, tokens.seq_len):
        raise ValueError(f"shapes= describe a ({shapes.batch}, {shapes.rows}) batch, the tokens are "
                         f"({tokens.batch}, {tokens.seq_len})")
    vision = tuple((tokens.vision & tokens.valid).sum(1).tolist())
    if vision != tuple(shapes.sample_vision):
        raise ValueError(f"the tokens mark {list(vision)} vision tokens per sample, ProxyV has "
                         f"{list(shapes.sample_vision)} full vision tokens: build them with newline tokens as text, "
                         "PrefillTokens.from_batch(batch, config, newline_tokens='text')")


def qwen_shapes(tokens: PrefillTokens, start_layer: int, reduce_factor: int, init: str, light_width: int,
                learned_proxies: int, hidden: int) -> ProxyVShapes | None:
    """ProxyV shapes of Qwen-VL prefill tokens (vision mask, blocks and grids in sequence order, as the runner
    records them): the plan of the layout they describe, exactly as :func:`analysis.proxyv.proxyv_shapes` makes it
    from the batch."""
    from ..layout_qwen import layout_of_tokens

    if init == "learned" and not learned_proxies:
        raise ValueError("learned ProxyV on Qwen-VL needs its proxies per block: pass learned_proxies=N (CLI: "
                         "--learned-proxies N; a ProxyV checkpoint's config.proxyv has it)")
    settings = ProxyVSettings(start_layer, reduce_factor, init, light_width, learned_proxies)
    return shapes_of_layout(layout_of_tokens(tokens, "qwen"), settings, hidden)


def derive_shapes(tokens: PrefillTokens, reduce_factor: int, learned: bool, light_width: int,
                  partial: bool = False, proxies: bool = True, learned_proxies: int = 0,
                  crops_kept: tuple[int, ...] | None = None) -> ProxyVShapes | None:
    """ProxyV shapes from prefill tokens whose vision positions are their crops' cells (module docstring);
    ``None`` without vision tokens. ``partial`` (learned proxies only): a sample's cells may be fewer than its
    crops hold (token reduction before the start layer), each crop assumed to keep at least one cell unless
    ``crops_kept`` (per sample how many of its crops keep one, from an execution's kept tokens) says otherwise.
    ``proxies=False``: init "none" (no proxy per crop; ``reduce_factor`` and ``learned`` unused).
    ``learned_proxies``: learned proxies per crop where the checkpoint sets it (else side^2 // f^2)."""
    cells = tokens.vision & tokens.valid
    per_sample = cells.sum(1).tolist()
    if not any(per_sample):
        return None
    if len(tokens.crop_shapes) != tokens.batch:
        raise ValueError("the tokens have no crop shapes; ProxyV counts need each sample's crop grids")
    grids = {shape for crops in tokens.crop_shapes for shape in crops}
    if len(grids) != 1 or any(r != c for r, c in grids):
        raise ValueError(f"ProxyV counts need square crop grids all of one size (tokens per crop a square), "
                         f"got {sorted(grids)}")
    side = next(iter(grids))[0]
    if not proxies:
        learned = False
    elif not learned and side % reduce_factor:
        divisors = [d for d in range(1, side + 1) if side % d == 0]
        raise ValueError(f"reduce_factor={reduce_factor} does not divide the {side}x{side} crop grid, which spatial "
                         f"proxies need; use one of {divisors}, or init='learned'")
    if learned and not learned_count(learned_proxies, reduce_factor, side, side):
        raise ValueError(f"reduce_factor={reduce_factor} leaves no proxy for a {side}x{side} crop grid")
    n = (0 if not proxies else learned_count(learned_proxies, reduce_factor, side, side) if learned
         else (side // reduce_factor) ** 2)
    if partial and not learned:
        raise ValueError("partial crops (token reduction before ProxyV) need learned proxies")
    for b, (count, crops) in enumerate(zip(per_sample, tokens.crop_shapes)):
        if count > len(crops) * side * side if partial else count != len(crops) * side * side:
            raise ValueError(
                f"sample {b}: the tokens mark {count} vision tokens but its {len(crops)} crops hold "
                f"{len(crops) * side * side} cells; ProxyV counts from tokens need exactly the crop cells as vision "
                "tokens, every crop complete (newline tokens as text: from_counts(..., newline_as='text'), "
                "from_batch(..., newline_tokens='text')); for LLaVA-NeXT batches with unpadded crops pass "
                "shapes=proxyv_shapes(...)")
    B, T = tokens.batch, tokens.seq_len
    if crops_kept is not None and not partial:
        raise ValueError("crops_kept describes partial crops (token reduction before ProxyV): pass partial=True")
    alive = [len(crops) if count else 0 for count, crops in zip(per_sample, tokens.crop_shapes)]
    if crops_kept is not None:
        alive = [min(k, a) for k, a in zip(crops_kept, alive)]
    proxies = [a * n for a in alive]
    text_valid = (tokens.valid & ~cells).sum(1).tolist()
    pairs = []
    for b in range(B):
        vision = cells[b][tokens.valid[b]]
        before = int((~vision).long().cumsum(0)[vision.long().argmax()]) if per_sample[b] else 0  # text before image
        P = proxies[b]
        pairs.append(_sample_text_pairs(vision) + P * before + P * (P + 1) // 2)
    return ProxyVShapes(
        batch=B, rows=T, proxies=max(proxies), vision_rows=max(per_sample), text_rows=max(T - c for c in per_sample),
        crops=sum(alive), cells_per_crop=side * side, proxies_per_crop=n, light_width=light_width, learned=learned,
        counts=tuple(((n,) * a,) if a else () for a in alive),
        sample_proxies=tuple(proxies), sample_vision=tuple(per_sample), sample_text=tuple(text_valid),
        sample_pairs=tuple(pairs),
    )


def _sample_text_pairs(vision: torch.Tensor) -> int:
    """(query, key) pairs of a sample's text queries: causal over its valid tokens, cells included.

    ``vision``: (n,) bool over the sample's valid tokens; the token at valid index j reads j + 1 keys."""
    reads = torch.arange(1, vision.shape[0] + 1)
    return int(reads[~vision].sum())


def _text_pairs(tokens: PrefillTokens) -> list[int]:
    cells = tokens.vision & tokens.valid
    return [_sample_text_pairs(cells[b][tokens.valid[b]]) for b in range(tokens.batch)]


def _row_groups(s: ProxyVShapes, text_pairs: list[int]) -> dict[str, dict[str, dict[str, int]]]:
    """Per component kind, the rows (or pairs) of each token group, executed and theoretical."""
    P, Nv, Nt = sum(s.sample_proxies), sum(s.sample_vision), sum(s.sample_text)
    query_slots, kv_slots = s.batch * (s.proxies + s.text_rows), s.batch * (s.rows + s.proxies)
    text = sum(text_pairs)
    executed = {
        "query": {"vision": P, "text": Nt, "padding": query_slots - P - Nt},
        "kv": {"vision": Nv + P, "text": Nt, "padding": kv_slots - Nv - P - Nt},
        "vision_rows": {"vision": Nv, "padding": s.batch * s.vision_rows - Nv},
        "proxy_rows": {"vision": P, "padding": s.batch * s.proxies - P},
    }
    theoretical = {
        "query": {"vision": P, "text": Nt},
        "pairs": {"vision": sum(s.sample_pairs) - text, "text": text},
        "kv": {"vision": Nv + P, "text": Nt},
        "vision_rows": {"vision": Nv},
        "proxy_rows": {"vision": P},
    }
    executed["pairs"] = executed["query"]  # full rectangle: every query slot scores T + P keys
    return {"executed": executed, "theoretical": theoretical}


def _split(components: dict[str, int], groups: dict[str, dict[str, int]]) -> Breakdown:
    """component -> group -> FLOPs, each component's total split in proportion to its rows."""
    out: Breakdown = {}
    for name, total in components.items():
        if name in QUERY_COMPONENTS:
            rows = groups["pairs"] if name.startswith("attn_") else groups["query"]
        elif name in KV_COMPONENTS:
            rows = groups["kv"]
        elif name in VISION_ROW_COMPONENTS:
            rows = groups["vision_rows"]
        elif name in PROXY_ROW_COMPONENTS:
            rows = groups["proxy_rows"]
        else:  # learned splat / initializer: crop-level work on vision tokens
            rows = {"vision": 1}
        n = sum(rows.values())
        if n == 0:
            out[name] = {group: 0 for group in rows}
            continue
        per_row, rest = divmod(total, n)
        if rest or min(rows.values()) < 0:
            raise AssertionError(f"{name}: {total} FLOPs do not split over rows {rows}")
        out[name] = {group: per_row * count for group, count in rows.items()}
    return out
