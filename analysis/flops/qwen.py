"""FLOPs of the Qwen-VL vision side (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): tower, PatchMerger, DeepStack mergers.

The decoder of these classes is a Llama-family decoder (:class:`analysis.flops.dims.TextDims`, the same formulas
as for LLaVA, fed the Qwen token counts); what differs is the vision side, counted here per grid of
``image_grid_thw`` / ``video_grid_thw`` (``(t, h, w)`` in patches, as the processor makes them), exactly as torch's
``FlopCounterMode`` counts the HF forward (transformers 5.23):

* **patch embedding**: a Conv3d with kernel = stride = (temporal_patch, patch, patch) on every patch:
  ``2·n·(C·tp·p²)·Dv`` for ``n = t·h·w`` patches (its bias, Qwen3-VL's, is not a product).
* **each block**, on all ``n`` patches: ``qkv`` ``2·n·Dv·3Dv``, ``proj`` ``2·n·Dv·Dv``; MLP: Qwen2-VL / Qwen3-VL
  ``fc1, fc2`` ``2·2·n·Dv·F`` (Qwen2-VL: F = Dv·mlp_ratio), Qwen2.5-VL SwiGLU ``gate, up, down`` ``3·2·n·Dv·F``.
  Attention ``2·Dv`` per (query, key) pair for the scores and as much for the weighted sum, over the segments the
  block attends within: each *frame* (temporal patch) of a grid on its own (``h·w`` patches; a video's frames do not
  attend to each other); Qwen2.5-VL's windowed blocks (all but ``fullatt_block_indexes``) within windows of
  ``window_size / (merge·patch)`` merged tokens a side, tiled from the top-left of each frame (the last row / column
  of windows may be smaller): a window of ``r × c`` merged tokens holds ``s = r·c·merge²`` patches, ``4·s²·Dv``.
* **PatchMerger** (``merger``): ``merge²`` neighbouring patch features concatenated (width ``Dv·merge²``) -> Linear
  -> GELU -> Linear to the text width: ``2·m·(Dv·merge²)² + 2·m·(Dv·merge²)·D`` for ``m = n / merge²`` merged tokens.
* **DeepStack mergers** (Qwen3-VL, one per ``deepstack_visual_indexes`` layer): the same shapes as the merger.

Not counted (torch's counter does not either; none is a product): norms (LayerNorm / RMSNorm), activations, the
vision rotary embedding (a broadcast multiply), Qwen3-VL's learned position embedding interpolated to each grid
(an embedding gather of 4 bilinear taps and a weighted sum), the window permutation, the DeepStack additions into
the decoder's hidden states, biases.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
VISION_PARTS = ("tower", "merger", "deepstack")

Grid = tuple[int, int, int]


def is_qwen(config) -> bool:
    """Whether ``config`` is a Qwen2-VL / Qwen2.5-VL / Qwen3-VL (top-level) config."""
    return getattr(config, "model_type", None) in QWEN_TYPES


@dataclass(frozen=True)
class QwenVisionDims:
    """What the vision side of a Qwen-VL model costs depends on (see the module docstring)."""

    kind: str  # "qwen2_vl" | "qwen2_5_vl" | "qwen3_vl"
    hidden: int  # Dv
    intermediate: int  # F, the block MLP width
    gated: bool  # SwiGLU MLP (Qwen2.5-VL) or fc1/fc2 (Qwen2-VL, Qwen3-VL)
    depth: int
    in_channels: int
    patch: int
    temporal_patch: int
    merge: int
    out_hidden: int  # D, the text width the mergers project to
    window: int | None  # Qwen2.5-VL: window side in merged tokens; None: no windowed blocks
    full_blocks: tuple[int, ...]  # blocks attending over whole frames (every block where window is None)
    deepstack: tuple[int, ...]  # Qwen3-VL: layers whose features a DeepStack merger projects

    @classmethod
    def from_config(cls, config) -> QwenVisionDims:
        kind = getattr(config, "model_type", None)
        if kind not in QWEN_TYPES:
            raise ValueError(f"Qwen-VL vision FLOPs support {', '.join(QWEN_TYPES)}, got {kind!r}")
        vision = config.vision_config
        patch, temporal, merge = vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size
        common = {"kind": kind, "depth": vision.depth, "in_channels": vision.in_channels, "patch": patch,
                  "temporal_patch": temporal, "merge": merge}
        if kind == "qwen2_vl":  # embed_dim is the tower width, hidden_size the text width it merges to
            return cls(hidden=vision.embed_dim, intermediate=int(vision.embed_dim * vision.mlp_ratio), gated=False,
                       out_hidden=vision.hidden_size, window=None, full_blocks=tuple(range(vision.depth)),
                       deepstack=(), **common)
        if kind == "qwen2_5_vl":
            window = vision.window_size // merge // patch
            if window <= 0:
                raise ValueError(f"window_size={vision.window_size} is below one merged token "
                                 f"({merge}·{patch} px): HF's window index is undefined")
            return cls(hidden=vision.hidden_size, intermediate=vision.intermediate_size, gated=True,
                       out_hidden=vision.out_hidden_size, window=window,
                       full_blocks=tuple(vision.fullatt_block_indexes), deepstack=(), **common)
        return cls(hidden=vision.hidden_size, intermediate=vision.intermediate_size, gated=False,
                   out_hidden=vision.out_hidden_size, window=None, full_blocks=tuple(range(vision.depth)),
                   deepstack=tuple(vision.deepstack_visual_indexes), **common)

    @classmethod
    def of(cls, dims_or_config) -> QwenVisionDims:
        return dims_or_config if isinstance(dims_or_config, cls) else cls.from_config(dims_or_config)

    def check_grid(self, grid: Grid) -> Grid:
        t, h, w = (int(x) for x in grid)
        if min(t, h, w) <= 0:
            raise ValueError(f"grid (t, h, w) = {(t, h, w)} must be positive")
        if h % self.merge or w % self.merge:
            raise ValueError(f"grid (t, h, w) = {(t, h, w)}: h and w (patches) must be multiples of "
                             f"spatial_merge_size={self.merge}")
        return t, h, w

    def tokens(self, grid: Grid) -> int:
        """LM tokens of a grid: ``t·h·w / merge²``."""
        t, h, w = self.check_grid(grid)
        return t * h * w // self.merge ** 2

    # ------------------------------------------------------------------ per grid

    def patch_embed_flops(self, grid: Grid) -> int:
        t, h, w = self.check_grid(grid)
        return 2 * t * h * w * self.in_channels * self.temporal_patch * self.patch ** 2 * self.hidden

    def block_linear_flops(self, grid: Grid) -> int:
        """One block's products on all patches: qkv, proj and the MLP."""
        t, h, w = self.check_grid(grid)
        n = t * h * w
        mlp = (3 if self.gated else 2) * 2 * n * self.hidden * self.intermediate
        return 2 * n * self.hidden * 3 * self.hidden + 2 * n * self.hidden * self.hidden + mlp

    def segments(self, grid: Grid, block: int) -> list[int]:
        """Patches of each attention segment of ``block`` on ``grid``: a frame, or a window of a frame."""
        t, h, w = self.check_grid(grid)
        if self.window is None or block in self.full_blocks:
            return [h * w] * t
        rows = _tiles(h // self.merge, self.window)
        cols = _tiles(w // self.merge, self.window)
        return [r * c * self.merge ** 2 for _ in range(t) for r in rows for c in cols]

    def block_attention_flops(self, grid: Grid, block: int) -> int:
        """Scores (QKᵀ) and weighted sum (AV) of ``block``: ``2·2·s²·Dv`` per segment of ``s`` patches."""
        return sum(4 * s * s * self.hidden for s in self.segments(grid, block))

    def merger_flops(self, grid: Grid) -> int:
        """One PatchMerger (or DeepStack merger) on a grid: two Linear layers on its merged rows."""
        rows = self.tokens(grid)
        width = self.hidden * self.merge ** 2
        return 2 * rows * width * width + 2 * rows * width * self.out_hidden

    def block_flops(self, grid: Grid, block: int) -> int:
        return self.block_linear_flops(grid) + self.block_attention_flops(grid, block)


def _tiles(length: int, window: int) -> list[int]:
    """Sizes of the windows tiling ``length`` merged tokens from the start (the last may be shorter)."""
    return [window] * (length // window) + ([length % window] if length % window else [])


@dataclass(frozen=True)
class QwenVisionFlops:
    """The vision side of a Qwen-VL prefill, by part (every grid through the tower once)."""

    patch_embed: int
    blocks: tuple[int, ...]  # per block, all grids
    merger: int
    deepstack: tuple[int, ...]  # per DeepStack merger (Qwen3-VL), all grids; () otherwise

    @property
    def tower(self) -> int:
        """Patch embedding and every block."""
        return self.patch_embed + sum(self.blocks)

    @property
    def total(self) -> int:
        return self.tower + self.merger + sum(self.deepstack)

    def parts(self) -> dict[str, int]:
        """``tower``, ``merger``, ``deepstack`` (0 without DeepStack): what :class:`FlopsReport` keeps."""
        return {"tower": self.tower, "merger": self.merger, "deepstack": sum(self.deepstack)}


def qwen_vision_flops(config, grids: Iterable[Grid]) -> QwenVisionFlops:
    """FLOPs of the Qwen-VL vision tower, PatchMerger and DeepStack mergers on ``grids`` (``(t, h, w)`` patch grids of
    every image and video, as ``image_grid_thw`` / ``video_grid_thw`` rows; order does not matter)."""
    dims = QwenVisionDims.of(config)
    grids = [dims.check_grid(g) for g in grids]
    merger = sum(dims.merger_flops(g) for g in grids)
    return QwenVisionFlops(
        patch_embed=sum(dims.patch_embed_flops(g) for g in grids),
        blocks=tuple(sum(dims.block_flops(g, b) for g in grids) for b in range(dims.depth)),
        merger=merger,
        deepstack=(merger,) * len(dims.deepstack),
    )


def grids_of_batch(batch: Mapping) -> tuple[Grid, ...]:
    """The ``(t, h, w)`` rows of a processor batch's ``image_grid_thw`` then ``video_grid_thw``."""
    grids: list[Grid] = []
    for key in ("image_grid_thw", "video_grid_thw"):
        value = batch.get(key)
        if value is not None:
            grids.extend(tuple(int(x) for x in row) for row in value.tolist())
    return tuple(grids)


def parse_grid(text: str) -> Grid:
    """``"T,H,W"`` (patches) -> ``(T, H, W)``; a one-line ``ValueError`` otherwise."""
    try:
        t, h, w = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"a grid is T,H,W in patches (e.g. 1,36,54), got {text!r}") from None
    return t, h, w


def grid_of_resolution(config, height: int, width: int, frames: int = 1, *, min_pixels: int | None = None,
                       max_pixels: int | None = None) -> Grid:
    """The patch grid a Qwen processor makes of a ``height × width`` image (or of ``frames`` video frames): HF's
    ``smart_resize`` (both sides rounded to a multiple of patch·merge, the area kept within [min_pixels, max_pixels]),
    the frames padded to a multiple of temporal_patch_size. Defaults: 4 and 1280 merged tokens' worth of pixels
    (``4·f²``, ``1280·f²``, f = patch·merge), which for patch 14 are HF's ``Qwen2VLImageProcessor`` defaults
    (56·56, 28·28·1280); a checkpoint's own ``preprocessor_config.json`` may set others (Qwen3-VL's, patch 16, is not
    typed in here): pass them."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    dims = QwenVisionDims.of(config)
    factor = dims.patch * dims.merge
    min_pixels = 4 * factor * factor if min_pixels is None else min_pixels
    max_pixels = 1280 * factor * factor if max_pixels is None else max_pixels
    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    t = -(-frames // dims.temporal_patch)
    return t, h // dims.patch, w // dims.patch
