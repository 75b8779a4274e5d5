"""Where the vision tokens are: the token layout of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL batch.

The processor expands each image into ``t*h*w / merge**2`` ``<|image_pad|>`` tokens (``(t, h, w)`` =
its row of ``image_grid_thw``, ``merge`` = ``vision_config.spatial_merge_size``), and each video into
``<|video_pad|>`` tokens from its row of ``video_grid_thw``; the model scatters the merged vision features
into those positions in order (``masked_scatter`` over the whole ``(B, T)`` batch, images and videos
separately) and gives every such token an M-RoPE position (temporal, height, width) from the same grid.
This module recovers, per sample, which sequence positions hold which image / video and the merged
``(t, h, w)`` grid of each, from the same quantities the model uses (the config's ``image_token_id`` /
``video_token_id`` and ``spatial_merge_size``, ``image_grid_thw``, ``video_grid_thw``), so it cannot drift.

Conventions
-----------
* Positions index the sequence dimension of ``input_ids`` (``(B, T)``), padding included.
* ``VisionGrid.positions[t, i, j]``: the position of the merged token in temporal block ``t``, row ``i``,
  column ``j`` -- shape ``(t, h // merge, w // merge)``; every entry is a real position (no ``-1``: Qwen drops
  nothing). Raster order (t, then row, then column) is the order of the features and of the sequence.
* Images have ``t == 1`` (the processor repeats an image to ``temporal_patch_size`` frames).
  A video's temporal block ``t`` covers ``temporal_patch_size`` input frames.
* Qwen2-VL / Qwen2.5-VL place a video's blocks back to back: one contiguous span.
  Qwen3-VL writes the text ``<x.x seconds><|vision_start|>`` before each block and ``<|vision_end|>``
  after it, so a video's blocks are separate spans with text between them; ``positions`` holds those real
  positions, ``VisionGrid.start``/``end`` enclose all blocks (text between blocks included) and
  ``block_spans`` gives each block's own span. (transformers 5.x keeps the chat template's outer
  ``<|vision_start|>`` / ``<|vision_end|>`` around the whole video as well.)
* ``<|vision_start|>`` / ``<|vision_end|>`` and timestamps are text tokens (``mm_token_type_ids`` 0).

Mapping to the LLaVA layout (:mod:`analysis.layout`)
----------------------------------------------------
* LLaVA ``ImageLayout`` -> :class:`VisionGrid` (an image *or* a video).
* LLaVA ``CropGrid`` (one 2-D patch grid) -> one temporal block: ``VisionGrid.crops`` /
  ``VisionGrid.blocks`` are ``CropGrid`` s of kind ``"image"`` (an image's single block) or ``"frame"``
  (a video's temporal blocks), positions ``(h, w)``. Qwen has no base / high-res crops: an image is one
  native-resolution grid of its own aspect ratio; there are no newline tokens (``newline`` empty).
* ``SampleLayout.images`` -> :class:`QwenSampleLayout` ``grids`` (images and videos in sequence order);
  ``images`` / ``videos`` select one kind. Code written for LLaVA that iterates ``sample.images`` would
  miss videos: iterate ``grids``.
* ``BatchLayout.image_mask`` -> ``vision_mask()`` (= ``image_mask | video_mask``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .crop_grid import CropGrid

QWEN_VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
KINDS = ("image", "video")


@dataclass(frozen=True)
class VisionGrid:
    """One image or video: ``positions`` is the ``(t, h, w)`` long tensor of its merged tokens' positions."""

    kind: str  # "image" | "video"
    index: int  # its row of image_grid_thw / video_grid_thw (batch order, as the processor made them)
    grid_thw: tuple[int, int, int]  # the processor's patch grid, before the spatial merge
    positions: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        """The merged grid ``(t, h, w)``: ``(grid_t, grid_h // merge, grid_w // merge)``."""
        return tuple(self.positions.shape)

    @property
    def n_tokens(self) -> int:
        return self.positions.numel()

    @property
    def start(self) -> int:
        return int(self.positions[0, 0, 0])

    @property
    def end(self) -> int:
        """One past the last vision position (for Qwen3-VL video, text between blocks lies inside)."""
        return int(self.positions[-1, -1, -1]) + 1

    @property
    def contiguous(self) -> bool:
        return self.end - self.start == self.n_tokens

    @property
    def blocks(self) -> tuple[CropGrid, ...]:
        """One 2-D grid per temporal block (the analogue of a LLaVA crop)."""
        kind = "image" if self.kind == "image" else "frame"
        return tuple(CropGrid(kind, block) for block in self.positions)

    crops = blocks

    @property
    def block_spans(self) -> tuple[tuple[int, int], ...]:
        """``[start, end)`` of each temporal block; each block is contiguous."""
        return tuple((int(b[0, 0]), int(b[-1, -1]) + 1) for b in self.positions)

    @property
    def newline(self) -> torch.Tensor:
        return self.positions.new_empty(0)


