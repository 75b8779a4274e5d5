"""One crop's patch grid: the unit both token layouts are made of (:mod:`analysis.layout` for LLaVA,
:mod:`analysis.layout_qwen` for Qwen-VL, where a crop is an image or one temporal block of a video), and what
ProxyV's per-crop proxies and VisionZip read. Its own module so that the two layouts share it without
importing each other (:func:`analysis.layout.compute_layout` dispatches to the Qwen-VL one)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CropGrid:
    """The patch grid of one crop. ``positions``: ``(rows, cols)`` long tensor of sequence positions."""

    kind: str
    positions: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.positions.shape)
