"""Drawing on a grid of square cells aligned with the vision tower's patches.

A twin image is ``image_size`` pixels square, cut into ``grid x grid`` cells (``GRID`` = 8 for the
standard twins, 16 for the high-resolution ``_hr`` ones); with the tiny model's CLIP tower (64 px,
patch 8) one cell of a 64 px image, or of a 64 px AnyRes crop of a 128 px one, is one vision token. Every glyph fills one
cell, so "which token holds which character" is known exactly and recorded in ``Canvas.cells``
(the target of a dense per-patch objective).
"""

from __future__ import annotations

import functools

import numpy as np
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont

GRID = 8
# Digits and capitals without I, O, Q: at 8 px they are indistinguishable from 1, 0 and O.
CHARSET = "0123456789ABCDEFGHJKLMNPRSTUVWXYZ"
DIGITS = CHARSET[:10]
LETTERS = CHARSET[10:]
BLANK = ""
BAR = "#"  # a cell covered by a chart bar (not a glyph)
# Everything a cell of ``Canvas.cells`` can hold; index 0 is the blank cell.
CELL_VOCAB = [BLANK, *CHARSET, ":", BAR]

Color = tuple[int, int, int]


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans Mono Bold (bundled with matplotlib, so present offline) at ``size`` pixels.

    Bold because at 8 px the regular weight's thin strokes (the colon's dots, the 7's diagonal)
    antialias to light grey, close to the clutter's tone.
    """
    props = font_manager.FontProperties(family="DejaVu Sans Mono", weight="bold")
    return ImageFont.truetype(font_manager.findfont(props, fallback_to_default=False), size)


def light_color(rng: np.random.Generator) -> Color:
    """A pale, nearly grey paper colour."""
    base = int(rng.integers(215, 250))
    return tuple(int(np.clip(base + rng.integers(-8, 9), 0, 255)) for _ in range(3))


def dark_color(rng: np.random.Generator) -> Color:
    """An ink colour dark enough to read on any ``light_color``."""
    return tuple(int(v) for v in rng.integers(0, 80, size=3))


def mid_color(rng: np.random.Generator) -> Color:
    """A clutter colour: visible, but lighter than ink."""
    return tuple(int(v) for v in rng.integers(120, 200, size=3))


class Canvas:
    """An RGB image on a ``grid x grid`` lattice of cells, and the character drawn in each cell.

    ``cells[r][c]`` is the glyph drawn in row ``r``, column ``c`` (``BAR`` for a bar cell,
    ``BLANK`` otherwise); ``busy[r, c]`` says the cell holds content that clutter must avoid.
    """

    def __init__(self, image_size: int, rng: np.random.Generator, background: Color | None = None,
                 grid: int = GRID):
        if image_size % grid:
            raise ValueError(f"image_size must be a multiple of {grid}, got {image_size}")
        self.size = image_size
        self.grid = grid
        self.cell = image_size // grid
        self.rng = rng
        self.background = background or light_color(rng)
        self.image = Image.new("RGB", (image_size, image_size), self.background)
        self.draw = ImageDraw.Draw(self.image)
        self.cells = [[BLANK] * grid for _ in range(grid)]
        self.busy = np.zeros((grid, grid), dtype=bool)

    def box(self, row: int, col: int, height: int = 1, width: int = 1, inset: int = 0) -> tuple[int, int, int, int]:
        """Pixel rectangle (x0, y0, x1, y1), inclusive, of a block of cells, shrunk by ``inset`` px."""
        x0, y0 = col * self.cell + inset, row * self.cell + inset
        return x0, y0, x0 + width * self.cell - 1 - 2 * inset, y0 + height * self.cell - 1 - 2 * inset

    def glyph(self, row: int, col: int, char: str, color: Color) -> None:
        """Draw one character centred in its cell (glyph about 7x8 px at 8 px cells) and record it."""
        font = _font(round(10 * self.cell / 8))
        x0, y0, x1, y1 = self.draw.textbbox((0, 0), char, font=font)
        x = col * self.cell + (self.cell - (x1 - x0)) // 2 - x0
        y = row * self.cell + (self.cell - (y1 - y0)) // 2 - y0
        self.draw.text((x, y), char, font=font, fill=color)
        self.cells[row][col] = char
        self.busy[row, col] = True

    def text(self, row: int, col: int, string: str, color: Color) -> None:
        """Draw ``string`` left to right from cell (row, col), one character per cell."""
        for i, char in enumerate(string):
            self.glyph(row, col + i, char, color)

    def fill(self, row: int, col: int, color: Color, height: int = 1, width: int = 1, inset: int = 0,
             mark: str | None = None) -> None:
        """Paint a block of cells; mark them busy, and record ``mark`` in their cells if given."""
        self.draw.rectangle(self.box(row, col, height, width, inset), fill=color)
        self.busy[row:row + height, col:col + width] = True
        if mark is not None:
            for r in range(row, row + height):
                for c in range(col, col + width):
                    self.cells[r][c] = mark

    def free_cells(self, avoid: np.ndarray | None = None) -> list[tuple[int, int]]:
        """Cells neither busy nor in ``avoid`` (a grid x grid bool mask), in row-major order."""
        blocked = self.busy if avoid is None else self.busy | avoid
        return [(int(r), int(c)) for r, c in zip(*np.nonzero(~blocked))]

    def clutter(self, count: int, avoid: np.ndarray | None = None) -> None:
        """Draw ``count`` small non-glyph shapes (dot, ring, stroke, square), each inside one free cell."""
        free = self.free_cells(avoid)
        picks = self.rng.permutation(len(free))[:count]
        s = self.cell
        for i in picks:
            r, c = free[i]
            x0, y0 = c * s, r * s
            kind = int(self.rng.integers(4))
            color = mid_color(self.rng)
            a, b = (int(v) for v in self.rng.integers(1, s // 2, size=2))
            if kind == 0:  # dot
                rad = max(1, s // 8)
                cx, cy = x0 + s // 2 + a - s // 4, y0 + s // 2 + b - s // 4
                self.draw.ellipse((cx - rad, cy - rad, cx + rad, cy + rad), fill=color)
            elif kind == 1:  # ring
                self.draw.ellipse((x0 + 1, y0 + 1, x0 + s - 2, y0 + s - 2), outline=color)
            elif kind == 2:  # stroke
                self.draw.line((x0 + a, y0 + 1, x0 + s - 1 - b, y0 + s - 2), fill=color)
            else:  # square outline
                self.draw.rectangle((x0 + 1, y0 + 1, x0 + s - 2, y0 + s - 2), outline=color)

    def finish(self, noise: float = 3.0) -> Image.Image:
        """The image with grey Gaussian pixel noise of standard deviation ``noise`` (0..255 units).

        Grey (one value per pixel for all channels) rather than per-channel noise: it looks the
        same to a reader and keeps a PNG at ~4.5 kB instead of ~7 kB, so eval splits stay small.
        """
        pixels = np.asarray(self.image, dtype=np.float32)
        pixels = pixels + self.rng.normal(0.0, noise, size=pixels.shape[:2])[..., None]  # (H, W, 1)
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
