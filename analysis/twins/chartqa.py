"""synth_chartqa: read a bar chart (ChartQA).

Three or four bars, one cell wide, with a one-letter label under each and distinct heights of
1-7 cells on a common baseline; a bar's value is its height in cells. Questions: the tallest
bar, the shortest bar, or one bar's value, all needing comparison or counting across cells.
Scored with ChartQA's relaxed accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.twins.base import Scene, Twin, empty_cells
from analysis.twins.canvas import BAR, LETTERS, Canvas, dark_color

KINDS = ("tallest", "shortest", "value")
QUESTIONS = {
    "tallest": "Which bar is the tallest?",
    "shortest": "Which bar is the shortest?",
    "value": "What is the value of {label}?",
}


def bar_color(rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated mid-dark colour: one channel high, the others low."""
    color = [int(v) for v in rng.integers(20, 110, size=3)]
    color[int(rng.integers(3))] = int(rng.integers(150, 220))
    return tuple(color)


@dataclass
class ChartQA(Twin):
    """``bars`` bars in every other column; heights drawn without replacement from 1..grid-1; labels on
    the bottom row, bars above it."""

    bars: tuple[int, int] = (3, 4)

    name = "synth_chartqa"
    resembles = "chartqa"
    metric = "relaxed_overall"
    fields = ("kind", "labels", "values", "columns", "type")

    def compose(self, rng: np.random.Generator) -> Scene:
        n = int(rng.integers(self.bars[0], self.bars[1] + 1))
        label_row = self.grid - 1
        slots = range(int(rng.integers(2)), self.grid, 2)
        columns = sorted(int(c) for c in rng.choice(list(slots), size=n, replace=False))
        labels = [str(k) for k in rng.choice(list(LETTERS), size=n, replace=False)]
        heights = [int(h) for h in rng.choice(np.arange(1, label_row + 1), size=n, replace=False)]
        cells = empty_cells(self.grid)
        for col, label, height in zip(columns, labels, heights):
            cells[label_row][col] = label
            for r in range(label_row - height, label_row):
                cells[r][col] = BAR
        kind = str(rng.choice(KINDS))
        if kind == "value":
            i = int(rng.integers(n))
            question, answer = QUESTIONS[kind].format(label=labels[i]), str(heights[i])
        else:
            pick = max if kind == "tallest" else min
            question, answer = QUESTIONS[kind], labels[heights.index(pick(heights))]
        # type: the ChartQA split field; templated questions are like its "augmented" split.
        extra = {"kind": kind, "labels": "".join(labels), "values": heights, "type": "augmented_test",
                 "columns": columns}
        return Scene(cells, question, answer, extra)

    def paint(self, scene: Scene, canvas: Canvas) -> None:
        ink = dark_color(canvas.rng)
        extra, label_row = scene.extra, self.grid - 1
        for col, label, height in zip(extra["columns"], extra["labels"], extra["values"]):
            canvas.fill(label_row - height, col, bar_color(canvas.rng), height=height, mark=BAR)
            canvas.glyph(label_row, col, label, ink)
        # The baseline: one ink line along the bottom edge of the bar rows.
        y = label_row * canvas.cell - 1
        canvas.draw.line((0, y, canvas.size - 1, y), fill=ink)


@dataclass
class ChartQAHR(ChartQA):
    """synth_chartqa at 128 px: bars of 1-15 cells over eight slots of a 16 x 16 lattice of 8 px cells;
    the labels (every answer names or locates one) are legible only in the AnyRes crops."""

    bars: tuple[int, int] = (3, 5)

    name = "synth_chartqa_hr"
    clutter = (0, 4)
    grid = 16
    image_size = 128