@dataclass(frozen=True)
class QwenSampleLayout:
    grids: tuple[VisionGrid, ...]  # images and videos, in sequence order
    vision: torch.Tensor  # (n_vision,) every image / video token position, ascending
    text: torch.Tensor  # (n_text,) attended positions that are not vision tokens
    padding: torch.Tensor  # (n_pad,) positions the attention mask excludes

    @property
    def images(self) -> tuple[VisionGrid, ...]:
        return tuple(g for g in self.grids if g.kind == "image")

    @property
    def videos(self) -> tuple[VisionGrid, ...]:
        return tuple(g for g in self.grids if g.kind == "video")

    @property
    def newline(self) -> torch.Tensor:
        return self.vision.new_empty(0)


@dataclass(frozen=True)
class QwenBatchLayout:
    model_type: str
    samples: tuple[QwenSampleLayout, ...]
    image_mask: torch.Tensor  # (B, T) bool: <|image_pad|> positions
    video_mask: torch.Tensor  # (B, T) bool: <|video_pad|> positions
    valid_mask: torch.Tensor  # (B, T) bool: the attention mask

    @property
    def newline_mask(self) -> torch.Tensor:
        return torch.zeros_like(self.image_mask)

    def vision_mask(self, newline_tokens: str = "vision") -> torch.Tensor:
        """(B, T) bool: image and video token positions. ``newline_tokens`` as in the LLaVA layout (Qwen has none)."""
        if newline_tokens not in ("vision", "text"):
            raise ValueError(f"newline_tokens must be 'vision' or 'text', got {newline_tokens!r}")
        return self.image_mask | self.video_mask

    @property
    def grids(self) -> tuple[VisionGrid, ...]:
        return tuple(g for s in self.samples for g in s.grids)

    @property
    def has_vision(self) -> bool:
        return bool(self.vision_mask().any())

    @property
    def has_images(self) -> bool:
        return bool(self.image_mask.any())

    @property
    def has_videos(self) -> bool:
        return bool(self.video_mask.any())


def is_qwen_vl(config) -> bool:
    return getattr(config, "model_type", None) in QWEN_VL_MODEL_TYPES


def _blocks_separate(model_type: str, kind: str) -> bool:
    """Whether the model's processor puts text between a video's temporal blocks (Qwen3-VL's timestamps)."""
    return model_type == "qwen3_vl" and kind == "video"


