"""FLOPs of token reduction on a ProxyV model (learned proxies), as :mod:`analysis.reduction` executes it:
FastV / PyramidDrop whose every drop comes at or before ProxyV's start layer L (:class:`ProxyVReductionFlops`),
and VisionZip (:class:`VisionZipProxyVFlops`).

Layers below L are :class:`~analysis.flops.reduction.ReductionFlops`' (HF layers, pruned layers, rankings).
From L on, the ProxyV layer of :mod:`analysis.flops.proxyv` runs on the rows of the stage alive at L, a (B, N)
block: N = that stage's width, fillers first (padding), each sample's kept vision tokens its cells. Its
shapes are :func:`~analysis.flops.proxyv.derive_shapes` of that block with ``partial=True``: every crop with a
kept cell gets the learned proxies of a whole crop. From tokens alone the count ASSUMES every crop keeps at
least one cell (true unless a crop loses all its tokens) and places the kept vision tokens as
:func:`kept_vision_mask` places them (spread over the sample's vision positions); given ``kept`` (an execution's
kept vision tokens, which the plugin records with each prompt) the block is those tokens and only the crops that
keep a cell get proxies (:func:`crops_kept`), exact where the ranking empties a whole image too
(``tests/test_flops_proxyv_reduction.py``).
Vision tokens must be crop cells (LLaVA-1.5, or LLaVA-NeXT counted with newline tokens as text) and crops
square: LLaVA-NeXT's unpadded crops are not counted here (one clear error).

Qwen2-VL / Qwen2.5-VL / Qwen3-VL (tokens with ``vision_grids``): the block's shapes are the execution's own plan
(:func:`qwen_block_shapes`: the tokens' layout, :func:`analysis.proxyv.plan.remap_layout`, ``shapes_of_layout``),
each image and video block with a kept cell getting its ``learned_proxies``. The count ASSUMES the blocks keeping a
cell are those the even placement of the kept tokens (:func:`~analysis.flops.reduction.kept_rows`) reaches;
the ranking may empty a whole block of a video (then the count includes that block's proxies: an over-count of
their rows), unless ``kept`` gives the execution's kept tokens: the plugin records them with each prompt
(``kept_vision``), so a run's recorded FLOPs are exact. ``tests/test_flops_proxyv_reduction_qwen.py`` checks the
count against torch's counter and, where the execution emptied a block, that the count given the execution's kept
tokens (also through the plugin's record and the runner's count) is exact.

VisionZip: the shortened prefill of :class:`~analysis.flops.visionzip.VisionZipFlops` (its tower, selection and
projector as the vision figure), its baseline layers below L, and from L ProxyV's layer on it: every crop's
D + C merged tokens are cells of a side x side grid (the rest removed), each crop with its learned proxies --
exact, no assumption (every crop keeps D + C >= 1 tokens).
"""

from __future__ import annotations

import torch

from ..reduction.rules import check_on_proxyv, drops
from .decoder import LayerFlops
from .dims import TextDims
from .proxyv import DEFAULT_REDUCE_FACTOR, ProxyVFlops, derive_shapes
from .reduction import ReductionFlops, Rows, kept_rows, kept_vision_mask, sample_counts
from .tokens import PrefillTokens
from .visionzip import VisionZipFlops


def block_tokens(tokens: PrefillTokens, rows: Rows, kept=None) -> PrefillTokens:
    """The (B, N) block of a stage as prefill tokens: each sample's kept sequence right-aligned, fillers first.
    ``kept``: per sample the positions of the vision tokens an execution kept (else placed evenly)."""
    B, N = rows.batch, rows.width
    vision = torch.zeros(B, N, dtype=torch.bool)
    valid = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        if kept is None:
            sequence = kept_vision_mask(tokens.vision[b][tokens.valid[b]], rows.vision[b])
        else:
            alive = tokens.valid[b] & ~tokens.vision[b]
            alive[torch.as_tensor(kept[b], dtype=torch.long)] = True
            sequence = tokens.vision[b][alive]
        vision[b, N - len(sequence):] = sequence
        valid[b, N - len(sequence):] = True
    return PrefillTokens(vision, valid, tokens.crop_shapes)


