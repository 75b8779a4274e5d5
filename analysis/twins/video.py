"""synth_video: which characters appear, in order (a video twin, for Qwen-VL's ``videos=`` input).

A clip of ``n`` characters (3..5) is ``n`` temporal blocks of ``BLOCK`` = 2 frames, written at ``FPS`` = 2: character
``k`` is shown alone, among clutter, at its own random cell of the 8 x 8 lattice of 8 px cells during block ``k`` (same
cell and ink in both of its frames; clutter and noise are drawn per frame). A reader sampling at 2 fps gets every
frame, and one Qwen-VL temporal patch (2 frames) holds exactly one character. The answer is the characters
concatenated ("K7Q"), scored by exact match ignoring case (``tasks/utils.py``).

Deviations from ``Twin``, because a sample is a clip and not a picture:

* ``sample`` is overridden: it returns ``frames`` (list of PIL RGB) and ``fps`` instead of ``image``, and
  ``block_cells`` (one grid x grid lattice per block, "" for blank) instead of ``cells``, so that nothing expecting
  one picture's lattice gets a clip's. ``compose`` still decides the content and ``Twin.scene`` the split; there is
  no ``paint`` (each frame is its own ``Canvas``).
* The content that ``split_of`` hashes (``Scene.cells``) is the blocks' lattices stacked top to bottom
  (``stack``: n x grid rows of grid cells): the characters, their order and their cells, so ``split_of`` works
  unchanged and train and eval never share a clip's content.
* The clip's paper colour is one per clip (a page filmed still), drawn before the frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.twins.base import Scene, Twin, empty_cells
from analysis.twins.canvas import CHARSET, Canvas, dark_color, light_color

QUESTIONS = ("Which characters appear, in order?", "Which characters are shown, in order?",
             "List the characters in the order they appear.")
BLOCK = 2  # frames per character: one Qwen-VL temporal patch
FPS = 2  # frames per second written: a reader at 2 fps gets every frame


def stack(block_cells: list[list[list[str]]]) -> list[list[str]]:
    """The per-block lattices one above the other (n x grid rows): the clip's content as ``split_of`` hashes it."""
    return [row for cells in block_cells for row in cells]


@dataclass
class VideoOrder(Twin):
    """``length`` characters, one per block of ``BLOCK`` frames, each alone at its own random cell."""

    length: tuple[int, int] = (3, 5)  # inclusive

    name = "synth_video"
    resembles = "videomme"
    metric = "exact_match"
    fields = ("block_cells",)

    def compose(self, rng: np.random.Generator) -> Scene:
        n = int(rng.integers(self.length[0], self.length[1] + 1))
        text = "".join(rng.choice(list(CHARSET), size=n))
        blocks = []
        for char in text:
            cells = empty_cells(self.grid)
            cells[int(rng.integers(self.grid))][int(rng.integers(self.grid))] = char
            blocks.append(cells)
        return Scene(stack(blocks), str(rng.choice(QUESTIONS)), text, {"block_cells": blocks})

    def sample(self, split: str, seed: int, index: int, image_size: int | None = None) -> dict:
        """Sample ``index`` of ``split`` for ``seed``: id, frames (2n PIL RGB, ``image_size`` square, default 64),
        fps, n_frames, question, answers, answer and block_cells (the lattice each block shows)."""
        scene, rng = self.scene(split, seed, index)
        size = image_size or self.image_size
        background = light_color(rng)
        frames = []
        for char, cells in zip(scene.answer, scene.extra["block_cells"]):
            row, col = next((r, c) for r, line in enumerate(cells) for c, cell in enumerate(line) if cell)
            ink = dark_color(rng)
            for _ in range(BLOCK):
                canvas = Canvas(size, rng, background, grid=self.grid)
                canvas.glyph(row, col, char, ink)
                if canvas.cells != cells:  # the cells say what each block shows: they must be exact
                    raise AssertionError(f"{self.name}: painted cells differ from the scene")
                canvas.clutter(int(rng.integers(self.clutter[0], self.clutter[1] + 1)))
                frames.append(canvas.finish(self.noise))
        return {
            "id": f"{self.name}-{split}-{seed}-{index:06d}",
            "frames": frames,
            "fps": FPS,
            "n_frames": len(frames),
            "question": scene.question,
            "answers": self.answers(scene),
            "answer": scene.answer,
            "block_cells": scene.extra["block_cells"],
        }
