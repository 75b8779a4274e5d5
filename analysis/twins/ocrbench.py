"""synth_ocrbench: transcribe one short row of characters (OCRBench's text recognition).

Scored as OCRBench: the case-folded answer must be contained in the prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.twins.base import Scene, Twin, empty_cells
from analysis.twins.canvas import CHARSET, Canvas, dark_color

QUESTIONS = ("What is written?", "What is written in the image?", "Read the text.")


@dataclass
class OCRBench(Twin):
    """One row of ``length`` random characters at a random row and column, among clutter."""

    length: tuple[int, int] = (3, 5)  # inclusive

    name = "synth_ocrbench"
    resembles = "ocrbench"
    metric = "ocrbench_accuracy"
    fields = ("row", "col", "dataset", "question_type")

    def compose(self, rng: np.random.Generator) -> Scene:
        n = int(rng.integers(self.length[0], self.length[1] + 1))
        text = "".join(rng.choice(list(CHARSET), size=n))
        row, col = int(rng.integers(self.grid)), int(rng.integers(self.grid - n + 1))
        cells = empty_cells(self.grid)
        cells[row][col:col + n] = list(text)
        # dataset / question_type: the fields lmms-eval's ocrbench_process_results reads.
        extra = {"row": row, "col": col, "dataset": "synth", "question_type": "Regular Text Recognition"}
        return Scene(cells, str(rng.choice(QUESTIONS)), text, extra)

    def paint(self, scene: Scene, canvas: Canvas) -> None:
        canvas.text(scene.extra["row"], scene.extra["col"], scene.answer, dark_color(canvas.rng))


@dataclass
class OCRBenchHR(OCRBench):
    """synth_ocrbench at 128 px: the row on a 16 x 16 lattice of 8 px cells (it may straddle two crops)."""

    length: tuple[int, int] = (3, 6)

    name = "synth_ocrbench_hr"
    clutter = (0, 8)
    grid = 16
    image_size = 128
