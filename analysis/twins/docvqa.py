"""synth_docvqa: look up a field's value in a small form (DocVQA).

Two or three lines ``K:VV`` (a letter key, a colon, a 2-3 digit value), left-aligned; the
question names one key. Answering needs a relation across cells: find the key's row, then read
the value to its right. Scored with ANLS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.twins.base import Scene, Twin, empty_cells
from analysis.twins.canvas import DIGITS, LETTERS, Canvas, dark_color

QUESTIONS = ("What is the value of {key}?", "What is the {key} field?")


@dataclass
class DocVQA(Twin):
    """``lines`` key/value lines on distinct rows; values of ``value_length`` digits."""

    lines: tuple[int, int] = (2, 3)
    value_length: tuple[int, int] = (2, 3)

    name = "synth_docvqa"
    resembles = "docvqa"
    metric = "anls"
    fields = ("key", "col", "questionId")

    def compose(self, rng: np.random.Generator) -> Scene:
        n = int(rng.integers(self.lines[0], self.lines[1] + 1))
        rows = sorted(int(r) for r in rng.choice(self.grid, size=n, replace=False))
        keys = [str(k) for k in rng.choice(list(LETTERS), size=n, replace=False)]
        lengths = rng.integers(self.value_length[0], self.value_length[1] + 1, size=n)
        values = ["".join(rng.choice(list(DIGITS), size=int(length))) for length in lengths]
        col = int(rng.integers(self.grid - (2 + self.value_length[1]) + 1))
        cells = empty_cells(self.grid)
        for row, key, value in zip(rows, keys, values):
            line = f"{key}:{value}"
            cells[row][col:col + len(line)] = list(line)
        asked = int(rng.integers(n))
        question = str(rng.choice(QUESTIONS)).format(key=keys[asked])
        extra = {"key": keys[asked], "col": col, "questionId": int(rng.integers(2**31))}
        return Scene(cells, question, values[asked], extra)

    def paint(self, scene: Scene, canvas: Canvas) -> None:
        ink = dark_color(canvas.rng)
        for r, row in enumerate(scene.cells):
            for c, char in enumerate(row):
                if char:
                    canvas.glyph(r, c, char, ink)


@dataclass
class DocVQAHR(DocVQA):
    """synth_docvqa at 128 px: the form on a 16 x 16 lattice of 8 px cells, two to four lines."""

    lines: tuple[int, int] = (2, 4)

    name = "synth_docvqa_hr"
    clutter = (0, 6)
    grid = 16
    image_size = 128
