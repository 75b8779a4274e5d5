"""Where the vision tokens are: the token layout of a LLaVA / LLaVA-NeXT batch.

A LLaVA processor expands each ``<image>`` into as many image-token ids as the image has
features; the model scatters the features into those positions in order. This module recovers,
per sample, which sequence positions belong to which image, which of them are LLaVA-NeXT
``image_newline`` tokens, and the patch grid of every crop, from the same quantities the model
uses (config, ``image_sizes``) and HF's own AnyRes helpers, so it cannot drift from the model.

Conventions
-----------
* Positions index the sequence dimension of ``input_ids`` (shape ``(B, T)``), padding included.
* ``CropGrid.positions[r, c]`` is the position of the patch in row ``r``, column ``c`` of a crop,
  or ``-1`` where LLaVA-NeXT's unpadding removed that patch.
* LLaVA-1.5 (``LlavaConfig``): one crop per image, kind ``"image"``.
  LLaVA-NeXT (``LlavaNextConfig``): per image a ``"base"`` crop (the resized whole image), the
  high-resolution ``"highres"`` crops (row-major), and ``unpadded``: the unpadded high-res grid,
  whose rows are each followed by one newline token in the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .crop_grid import CropGrid
from .layout_qwen import QWEN_VL_MODEL_TYPES, compute_qwen_layout

__all__ = ["SUPPORTED_MODEL_TYPES", "BatchLayout", "CropGrid", "ImageLayout", "SampleLayout", "compute_layout",
           "image_token_id"]

SUPPORTED_MODEL_TYPES = ("llava", "llava_next")


@dataclass(frozen=True)
class ImageLayout:
    """One image's tokens: the span ``[start, end)`` and its crops."""

    start: int
    end: int
    crops: tuple[CropGrid, ...]
    newline: torch.Tensor  # (n_newline,) positions of image_newline tokens
    unpadded: CropGrid | None = None  # LLaVA-NeXT only


@dataclass(frozen=True)
class SampleLayout:
    images: tuple[ImageLayout, ...]
    vision: torch.Tensor  # (n_vision,) every image-token position, newline tokens included
    newline: torch.Tensor  # (n_newline,)
    text: torch.Tensor  # (n_text,) attended positions that are not image tokens
    padding: torch.Tensor  # (n_pad,) positions the attention mask excludes


@dataclass(frozen=True)
class BatchLayout:
    samples: tuple[SampleLayout, ...]
    image_mask: torch.Tensor  # (B, T) bool: image-token positions (newline tokens included)
    newline_mask: torch.Tensor  # (B, T) bool
    valid_mask: torch.Tensor  # (B, T) bool: the attention mask

    def vision_mask(self, newline_tokens: str = "vision") -> torch.Tensor:
        """(B, T) bool mask of the positions treated as vision tokens.

        ``newline_tokens="vision"`` counts LLaVA-NeXT's newline tokens as vision tokens (they sit at
        image-token positions and carry no text); ``"text"`` treats them as text, as the official
        ProxyV does.
        """
        if newline_tokens == "vision":
            return self.image_mask
        if newline_tokens == "text":
            return self.image_mask & ~self.newline_mask
        raise ValueError(f"newline_tokens must be 'vision' or 'text', got {newline_tokens!r}")

    @property
    def has_images(self) -> bool:
        return bool(self.image_mask.any())


def image_token_id(config) -> int:
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = getattr(config, "image_token_index", None)
    if token is None:
        raise ValueError(f"{type(config).__name__} has no image_token_id; is this a LLaVA config?")
    return int(token)


def _grid_side(config) -> int:
    vision = config.vision_config
    return vision.image_size // vision.patch_size


def _llava_image(config, start: int, device) -> tuple[ImageLayout, int]:
    """A LLaVA-1.5 image starting at ``start``: (layout, number of tokens)."""
    side = _grid_side(config)
    n_cls = 1 if config.vision_feature_select_strategy == "full" else 0
    grid_start = start + n_cls
    positions = torch.arange(grid_start, grid_start + side * side, device=device).view(side, side)
    length = n_cls + side * side
    empty = torch.empty(0, dtype=torch.long, device=device)
    return ImageLayout(start, start + length, (CropGrid("image", positions),), empty), length