def _grids_of(kind: str, positions: torch.Tensor, batch_of: torch.Tensor, grid_thw, merge: int, model_type: str,
              input_ids: torch.Tensor, valid: torch.Tensor, token_id: int) -> list[tuple[int, VisionGrid]]:
    """Split the batch's ``kind`` tokens (row-major, as masked_scatter fills them) by ``grid_thw``."""
    name = f"{kind}_grid_thw"
    if grid_thw is None:
        if len(positions):
            raise ValueError(f"input_ids hold {len(positions)} {kind} tokens but {name} is None")
        return []
    grid_thw = torch.as_tensor(grid_thw).cpu().long()
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"{name} must be (n_{kind}s, 3), got shape {tuple(grid_thw.shape)}")
    if ((grid_thw[:, 1:] % merge) != 0).any() or (grid_thw <= 0).any():
        raise ValueError(f"{name} {grid_thw.tolist()} has sides not divisible by spatial_merge_size={merge}")
    merged = torch.stack([grid_thw[:, 0], grid_thw[:, 1] // merge, grid_thw[:, 2] // merge], dim=1)
    sizes = merged.prod(-1).tolist()
    if sum(sizes) != len(positions):
        raise ValueError(
            f"{kind} tokens and {name} disagree: input_ids hold {len(positions)} {kind} tokens, {name} "
            f"{grid_thw.tolist()} with spatial_merge_size={merge} implies {sizes} = {sum(sizes)}"
        )
    out, cursor, T = [], 0, input_ids.shape[1]
    for index, (size, (t, h, w)) in enumerate(zip(sizes, merged.tolist())):
        pos, rows = positions[cursor:cursor + size], batch_of[cursor:cursor + size]
        cursor += size
        b = int(rows[0])
        if not (rows == b).all():
            raise ValueError(f"{kind} {index} ({name} row {index}, {size} tokens) runs from sample {b} into sample "
                             f"{int(rows[-1])}: the {kind} tokens of a sample do not match its {name} rows")
        grid = pos.view(t, h, w)
        # Each unit the model gives one grid in get_rope_index (a whole image or Qwen2(.5)-VL video, a Qwen3-VL
        # video block) must be one run of tokens, with no token of the same kind right before or after it.
        units = grid if _blocks_separate(model_type, kind) else grid.reshape(1, -1)
        for u, unit in enumerate(units.reshape(units.shape[0], -1)):
            first, last = int(unit[0]), int(unit[-1])
            what = f"{kind} {index}" + (f" block {u}" if units.shape[0] > 1 else "")
            if last - first + 1 != unit.numel():
                raise ValueError(f"sample {b}: {what} is not one run of {unit.numel()} tokens from position {first} "
                                 f"(it ends at {last}); were input_ids made by this model's processor?")
            touching = [p for p in (first - 1, last + 1) if 0 <= p < T and int(input_ids[b, p]) == token_id]
            if touching:
                raise ValueError(f"sample {b}: {what} at {first}..{last} touches another {kind} token at {touching[0]}: "
                                 "the model would read both as one grid; separate them with text "
                                 "(the processor's <|vision_start|> / <|vision_end|>)")
        if not valid[b, pos].all():
            raise ValueError(f"sample {b}: {kind} {index} has tokens the attention mask excludes")
        out.append((b, VisionGrid(kind, index, tuple(int(x) for x in grid_thw[index]), grid.to(input_ids.device))))
    return out


def compute_qwen_layout(input_ids: torch.Tensor, config, attention_mask: torch.Tensor | None = None, *,
                        image_grid_thw=None, video_grid_thw=None, mm_token_type_ids=None) -> QwenBatchLayout:
    """The token layout of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL batch, as the model of ``config`` will see it.

    Args:
        input_ids: ``(B, T)`` token ids as produced by the model's processor.
        config: a ``Qwen2VLConfig`` / ``Qwen2_5_VLConfig`` / ``Qwen3VLConfig``.
        attention_mask: ``(B, T)`` 0/1 padding mask (``None``: no padding).
        image_grid_thw, video_grid_thw: ``(n, 3)`` patch grids of every image / video of the batch, in order.
        mm_token_type_ids: optional ``(B, T)`` (0 text, 1 image, 2 video) from the processor, which the model's
            M-RoPE groups by; checked to agree with ``input_ids``.
    Raises:
        ValueError: one line naming the disagreement when tokens and grids do not fit together.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in QWEN_VL_MODEL_TYPES:
        raise TypeError(f"Qwen-VL token layout supports model types {QWEN_VL_MODEL_TYPES}, got {model_type!r}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    device = input_ids.device
    ids = input_ids.cpu()
    valid = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
    if valid.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(valid.shape)} != input_ids shape {tuple(ids.shape)}")
    merge = int(config.vision_config.spatial_merge_size)
    token_ids = {"image": int(config.image_token_id), "video": int(config.video_token_id)}
    masks = {kind: ids == token_ids[kind] for kind in KINDS}
    if mm_token_type_ids is not None:
        types = torch.as_tensor(mm_token_type_ids).cpu()
        for code, kind in ((1, "image"), (2, "video")):
            if not torch.equal(types == code, masks[kind]):
                raise ValueError(f"mm_token_type_ids == {code} differs from input_ids == {kind}_token_id "
                                 f"({token_ids[kind]}); the model's M-RoPE groups tokens by mm_token_type_ids")
    per_sample: list[list[VisionGrid]] = [[] for _ in range(ids.shape[0])]
    for kind, grid_thw in (("image", image_grid_thw), ("video", video_grid_thw)):
        batch_of, positions = masks[kind].nonzero(as_tuple=True)  # row-major: masked_scatter's order
        for b, grid in _grids_of(kind, positions, batch_of, grid_thw, merge, model_type, ids, valid, token_ids[kind]):
            per_sample[b].append(grid)
    vision = masks["image"] | masks["video"]
    samples = tuple(
        QwenSampleLayout(
            grids=tuple(sorted(grids, key=lambda g: g.start)),
            vision=vision[b].nonzero().flatten().to(device),
            text=(valid[b] & ~vision[b]).nonzero().flatten().to(device),
            padding=(~valid[b]).nonzero().flatten().to(device),
        )
        for b, grids in enumerate(per_sample)
    )
    return QwenBatchLayout(model_type, samples, masks["image"].to(device), masks["video"].to(device),
                           valid.to(device))


def layout_of_batch(batch, config) -> QwenBatchLayout:
    """:func:`compute_qwen_layout` of a processor's output (a ``BatchFeature`` or dict)."""
    return compute_qwen_layout(batch["input_ids"], config, batch.get("attention_mask"),
                               image_grid_thw=batch.get("image_grid_thw"), video_grid_thw=batch.get("video_grid_thw"),
                               mm_token_type_ids=batch.get("mm_token_type_ids"))


def layout_of_tokens(tokens, model_type: str) -> QwenBatchLayout:
    """A Qwen layout rebuilt from :class:`analysis.flops.PrefillTokens` (what the runner records per prompt): each
    sample's vision positions in order, consumed grid by grid (``tokens.vision_grids``, in sequence order, sample
    after sample; ``tokens.crop_shapes[b]``: the merged ``(h, w)`` of each block of sample b). Kinds are not recorded:
    a grid of one block is called an image, of several a video."""
    grids = iter(tokens.vision_grids)
    samples = []
    for b, blocks in enumerate(tokens.crop_shapes):
        vision = tokens.vision[b].nonzero().flatten()
        cursor, grids_b, n_blocks = 0, [], 0
        while n_blocks < len(blocks):
            t, h, w = next(grids)
            mh, mw = blocks[n_blocks]
            size = t * mh * mw
            grids_b.append(VisionGrid("image" if t == 1 else "video", len(grids_b), (t, h, w),
                                      vision[cursor:cursor + size].view(t, mh, mw)))
            cursor, n_blocks = cursor + size, n_blocks + t
        if cursor != len(vision):
            raise ValueError(f"sample {b}: its grids hold {cursor} vision tokens, the tokens mark {len(vision)}")
        valid = tokens.valid[b]
        samples.append(QwenSampleLayout(tuple(grids_b), vision, (valid & ~tokens.vision[b]).nonzero().flatten(),
                                        (~valid).nonzero().flatten()))
    kinds = torch.zeros_like(tokens.vision)
    video = torch.zeros_like(tokens.vision)
    for b, sample in enumerate(samples):
        for grid in sample.grids:
            (kinds if grid.kind == "image" else video)[b, grid.positions.flatten()] = True
    return QwenBatchLayout(model_type, tuple(samples), kinds, video, tokens.valid)
