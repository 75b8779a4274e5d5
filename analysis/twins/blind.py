"""The blind control: the same question with the picture removed."""

from __future__ import annotations

import numpy as np
from PIL import Image


def blank_image(image: Image.Image) -> Image.Image:
    """An image of the same size and mode filled with one colour, the per-channel median of
    ``image`` (its paper colour): it carries nothing readable, but looks like an empty page."""
    pixels = np.asarray(image)
    fill = np.median(pixels.reshape(-1, pixels.shape[-1]) if pixels.ndim == 3 else pixels, axis=0)
    fill = tuple(int(v) for v in np.atleast_1d(np.rint(fill)))
    return Image.new(image.mode, image.size, fill if len(fill) > 1 else fill[0])
