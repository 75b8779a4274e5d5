"""ProxyV as a variant of :mod:`analysis.flops`: ``count_flops(..., "proxyv", range(L, n), reduce_factor=F)``.

    from analysis.flops import TokenLayout, count_flops
    # from counts (one image of complete crops; what the CLI's --op proxyv counts)
    report = count_flops(config, TokenLayout.from_counts(576, 64, 576), "proxyv", start_layer=16, reduce_factor=4)
    # a real batch, exactly what the ProxyV model executes (AnyRes unpadding, several images, padding)
    layout = TokenLayout.from_batch(batch, config, newline_tokens="text")
    shapes = proxyv_shapes(config, batch["input_ids"], batch["attention_mask"], batch.get("image_sizes"),
                           settings={"start_layer": 16, "reduce_factor": 4, "init": "spatial"})
    report = count_flops(config, layout, "proxyv", start_layer=16, shapes=shapes)

Layers below the start layer L are the baseline. Each layer >= L is counted by
:func:`analysis.proxyv.cost.proxyv_layer_flops` (the formulas live there, next to the runtime, and
are tested against torch's counter) from the batch's :class:`~analysis.proxyv.ProxyVShapes`:
``q_proj`` ... ``down_proj`` and ``attn_scores`` / ``attn_values`` as for any layer, plus the light
MLP (``light_input_proj``, ``light_context_proj``, ``light_fuse``, ``light_out_proj``) and, for
``init="learned"``, ``splat`` in every layer and ``init_key_proj``, ``init_logits``,
``init_pooling`` at layer L. Executed: the padded batch, attention as the full rectangle
(queries [proxies, text] x keys [sequence, proxies]); theoretical: per sample, allowed pairs only.

Shapes come either from ``shapes=`` (:func:`analysis.proxyv.proxyv_shapes` of the real batch: exact
for every layout the model accepts) or are derived from the :class:`~analysis.flops.TokenLayout`,
which then has to describe ProxyV's full vision tokens, and under these rules:

* the layout's vision positions of a sample are exactly the cells of its crops (``crop_shapes``):
  every crop complete, square (side x side) and all of one size; newline tokens (and anything else)
  are text -- ProxyV computes them as text. ``TokenLayout.from_counts(..., newline_as="text")``,
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
:mod:`~analysis.proxyv.cost` are split over the groups in proportion to their rows (exact: each
component is linear in its rows).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from ..flops import (
    Breakdown,
    LayerFlops,
    OperatorVariant,
    TextDims,
    TokenLayout,
    register_variant,
)
from ..ops import get_operator
from .apply import INITS, ProxyVShapes
from .cost import proxyv_layer_flops

QUERY_COMPONENTS = ("q_proj", "o_proj", "attn_scores", "attn_values", "gate_proj", "up_proj", "down_proj")
KV_COMPONENTS = ("k_proj", "v_proj")
VISION_ROW_COMPONENTS = ("light_input_proj", "light_fuse", "light_out_proj")
PROXY_ROW_COMPONENTS = ("light_context_proj",)


class ProxyVFlops:
    """The ``"proxyv"`` variant: ProxyV from ``layers[0]`` through the last layer.

    Args:
        layers: the ProxyV layers, ``range(L, n_layers)``.
        reduce_factor: F (default 4, or that of ``shapes``).
        init: ``"spatial"`` or ``"learned"`` (default spatial, or that of ``shapes``).
        light_width: I of the light MLP; default hidden // 4 (or that of ``shapes``). ``0`` = default.
        shapes: :class:`~analysis.proxyv.ProxyVShapes` of the counted batch (exact for any batch), or
            ``None``: derived from the layout (see the module docstring).
    """

    name = "proxyv"

    def __init__(self, layers, reduce_factor: int | None = None, init: str | None = None,
                 light_width: int | None = None, shapes: ProxyVShapes | None = None):
        self.layers = tuple(layers)
        if not self.layers or list(self.layers) != list(range(self.layers[0], self.layers[-1] + 1)):
            raise ValueError(f"ProxyV runs on consecutive layers from its start layer to the last one, "
                             f"got {list(self.layers)}")
        for option, value in (("reduce_factor", reduce_factor), ("light_width", light_width)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise TypeError(f"{option} must be an int, got {value!r}")
        if reduce_factor is not None and reduce_factor < 1:
            raise ValueError(f"reduce_factor must be >= 1, got {reduce_factor}")
        if init is not None and init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if light_width is not None and light_width < 0:
            raise ValueError(f"light_width must be >= 1 (or 0 for hidden // 4), got {light_width}")
        if shapes is not None:
            _check_shapes(shapes, reduce_factor, init, light_width)
        self.start = self.layers[0]
        self.reduce_factor = reduce_factor or 4
        self.init = init or ("learned" if shapes is not None and shapes.learned else "spatial")
        self.light_width = light_width or None
        self.shapes = shapes
        self._cached: tuple | None = None  # (layout, dims, {first: LayerFlops parts}) of the last layout counted

    def layer_flops(self, layer: int, dims: TextDims, layout: TokenLayout) -> LayerFlops:
        if self.layers[-1] != dims.layers - 1:
            raise ValueError(f"ProxyV runs from start_layer={self.start} through the last layer ({dims.layers - 1}); "
                             f"got layers {self.start}..{self.layers[-1]}: drop end_layer")
        windowed = [i for i in self.layers if dims.windows[i] is not None]
        if windowed:
            raise ValueError(f"ProxyV does not support sliding-window attention (layers {windowed})")
        parts = self._parts(dims, layout)
        if layer < self.start or parts is None:  # below L, or no vision cells: HF's own layer runs
            return OperatorVariant(get_operator("none"), ()).layer_flops(layer, dims, layout)
        executed, theoretical = parts[layer == self.start]
        return LayerFlops(layer, True, executed, theoretical)

    # ------------------------------------------------------------------ shapes and breakdowns

    def _parts(self, dims: TextDims, layout: TokenLayout):
        if self._cached is None or self._cached[0] is not layout or self._cached[1] != dims:
            self._cached = (layout, dims, self._compute(dims, layout))
        return self._cached[2]

    def _compute(self, dims: TextDims, layout: TokenLayout):
        width = self.light_width or dims.hidden // 4
        if self.shapes is not None:
            shapes = self.shapes
            _check_layout(shapes, layout)
        else:
            shapes = derive_shapes(layout, self.reduce_factor, self.init == "learned", width)
            if shapes is None:
                return None
        text_pairs = _text_pairs(layout)
        groups = _row_groups(shapes, text_pairs)
        config = _config_of(dims)
        parts = {}
        for first in (True, False):
            executed = proxyv_layer_flops(config, shapes, first)
            theoretical = proxyv_layer_flops(config, shapes, first, theoretical=True)
            parts[first] = (_split(executed, groups["executed"]), _split(theoretical, groups["theoretical"]))
        return parts


def _config_of(dims: TextDims) -> SimpleNamespace:
    """What :func:`analysis.proxyv.cost.text_dims` reads of a config, from :class:`TextDims`."""
    return SimpleNamespace(hidden_size=dims.hidden, num_attention_heads=dims.heads, num_key_value_heads=dims.kv_heads,
                           head_dim=dims.head_dim, intermediate_size=dims.intermediate)


def _check_shapes(shapes: ProxyVShapes, reduce_factor, init, light_width) -> None:
    if init is not None and (init == "learned") != shapes.learned:
        raise ValueError(f"init={init!r} but shapes= were made for init={'learned' if shapes.learned else 'spatial'!r}")
    if light_width and light_width != shapes.light_width:
        raise ValueError(f"light_width={light_width} but shapes= were made for light_width={shapes.light_width}")
    if reduce_factor is not None:
        side = math.isqrt(shapes.cells_per_crop)
        n = side * side // reduce_factor**2 if shapes.learned else (side // reduce_factor) ** 2
        if n != shapes.proxies_per_crop:
            raise ValueError(f"reduce_factor={reduce_factor} gives {n} proxies per {side}x{side} crop, but shapes= "
                             f"have {shapes.proxies_per_crop}")


def _check_layout(shapes: ProxyVShapes, layout: TokenLayout) -> None:
    if (shapes.batch, shapes.rows) != (layout.batch, layout.seq_len):
        raise ValueError(f"shapes= describe a ({shapes.batch}, {shapes.rows}) batch, the layout is "
                         f"({layout.batch}, {layout.seq_len})")
    vision = tuple((layout.vision & layout.valid).sum(1).tolist())
    if vision != tuple(shapes.sample_vision):
        raise ValueError(f"the layout marks {list(vision)} vision tokens per sample, ProxyV has "
                         f"{list(shapes.sample_vision)} full vision tokens: build it with newline tokens as text, "
                         "TokenLayout.from_batch(batch, config, newline_tokens='text')")


def derive_shapes(layout: TokenLayout, reduce_factor: int, learned: bool, light_width: int) -> ProxyVShapes | None:
    """ProxyV shapes from a token layout whose vision positions are its crops' cells (module docstring);
    ``None`` without vision tokens."""
    cells = layout.vision & layout.valid
    per_sample = cells.sum(1).tolist()
    if not any(per_sample):
        return None
    if len(layout.crop_shapes) != layout.batch:
        raise ValueError("the layout has no crop shapes; ProxyV counts need each sample's crop grids")
    grids = {shape for crops in layout.crop_shapes for shape in crops}
    if len(grids) != 1 or any(r != c for r, c in grids):
        raise ValueError(f"ProxyV counts need square crop grids all of one size (tokens per crop a square), "
                         f"got {sorted(grids)}")
    side = next(iter(grids))[0]
    if not learned and side % reduce_factor:
        divisors = [d for d in range(1, side + 1) if side % d == 0]
        raise ValueError(f"reduce_factor={reduce_factor} does not divide the {side}x{side} crop grid, which spatial "
                         f"proxies need; use one of {divisors}, or init='learned'")
    if learned and side * side < reduce_factor**2:
        raise ValueError(f"reduce_factor={reduce_factor} leaves no proxy for a {side}x{side} crop grid")
    n = side * side // reduce_factor**2 if learned else (side // reduce_factor) ** 2
    for b, (count, crops) in enumerate(zip(per_sample, layout.crop_shapes)):
        if count != len(crops) * side * side:
            raise ValueError(
                f"sample {b}: the layout marks {count} vision tokens but its {len(crops)} crops hold "
                f"{len(crops) * side * side} cells; ProxyV counts from a layout need exactly the crop cells as vision "
                "tokens, every crop complete (newline tokens as text: from_counts(..., newline_as='text'), "
                "from_batch(..., newline_tokens='text')); for LLaVA-NeXT batches with unpadded crops pass "
                "shapes=proxyv_shapes(...)")
    B, T = layout.batch, layout.seq_len
    proxies = [len(crops) * n if count else 0 for count, crops in zip(per_sample, layout.crop_shapes)]
    text_valid = (layout.valid & ~cells).sum(1).tolist()
    pairs = []
    for b in range(B):
        vision = cells[b][layout.valid[b]]
        before = int((~vision).long().cumsum(0)[vision.long().argmax()]) if per_sample[b] else 0  # text before image
        P = proxies[b]
        pairs.append(_sample_text_pairs(vision) + P * before + P * (P + 1) // 2)
    return ProxyVShapes(
        batch=B, rows=T, proxies=max(proxies), vision_rows=max(per_sample), text_rows=max(T - c for c in per_sample),
        crops=sum(len(crops) for count, crops in zip(per_sample, layout.crop_shapes) if count),
        cells_per_crop=side * side, proxies_per_crop=n, light_width=light_width, learned=learned,
        counts=tuple(((n,) * len(crops),) if count else () for count, crops in zip(per_sample, layout.crop_shapes)),
        sample_proxies=tuple(proxies), sample_vision=tuple(per_sample), sample_text=tuple(text_valid),
        sample_pairs=tuple(pairs),
    )


def _sample_text_pairs(vision: torch.Tensor) -> int:
    """(query, key) pairs of a sample's text queries: causal over its valid tokens, cells included.

    ``vision``: (n,) bool over the sample's valid tokens; the token at valid index j reads j + 1 keys."""
    reads = torch.arange(1, vision.shape[0] + 1)
    return int(reads[~vision].sum())


def _text_pairs(layout: TokenLayout) -> list[int]:
    cells = layout.vision & layout.valid
    return [_sample_text_pairs(cells[b][layout.valid[b]]) for b in range(layout.batch)]


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


register_variant("proxyv", ProxyVFlops)