def _llava_next_image(config, start: int, image_size, device) -> tuple[ImageLayout, int]:
    """A LLaVA-NeXT image starting at ``start``, from HF's own AnyRes helpers."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    if config.vision_feature_select_strategy != "default":
        raise NotImplementedError(
            "token layout of LLaVA-NeXT supports vision_feature_select_strategy='default' only "
            f"(got {config.vision_feature_select_strategy!r})"
        )
    side = _grid_side(config)
    n_rows, n_cols = get_anyres_image_grid_shape(
        image_size, config.image_grid_pinpoints, config.vision_config.image_size
    )
    height, width = n_rows * side, n_cols * side
    # Unpad an index map of the merged high-res grid exactly as the model unpads its features.
    merged = torch.arange(height * width).view(1, height, width)
    kept = unpad_image(merged, torch.as_tensor(image_size))[0]  # (H', W') merged-grid ids
    kept_rows, kept_cols = kept.shape
    hr_start = start + side * side
    # Row r of the unpadded grid occupies kept_cols tokens followed by one newline token.
    seq = hr_start + torch.arange(kept_rows)[:, None] * (kept_cols + 1) + torch.arange(kept_cols)[None, :]
    where = torch.full((height * width,), -1, dtype=torch.long)
    where[kept.reshape(-1)] = seq.reshape(-1)
    where = where.view(height, width)
    base = CropGrid("base", torch.arange(start, hr_start).view(side, side))
    highres = [
        CropGrid("highres", where[i * side:(i + 1) * side, j * side:(j + 1) * side].contiguous())
        for i in range(n_rows)
        for j in range(n_cols)
    ]
    newline = hr_start + torch.arange(kept_rows) * (kept_cols + 1) + kept_cols
    length = side * side + kept_rows * (kept_cols + 1)
    layout = ImageLayout(
        start,
        start + length,
        tuple(CropGrid(c.kind, c.positions.to(device)) for c in [base, *highres]),
        newline.to(device),
        CropGrid("unpadded", seq.to(device)),
    )
    return layout, length


def compute_layout(input_ids: torch.Tensor, config, attention_mask: torch.Tensor | None = None,
                   image_sizes=None, *, image_grid_thw=None, video_grid_thw=None, mm_token_type_ids=None):
    """The token layout of a batch, as the model of ``config`` will see it.

    A Qwen2-VL / Qwen2.5-VL / Qwen3-VL config goes to :func:`analysis.layout_qwen.compute_qwen_layout`
    (keyword arguments ``image_grid_thw``, ``video_grid_thw``, ``mm_token_type_ids``; returns a
    ``QwenBatchLayout``); everything below describes the LLaVA path.

    Args:
        input_ids: ``(B, T)`` token ids as produced by the model's processor.
        config: a ``LlavaConfig`` or ``LlavaNextConfig``.
        attention_mask: ``(B, T)`` 0/1 padding mask (``None``: no padding).
        image_sizes: ``(n_images, 2)`` original (height, width) of every image of the batch in order;
            required for LLaVA-NeXT.
    Raises:
        ValueError: if the image tokens of a sample do not match what the config says an image expands to.
    """
    model_type = getattr(config, "model_type", None)
    if model_type in QWEN_VL_MODEL_TYPES:
        if image_sizes is not None:
            raise ValueError("a Qwen-VL layout takes image_grid_thw / video_grid_thw, not image_sizes")
        return compute_qwen_layout(input_ids, config, attention_mask, image_grid_thw=image_grid_thw,
                                   video_grid_thw=video_grid_thw, mm_token_type_ids=mm_token_type_ids)
    if image_grid_thw is not None or video_grid_thw is not None or mm_token_type_ids is not None:
        raise ValueError(f"image_grid_thw / video_grid_thw / mm_token_type_ids are Qwen-VL inputs; "
                         f"model type {model_type!r} does not take them")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TypeError(f"token layout supports model types {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    device = input_ids.device
    image_mask = input_ids == image_token_id(config)
    valid = torch.ones_like(image_mask) if attention_mask is None else attention_mask.to(device).bool()
    if valid.shape != image_mask.shape:
        raise ValueError(f"attention_mask shape {tuple(valid.shape)} != input_ids shape {tuple(image_mask.shape)}")
    if model_type == "llava_next" and image_mask.any() and image_sizes is None:
        raise ValueError("LLaVA-NeXT layout needs image_sizes (the processor returns them with the batch)")
    sizes = None if image_sizes is None else torch.as_tensor(image_sizes).tolist()

    newline_mask = torch.zeros_like(image_mask)
    samples, image_index = [], 0
    positions_per_sample = [row.nonzero().flatten() for row in image_mask.cpu()]
    for b, positions in enumerate(positions_per_sample):
        images, cursor = [], 0
        while cursor < len(positions):
            start = int(positions[cursor])
            if model_type == "llava":
                image, length = _llava_image(config, start, device)
            else:
                if image_index >= len(sizes):
                    raise ValueError(f"sample {b} has more images than image_sizes ({len(sizes)}) lists")
                image, length = _llava_next_image(config, start, sizes[image_index], device)
            span = positions[cursor:cursor + length]
            if len(span) != length or int(span[-1]) != start + length - 1:
                raise ValueError(
                    f"sample {b}: image tokens at {start}.. do not form one block of {length} tokens "
                    f"as the config implies (found {len(positions) - cursor} more image tokens); "
                    "were input_ids made by this model's processor?"
                )
            newline_mask[b, image.newline] = True
            images.append(image)
            cursor += length
            image_index += 1
        vision = positions.to(device)
        samples.append(SampleLayout(
            images=tuple(images),
            vision=vision,
            newline=newline_mask[b].nonzero().flatten(),
            text=(valid[b] & ~image_mask[b]).nonzero().flatten(),
            padding=(~valid[b]).nonzero().flatten(),
        ))
    if sizes is not None and image_index not in (0, len(sizes)) and model_type == "llava_next":
        raise ValueError(f"image_sizes lists {len(sizes)} images but input_ids hold {image_index}")
    return BatchLayout(tuple(samples), image_mask, newline_mask, valid)

