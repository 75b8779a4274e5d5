"""Which positions of a prefill are vision tokens, which are valid (not padding), and its crops.

:class:`PrefillTokens` is what a FLOPs count reads of a prompt batch; build it from a processor batch
(:meth:`PrefillTokens.from_batch`), from counts (:meth:`PrefillTokens.from_counts`, what the CLI
does) or directly from (B, T) boolean masks. :func:`allowed_pair_counts` counts the (query, key)
pairs an ideal attention kernel scores for one sample (the theoretical figure).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..layout import compute_layout

if TYPE_CHECKING:
    from ..ops import Operator


@dataclass(frozen=True)
class PrefillTokens:
    """Which positions of a (padded) prefill batch are vision tokens and which are padding.

    ``vision`` and ``valid`` are (B, T) bool; vision positions are the ones an op treats as vision
    (LLaVA-NeXT newline tokens included or not, per the ``newline_tokens`` choice it was built with).
    ``crop_shapes[b]`` lists the (rows, cols) patch grid of every crop of sample b, in order; their
    number is how many crops run through the vision tower.

    Qwen-VL (:meth:`from_qwen_counts`, or :meth:`from_batch` with a Qwen-VL config): ``vision_grids`` holds the
    ``(t, h, w)`` patch grid of every image and video the tower runs on (in sequence order, sample after sample),
    and ``crop_shapes[b]`` the merged ``(h, w)`` of each temporal block of sample b (the
    analogue of a crop: an image, or a video's block of ``temporal_patch_size`` frames).
    """

    vision: torch.Tensor
    valid: torch.Tensor
    crop_shapes: tuple[tuple[tuple[int, int], ...], ...] = ()
    vision_grids: tuple[tuple[int, int, int], ...] = ()
    _pairs: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "vision", self.vision.bool().cpu())
        object.__setattr__(self, "valid", self.valid.bool().cpu())
        if self.vision.shape != self.valid.shape or self.vision.dim() != 2:
            raise ValueError(f"vision {tuple(self.vision.shape)} and valid {tuple(self.valid.shape)} "
                             "must both be (batch, seq)")
        if bool((self.vision & ~self.valid).any()):
            raise ValueError("a vision position is marked as padding")

    @property
    def batch(self) -> int:
        return self.vision.shape[0]

    @property
    def seq_len(self) -> int:
        return self.vision.shape[1]

    @property
    def crops(self) -> int:
        return sum(len(shapes) for shapes in self.crop_shapes)

    def allowed_pairs(self, op: Operator | None, window: int | None, skip_vision_queries: bool) -> dict[str, int]:
        """:func:`allowed_pair_counts` summed over the samples (padding removed), by query group; cached."""
        key = (None if op is None else op.name, window, skip_vision_queries)
        if key not in self._pairs:
            totals = {"vision": 0, "text": 0}
            for vision, valid in zip(self.vision, self.valid):
                for group, n in allowed_pair_counts(vision[valid], op, window, skip_vision_queries).items():
                    totals[group] += n
            self._pairs[key] = totals
        return self._pairs[key]

    @classmethod
    def from_counts(cls, vision_tokens: int, text_tokens: int, tokens_per_crop: int, newline_tokens: int = 0,
                    text_before_image: int = 0, newline_as: str = "vision") -> PrefillTokens:
        """One sample, no padding: ``text_before_image`` text tokens, the image, then the other text.

        The image block holds ``vision_tokens`` crop tokens (a whole number of crops of
        ``tokens_per_crop``) and ``newline_tokens`` newline tokens. As in LLaVA-NeXT, the first crop
        (the base image) has no newline tokens; the newline tokens are spread evenly through the
        following (high-res) crops, one after each equal run of tokens (a single crop: through it).
        Only the theoretical figure depends on this order, and only where newline tokens count as
        text (``newline_as="text"``).
        """
        for name, value in (("vision_tokens", vision_tokens), ("text_tokens", text_tokens),
                            ("tokens_per_crop", tokens_per_crop), ("newline_tokens", newline_tokens),
                            ("text_before_image", text_before_image)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if tokens_per_crop <= 0:
            raise ValueError(f"tokens_per_crop must be positive, got {tokens_per_crop}")
        if vision_tokens % tokens_per_crop:
            raise ValueError(f"vision_tokens={vision_tokens} is not a whole number of crops of "
                             f"tokens_per_crop={tokens_per_crop} tokens")
        if text_before_image > text_tokens:
            raise ValueError(f"text_before_image={text_before_image} exceeds text_tokens={text_tokens}")
        if newline_as not in ("vision", "text"):
            raise ValueError(f"newline_as must be 'vision' or 'text', got {newline_as!r}")
        crops = vision_tokens // tokens_per_crop
        spread = vision_tokens - tokens_per_crop if crops > 1 else vision_tokens
        if newline_tokens > spread:
            raise ValueError(f"newline_tokens={newline_tokens} exceed the {spread} tokens they follow "
                             "(newline tokens follow rows of the high-res crops)")
        # image block: True = crop token; newline j follows the crop token ending run j
        ends = {tokens_per_crop * (crops > 1) + (j + 1) * spread // newline_tokens - 1 for j in range(newline_tokens)}
        image = []
        for i in range(vision_tokens):
            image.append(True)
            if i in ends:
                image.append(newline_as == "vision")
        sequence = [False] * text_before_image + image + [False] * (text_tokens - text_before_image)
        vision = torch.tensor([sequence], dtype=torch.bool)
        side = math.isqrt(tokens_per_crop)
        shape = (side, side) if side * side == tokens_per_crop else (1, tokens_per_crop)
        return cls(vision, torch.ones_like(vision), ((shape,) * crops,))

    @classmethod
    def from_batch(cls, batch: Mapping, config, newline_tokens: str = "vision") -> PrefillTokens:
        """The tokens of a processor batch (``input_ids``, ``attention_mask``, ``pixel_values``,
        ``image_sizes``) for the LLaVA model of ``config``, exactly as :func:`analysis.ablation.ablate`
        sees them in the prefill: image tokens are vision tokens only when the batch carries pixels.
        """
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        valid = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        if getattr(config, "model_type", None) in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
            return cls._from_qwen_batch(batch, config, valid)
        if batch.get("pixel_values") is None:
            empty = ((),) * input_ids.shape[0]
            return cls(torch.zeros_like(valid), valid, empty)
        layout = compute_layout(input_ids, config, mask, batch.get("image_sizes"))
        shapes = tuple(tuple(crop.shape for image in sample.images for crop in image.crops)
                       for sample in layout.samples)
        return cls(layout.vision_mask(newline_tokens).cpu(), valid.cpu(), shapes)


    @classmethod
    def _from_qwen_batch(cls, batch: Mapping, config, valid: torch.Tensor) -> PrefillTokens:
        """A Qwen-VL processor batch: its image and video tokens (``analysis.layout_qwen``), grids and blocks."""
        from ..layout_qwen import layout_of_batch
        layout = layout_of_batch(batch, config)
        shapes = tuple(tuple(tuple(block.shape) for grid in sample.grids for block in grid.blocks)
                       for sample in layout.samples)
        # the grids in sequence order, sample after sample (as the plugin records them per prompt)
        grids = tuple(tuple(int(x) for x in grid.grid_thw) for sample in layout.samples for grid in sample.grids)
        return cls(layout.vision_mask().cpu(), valid.cpu(), shapes, grids)

    @classmethod
    def from_qwen_counts(cls, config, image_grids=(), video_grids=(), text_tokens: int = 0,
                         text_before_vision: int = 0) -> PrefillTokens:
        """One Qwen-VL sample, no padding: ``text_before_vision`` text tokens, then every image and video
        (``(t, h, w)`` patch grids; ``t·h·w / merge²`` tokens each, back to back), then the other text tokens.

        ``text_tokens`` counts every token that is not an image / video pad token: the chat template, the
        ``<|vision_start|>`` / ``<|vision_end|>`` around each grid, Qwen3-VL's timestamp text between a video's
        blocks. Only the theoretical figure depends on where they sit.
        """
        from .qwen import QwenVisionDims

        dims = QwenVisionDims.of(config)
        for name, value in (("text_tokens", text_tokens), ("text_before_vision", text_before_vision)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if text_before_vision > text_tokens:
            raise ValueError(f"text_before_vision={text_before_vision} exceeds text_tokens={text_tokens}")
        grids = tuple(dims.check_grid(g) for g in (*image_grids, *video_grids))
        n_vision = sum(dims.tokens(g) for g in grids)
        sequence = [False] * text_before_vision + [True] * n_vision + [False] * (text_tokens - text_before_vision)
        vision = torch.tensor([sequence], dtype=torch.bool)
        blocks = tuple((h // dims.merge, w // dims.merge) for t, h, w in grids for _ in range(t))
        return cls(vision, torch.ones_like(vision), (blocks,), grids)


def allowed_pair_counts(vision: torch.Tensor, op: Operator | None, window: int | None,
                        skip_vision_queries: bool, block: int = 1024) -> dict[str, int]:
    """(query, key) pairs an ideal kernel scores for one sample without padding, by query group.

    ``vision``: (n,) bool, the sample's valid tokens in order. A pair is allowed if the key is not
    after the query, within ``window`` (if any), allowed by ``op.allowed`` (if ``op``), or is the
    diagonal. Vision queries are left out if ``skip_vision_queries``. Counted in query blocks.
    """
    n = vision.shape[0]
    keys = torch.arange(n)
    counts = {"vision": 0, "text": 0}
    for start in range(0, n, block):
        queries = torch.arange(start, min(start + block, n))
        offset = queries[:, None] - keys[None, :]  # (q, n)
        allowed = offset >= 0
        if window is not None:
            allowed &= offset < window
        if op is not None:
            rule = op.allowed(vision[None, queries], vision[None, :])
            if rule is not None:
                allowed &= rule[0]
        allowed |= offset == 0
        per_query = allowed.sum(dim=1)
        q_vision = vision[queries]
        counts["vision"] += 0 if skip_vision_queries else int(per_query[q_vision].sum())
        counts["text"] += int(per_query[~q_vision].sum())
    return counts
