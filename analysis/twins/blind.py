"""The blind control: the same question with the picture removed."""

from __future__ import annotations

import numpy as np
from PIL import Image


def blank_image(image: Image.Image) -> Image.Image:
    """An image of the same size and mode filled with one colour, the per-channel median of
    ``image`` (its paper colour): it carries nothing readable, but looks like an empty page."""
    pixels = np.asarray(image)
    channels = pixels.reshape(-1, pixels.shape[-1] if pixels.ndim == 3 else 1)  # (H*W, C)
    fill = tuple(int(v) for v in np.rint(np.median(channels, axis=0)))
    return Image.new(image.mode, image.size, fill if len(fill) > 1 else fill[0])
