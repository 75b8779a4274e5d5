"""synth_textvqa: read the sign in a cluttered scene (TextVQA).

The sign is a coloured plate carrying 3-4 characters; stray characters lie on the background
around it, so the reader must find the plate and read only what is on it. Ten reference answers
per question, as TextVQA collects from ten annotators (here they agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

from analysis.twins.base import Scene, Twin, empty_cells
from analysis.twins.canvas import CHARSET, Canvas, dark_color

QUESTIONS = ("What does the sign say?", "What is written on the sign?", "What text is on the sign?")
# Pale saturated plates, distinct from the nearly grey paper of ``light_color``.
PLATES = ((250, 215, 80), (150, 205, 245), (160, 230, 150), (250, 175, 120), (245, 170, 210))
N_ANNOTATORS = 10
_normalize = EvalAIAnswerProcessor()


@dataclass
class TextVQA(Twin):
    """A plate of ``length`` characters and ``strays`` single characters elsewhere (not touching it)."""

    length: tuple[int, int] = (3, 4)
    strays: tuple[int, int] = (1, 3)

    name = "synth_textvqa"
    resembles = "textvqa"
    metric = "exact_match"
    fields = ("row", "col", "plate", "question_id")
    clutter = (2, 4)

    def compose(self, rng: np.random.Generator) -> Scene:
        n = int(rng.integers(self.length[0], self.length[1] + 1))
        text = "".join(rng.choice(list(CHARSET), size=n))
        while _normalize(text) != text.lower():  # e.g. "THE" (an article) or "TWO" (a number word)
            text = "".join(rng.choice(list(CHARSET), size=n))
        g = self.grid
        row, col = int(rng.integers(g)), int(rng.integers(g - n + 1))
        cells = empty_cells(g)
        cells[row][col:col + n] = list(text)
        # Strays keep one cell away from the plate: a plate is read by its colour, not by a guess.
        near = np.zeros((g, g), dtype=bool)
        near[max(row - 1, 0):row + 2, max(col - 1, 0):col + n + 1] = True
        free = [(int(r), int(c)) for r, c in zip(*np.nonzero(~near))]
        k = int(rng.integers(self.strays[0], self.strays[1] + 1))
        for i in rng.permutation(len(free))[:k]:
            r, c = free[i]
            cells[r][c] = str(rng.choice(list(CHARSET)))
        extra = {"row": row, "col": col, "plate": int(rng.integers(len(PLATES))),
                 "question_id": int(rng.integers(2**31))}
        return Scene(cells, str(rng.choice(QUESTIONS)), text, extra)

    def paint(self, scene: Scene, canvas: Canvas) -> None:
        row, col, n = scene.extra["row"], scene.extra["col"], len(scene.answer)
        canvas.fill(row, col, PLATES[scene.extra["plate"]], width=n)
        ink = dark_color(canvas.rng)
        canvas.text(row, col, scene.answer, ink)
        for r in range(self.grid):
            for c in range(self.grid):
                if scene.cells[r][c] and not (r == row and col <= c < col + n):
                    canvas.glyph(r, c, scene.cells[r][c], ink)

    def answers(self, scene: Scene) -> list[str]:
        return [scene.answer] * N_ANNOTATORS


@dataclass
class TextVQAHR(TextVQA):
    """synth_textvqa at 128 px: a 16 x 16 lattice of the same 8 px cells (legible only in the AnyRes
    crops); more strays and clutter for the four times larger page."""

    strays: tuple[int, int] = (2, 6)

    name = "synth_textvqa_hr"
    clutter = (4, 10)
    grid = 16
    image_size = 128