def crops_kept(tokens: PrefillTokens, kept) -> tuple[int, ...]:
    """Per sample how many of its crops hold one of the ``kept`` vision positions (LLaVA: crops of equal size, their
    cells the sample's vision tokens in order)."""
    counts = []
    for b, crops in enumerate(tokens.crop_shapes):
        vision = (tokens.vision[b] & tokens.valid[b]).nonzero().flatten()
        if not crops or not len(vision):
            counts.append(0)
            continue
        cells = crops[0][0] * crops[0][1]
        rank = torch.searchsorted(vision, torch.as_tensor(kept[b], dtype=torch.long))
        counts.append(len(set((rank // cells).tolist())))
    return tuple(counts)


def qwen_block_shapes(tokens: PrefillTokens, rows: Rows, settings: dict, hidden: int, kept=None):
    """Qwen-VL: ProxyV's shapes on the (B, N) block alive at L, planned as the execution plans it
    (:func:`analysis.proxyv.plan.remap_layout` of the tokens' layout, then its plan), right-aligned, fillers first.
    Each sample's kept vision tokens: ``kept`` (per sample the positions an execution kept, e.g. the last stage
    of ``Reduction.kept_vision``), else placed as :func:`~analysis.flops.reduction.kept_rows` places them (evenly
    over the sample's vision positions: which blocks keep a cell is then an assumption, see the module docstring)."""
    from ..layout_qwen import layout_of_tokens
    from ..proxyv.apply import ProxyVSettings, shapes_of_layout
    from ..proxyv.plan import remap_layout

    if not settings.get("learned_proxies"):
        raise ValueError("learned ProxyV on Qwen-VL needs its proxies per block: pass learned_proxies=N (CLI: "
                         "--learned-proxies N; a ProxyV checkpoint's config.proxyv has it)")
    B, N = rows.batch, rows.width
    slot_of = torch.full((B, tokens.seq_len), -1, dtype=torch.long)
    valid = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        where = tokens.valid[b].nonzero().flatten()
        if kept is None:
            alive = where[kept_rows(tokens.vision[b][where], rows.vision[b])]
        else:
            text = where[~tokens.vision[b][where]]
            alive = torch.cat([text, torch.as_tensor(kept[b], dtype=torch.long).cpu()]).sort().values
        slot_of[b, alive] = torch.arange(N - len(alive), N)
        valid[b, N - len(alive):] = True
    layout = remap_layout(layout_of_tokens(tokens, "qwen"), slot_of, valid)
    return shapes_of_layout(layout, ProxyVSettings.from_dict(settings), hidden)


def proxyv_on_block(block: PrefillTokens, settings: dict, dims: TextDims,
                    alive_crops: tuple[int, ...] | None = None) -> ProxyVFlops | None:
    """ProxyV's layer-FLOPs variant (learned proxies, ``settings`` as ``config.proxyv`` holds them) on the ``block``
    a reduction leaves: its vision tokens are cells of its crops, possibly fewer than a crop holds; ``None``
    without a vision token. ``alive_crops``: per sample how many crops keep a cell (default: all of them)."""
    factor, width = settings.get("reduce_factor") or DEFAULT_REDUCE_FACTOR, settings.get("light_width") or None
    shapes = derive_shapes(block, factor, True, width or dims.hidden // 4, partial=True,
                           learned_proxies=settings.get("learned_proxies", 0), crops_kept=alive_crops)
    if shapes is None:
        return None
    return ProxyVFlops(range(settings["start_layer"], dims.layers), factor, "learned", width, shapes=shapes)


class ProxyVReductionFlops(ReductionFlops):
    """FastV (``layers`` = K..L-1) or PyramidDrop (its boundaries) on a ProxyV model with ``proxyv`` settings
    (a dict as ``config.proxyv`` holds them: start_layer, reduce_factor, init, light_width). ``kept``: per sample
    the vision positions the execution kept (``Reduction.kept_vision[-1]``), for the crops / blocks that keep a cell
    exactly; by default they are placed evenly (module docstring)."""

    def __init__(self, method: str, layers, keep: float, proxyv: dict, kept=None):
        super().__init__(method, layers, keep)
        self.kept = kept  # per sample the vision positions an execution kept (exact crops / blocks); None: placed
        check_on_proxyv(method, proxyv["start_layer"], drops(method, self.layers), proxyv.get("init"))
        self.proxyv = dict(proxyv)
        self.start = proxyv["start_layer"]
        self._proxy: tuple | None = None  # (tokens, block, ProxyVFlops) of the last tokens counted

    def _proxyv(self, dims: TextDims, tokens: PrefillTokens):
        if self._proxy is None or self._proxy[0] is not tokens:
            cells = [sum(r * c for r, c in crops) for crops in tokens.crop_shapes]
            if len(cells) != tokens.batch or any(v > c for v, c in zip(sample_counts(tokens)[0], cells)):
                raise ValueError("counting token reduction on a ProxyV model needs the vision tokens to be crop cells "
                                 "(count LLaVA-NeXT with newline tokens as text) and the tokens' crop shapes")
            rows = self.schedule(tokens).rows_at(self.start)
            block = block_tokens(tokens, rows, self.kept)
            if tokens.vision_grids:  # Qwen-VL: the plan of the block (grids of any shape, blocks per video)
                shapes = qwen_block_shapes(tokens, rows, self.proxyv, dims.hidden, self.kept)
                proxyv = None if shapes is None else ProxyVFlops(
                    range(self.start, dims.layers), self.proxyv.get("reduce_factor"), "learned",
                    self.proxyv.get("light_width") or None, shapes=shapes)
            else:  # LLaVA: crops of one size; with kept, only the crops that keep a cell get proxies
                alive = None if self.kept is None else crops_kept(tokens, self.kept)
                proxyv = proxyv_on_block(block, self.proxyv, dims, alive)
            self._proxy = (tokens, block, proxyv)
        return self._proxy[1], self._proxy[2]

    def layer_flops(self, layer: int, dims: TextDims, tokens: PrefillTokens) -> LayerFlops:
        counted = super().layer_flops(layer, dims, tokens)
        if layer < self.start or not self.active(tokens):
            return counted
        block, proxyv = self._proxyv(dims, tokens)
        if proxyv is None:  # no vision token left at L: the pruned layer
            return counted
        own = proxyv.layer_flops(layer, dims, block)
        ranking = {k: v for k, v in counted.executed.items() if k.startswith("rank_")}
        ranking_theory = {k: v for k, v in counted.theoretical.items() if k.startswith("rank_")}
        return LayerFlops(layer, True, {**own.executed, **ranking}, {**own.theoretical, **ranking_theory})


class VisionZipProxyVFlops(VisionZipFlops):
    """VisionZip (``dominant`` D, ``contextual`` C) on a ProxyV model with ``proxyv`` settings (learned)."""

    def __init__(self, dominant: int, contextual: int, proxyv: dict, config=None):
        check_on_proxyv("visionzip", proxyv["start_layer"], init=proxyv.get("init"))
        self.proxyv = dict(proxyv)
        self.start = proxyv["start_layer"]
        self._proxy: tuple | None = None
        super().__init__(dominant, contextual, config)

    def with_config(self, config) -> VisionZipProxyVFlops:
        return VisionZipProxyVFlops(self.dominant, self.contextual, self.proxyv, config)

    def _proxyv(self, dims: TextDims, tokens: PrefillTokens):
        if self._proxy is None or self._proxy[0] is not tokens:
            vision = self._need_config().vision_config
            side = vision.image_size // vision.patch_size
            if self.per_crop > side * side:
                raise ValueError(f"visionzip on a ProxyV model: dominant + contextual = {self.per_crop} exceeds the "
                                 f"{side * side} cells of a crop its learned proxies attend over")
            crops = [sum(c for _, c in images) for images in self._prepared(tokens)[2]]
            short = self.shortened(tokens)
            block = PrefillTokens(short.vision, short.valid, tuple(((side, side),) * c for c in crops))
            self._proxy = (tokens, block, proxyv_on_block(block, self.proxyv, dims))
        return self._proxy[1], self._proxy[2]

    def layer_flops(self, layer: int, dims: TextDims, tokens: PrefillTokens) -> LayerFlops:
        if layer < self.start or not self.active(tokens):
            return super().layer_flops(layer, dims, tokens)
        block, proxyv = self._proxyv(dims, tokens)
        return super().layer_flops(layer, dims, tokens) if proxyv is None else proxyv.layer_flops(layer, dims, block)
