"""What every twin shares: seeding, the train/eval partition, and assembling one sample.

A twin is two steps. ``compose(rng)`` decides the content (which characters go in which cells,
the question, the answer); ``paint(scene, canvas)`` draws it, with clutter and noise. The
train/eval partition is decided on the composed cells alone, by a hash, so the two splits
never share a picture's content, whatever the seeds and sizes.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field

import numpy as np

from analysis.twins.canvas import GRID, Canvas

SPLITS = ("train", "eval")
EVAL_SHARE = 8  # one content hash in EVAL_SHARE belongs to the eval split, the rest to train


@dataclass
class Scene:
    """The content of one sample before drawing.

    ``cells`` is grid x grid: the character each cell will show, ``""`` if none. ``extra`` holds
    the twin-specific fields of the sample (JSON-able scalars).
    """

    cells: list[list[str]]
    question: str
    answer: str
    extra: dict = field(default_factory=dict)


def empty_cells(grid: int = GRID) -> list[list[str]]:
    """A grid x grid lattice of blank cells."""
    return [[""] * grid for _ in range(grid)]


def split_of(name: str, cells: list[list[str]]) -> str:
    """The split ("train" or "eval") that the picture content ``cells`` of twin ``name`` belongs to."""
    key = name + "|" + "/".join(",".join(row) for row in cells)
    return "eval" if int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % EVAL_SHARE == 0 else "train"


def sample_rng(name: str, split: str, seed: int, index: int) -> np.random.Generator:
    """The generator for sample ``index``: independent of the number of samples asked for."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), SPLITS.index(split), index])


class Twin:
    """A synthetic benchmark resembling a real one. Subclasses set the class attributes below.

    ``metric`` is the key of the twin's ``process_results`` output that ``score`` averages;
    ``fields`` names the twin-specific columns (``Scene.extra`` keys) stored with each sample.
    ``grid`` is the number of cells per side and ``image_size`` the default picture size (its eval
    split's): 8 and 64 for the standard twins, 16 and 128 for the high-resolution ones (8 px cells both).
    """

    name: str = ""
    resembles: str = ""
    metric: str = ""
    fields: tuple[str, ...] = ()
    clutter: tuple[int, int] = (0, 3)  # inclusive range of clutter shapes per image
    noise: float = 3.0
    grid: int = GRID
    image_size: int = 64

    def compose(self, rng: np.random.Generator) -> Scene:
        raise NotImplementedError

    def paint(self, scene: Scene, canvas: Canvas) -> None:
        raise NotImplementedError

    def answers(self, scene: Scene) -> list[str]:
        """Reference answers; one unless the real benchmark has several per question."""
        return [scene.answer]

    def scene(self, split: str, seed: int, index: int) -> tuple[Scene, np.random.Generator]:
        """The content of sample ``index`` of ``split`` for ``seed`` (composed again until its cells hash into
        ``split``), and the generator that composed it, to draw it with."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rng = sample_rng(self.name, split, seed, index)
        scene = self.compose(rng)
        while split_of(self.name, scene.cells) != split:
            scene = self.compose(rng)
        return scene, rng

    def sample(self, split: str, seed: int, index: int, image_size: int | None = None) -> dict:
        """Sample ``index`` of ``split`` for ``seed``: id, image (PIL, ``image_size`` square, default the
        twin's), question, answers, answer, cells (grid x grid characters, "" for none) and the twin's
        ``fields``."""
        scene, rng = self.scene(split, seed, index)
        canvas = Canvas(image_size or self.image_size, rng, grid=self.grid)
        self.paint(scene, canvas)
        if canvas.cells != scene.cells:  # the cells are a training target: they must be exact
            raise AssertionError(f"{self.name}: painted cells differ from the scene")
        canvas.clutter(int(rng.integers(self.clutter[0], self.clutter[1] + 1)))
        return {
            "id": f"{self.name}-{split}-{seed}-{index:06d}",
            "image": canvas.finish(self.noise),
            "question": scene.question,
            "answers": self.answers(scene),
            "answer": scene.answer,
            "cells": scene.cells,
            **{key: scene.extra[key] for key in self.fields},
        }
