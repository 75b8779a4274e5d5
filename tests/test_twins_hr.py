"""The high-resolution twins (synth_*_hr): 128 px, 16 x 16 cells of the same 8 px, deterministic, split by content,
scored as their 64 px originals, and registered as their own lmms-eval tasks; the 64 px twins are untouched."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from analysis import twins
from analysis.twins.canvas import BAR
from analysis.twins.parquet import png_bytes

HR = list(twins.HR_TWINS)


def test_registry_keeps_the_four_and_adds_four_hr():
    assert list(twins.TWINS) == ["synth_textvqa", "synth_docvqa", "synth_ocrbench", "synth_chartqa"]
    assert HR == [f"{name}_hr" for name in twins.TWINS]
    assert all(twins.get(name).grid == 16 and twins.get(name).image_size == 128 for name in HR)
    assert all(twins.get(name).grid == 8 and twins.get(name).image_size == 64 for name in twins.TWINS)


@pytest.mark.parametrize("name", HR)
def test_hr_renders_128_px_with_16_by_16_cells_of_8_px(name):
    for sample in twins.generate(name, "eval", 12, seed=2):
        cells = sample["cells"]
        assert sample["image"].size == (128, 128) and len(cells) == 16 and all(len(row) == 16 for row in cells)
        assert sample["id"].startswith(f"{name}-eval-2-")
        luma = np.asarray(sample["image"].convert("L"), dtype=np.int16).reshape(16, 8, 16, 8)
        darkest = luma.min(axis=(1, 3))  # (16, 16): the darkest pixel of each 8 px cell
        glyphs = np.array([[bool(c) and c != BAR for c in row] for row in cells])
        assert darkest[glyphs].max() < 130  # every recorded glyph is inked inside its own cell


@pytest.mark.parametrize("name", HR)
def test_hr_deterministic_split_by_content_and_independent_of_n(name):
    a, b = twins.generate(name, "eval", 5, seed=3), twins.generate(name, "eval", 5, seed=3)
    assert [png_bytes(s["image"]) for s in a] == [png_bytes(s["image"]) for s in b]
    tail = twins.generate(name, "eval", 2, seed=3, start=3)
    assert [png_bytes(s["image"]) for s in a[3:]] == [png_bytes(s["image"]) for s in tail]

    def key(s):
        return tuple(map(tuple, s["cells"]))

    train = {key(s) for s in twins.generate(name, "train", 150, seed=0)}
    evals = twins.generate(name, "eval", 40, seed=twins.EVAL_SEED)
    assert not train & {key(s) for s in evals}
    assert all(twins.split_of(name, s["cells"]) == "eval" for s in evals)


@pytest.mark.parametrize("name", HR)
def test_hr_content_uses_the_whole_16_grid(name):
    """Answers are placed over all four AnyRes crops (rows and columns beyond the 64 px twins' 8)."""
    rows, cols = set(), set()
    for s in twins.generate(name, "train", 80, seed=0):
        for r, row in enumerate(s["cells"]):
            for c, char in enumerate(row):
                if char:
                    rows.add(r), cols.add(c)
    assert max(rows) >= 12 and max(cols) >= 12 and min(rows) <= 4 and min(cols) <= 4


@pytest.mark.parametrize("name", HR)
def test_hr_scores_with_its_originals_metric(name):
    docs = twins.generate(name, "eval", 20, seed=1)
    assert twins.score(name, [d["answer"] for d in docs], docs) == 1.0
    assert twins.score(name, ["#"] * len(docs), docs) < 0.2
    assert twins.get(name).metric == twins.get(name.removesuffix("_hr")).metric


def test_hr_tasks_are_registered_with_their_own_names():
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(twins.TASKS_DIR), include_defaults=False)
    assert set(HR) <= set(manager.all_tasks) and twins.GROUP_HR in manager.all_tasks
    for name in HR:
        text = (twins.TASKS_DIR / f"{name}.yaml").read_text()
        assert f"task: {name}\n" in text and f"data/twins/{name}/eval.parquet" in text


def test_ensure_eval_data_writes_hr_splits_from_the_group(tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr(twins, "DATA_DIR", tmp_path)
    monkeypatch.setattr(twins, "write_split", lambda name, split, n, seed: written.append((name, split, n, seed)))
    twins.ensure_eval_data([twins.GROUP_HR])
    assert written == [(name, "eval", twins.EVAL_SIZE, twins.EVAL_SEED) for name in HR]


def test_write_split_hr_is_128_px(tmp_path):
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    path = twins.write_split("synth_ocrbench_hr", "eval", 3, seed=5, out_dir=tmp_path)
    image = pq.read_table(path).column("image").to_pylist()[0]["bytes"]
    assert Image.open(io.BytesIO(image)).size == (128, 128)


def test_hr_task_yamls_load_their_128_px_eval_split_and_score():
    from lmms_eval.tasks import TaskManager, get_task_dict

    twins.ensure_eval_data([twins.GROUP_HR])  # written on first use (ignored by git)
    manager = TaskManager(include_path=str(twins.TASKS_DIR), include_defaults=False)
    for name, task in get_task_dict(HR, manager).items():
        docs = list(task.test_docs())
        assert len(docs) == twins.EVAL_SIZE and task.doc_to_visual(docs[0])[0].size == (128, 128)
        assert docs[0]["id"] == twins.generate(name, "eval", 1, seed=twins.EVAL_SEED)[0]["id"]
        metric = twins.get(name).metric
        truth = [task.process_results(d, [d["answer"]])[metric] for d in docs[:30]]
        assert task.aggregation()[metric](truth) == 1.0
