"""The synthetic twins: deterministic, honest about what is drawn, scored by lmms-eval's own code."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from analysis import twins
from analysis.twins.canvas import BAR, GRID
from analysis.twins.parquet import png_bytes

NAMES = list(twins.TWINS)
WRONG = "#"  # never an answer: no twin draws it as a glyph


def test_registry_names_the_four_twins():
    assert NAMES == ["synth_textvqa", "synth_docvqa", "synth_ocrbench", "synth_chartqa"]
    with pytest.raises(KeyError, match="known"):
        twins.get("synth_vqav2")


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_bytes_other_seed_differs(name):
    a, b = twins.generate(name, "eval", 6, seed=3), twins.generate(name, "eval", 6, seed=3)
    other = twins.generate(name, "eval", 6, seed=4)
    assert [png_bytes(s["image"]) for s in a] == [png_bytes(s["image"]) for s in b]
    assert [{k: v for k, v in s.items() if k != "image"} for s in a] == [
        {k: v for k, v in s.items() if k != "image"} for s in b]
    assert all(png_bytes(x["image"]) != png_bytes(y["image"]) for x, y in zip(a, other))
    assert [s["cells"] for s in a] != [s["cells"] for s in other]


@pytest.mark.parametrize("name", NAMES)
def test_sample_i_does_not_depend_on_n_start_or_image_size(name):
    many = twins.generate(name, "train", 5, seed=0)
    tail = twins.generate(name, "train", 2, seed=0, start=3)
    assert [png_bytes(s["image"]) for s in many[3:]] == [png_bytes(s["image"]) for s in tail]
    big = twins.generate(name, "train", 5, seed=0, image_size=128)
    assert big[0]["image"].size == (128, 128) and many[0]["image"].size == (64, 64)
    assert [s["cells"] for s in big] == [s["cells"] for s in many]


def test_write_split_is_byte_identical(tmp_path):
    first = twins.write_split("synth_chartqa", "eval", 8, seed=5, out_dir=tmp_path / "a")
    second = twins.write_split("synth_chartqa", "eval", 8, seed=5, out_dir=tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()
    assert first == tmp_path / "a" / "synth_chartqa" / "eval.parquet"


@pytest.mark.parametrize("name", NAMES)
def test_committed_eval_split_is_what_the_generator_makes(name):
    import pyarrow.parquet as pq

    table = pq.read_table(twins.DATA_DIR / name / "eval.parquet")
    assert table.num_rows == twins.EVAL_SIZE
    head = twins.generate(name, "eval", 4, seed=twins.EVAL_SEED)
    assert table.column("id").to_pylist()[:4] == [s["id"] for s in head]
    assert [img["bytes"] for img in table.column("image").to_pylist()[:4]] == [png_bytes(s["image"]) for s in head]


@pytest.mark.parametrize("name", NAMES)
def test_train_and_eval_share_no_picture_content(name):
    def key(s):
        return tuple(map(tuple, s["cells"]))

    train = {key(s) for s in twins.generate(name, "train", 300, seed=0)}
    evals = twins.generate(name, "eval", 60, seed=twins.EVAL_SEED)
    assert not train & {key(s) for s in evals}
    assert all(twins.split_of(name, s["cells"]) == "eval" for s in evals)


@pytest.mark.parametrize("name", NAMES)
def test_ground_truth_scores_full_and_wrong_answers_score_low(name):
    docs = twins.generate(name, "eval", 40, seed=1)
    assert twins.score(name, [d["answer"] for d in docs], docs) == 1.0
    assert twins.score(name, [f" {d['answer'].lower()}\n" for d in docs], docs) == 1.0  # stripped, case-folded
    assert twins.score(name, [WRONG] * len(docs), docs) == 0.0
    assert twins.score(name, [""] * len(docs), docs) == 0.0
    rolled = [d["answer"] for d in docs[1:] + docs[:1]]  # another picture's answer
    assert twins.score(name, rolled, docs) < 0.2


def test_references_follow_the_real_benchmarks():
    textvqa = twins.generate("synth_textvqa", "eval", 3, seed=0)
    assert all(d["answers"] == [d["answer"]] * 10 for d in textvqa)
    # ANLS gives partial credit above its 0.5 threshold; one wrong digit of three keeps 2/3.
    doc = next(d for d in twins.generate("synth_docvqa", "eval", 40, seed=0) if len(d["answer"]) == 3)
    near = doc["answer"][:2] + ("1" if doc["answer"][2] != "1" else "2")
    assert twins.score("synth_docvqa", [near], [doc]) == pytest.approx(2 / 3)
    # OCRBench counts the answer contained in a longer prediction.
    ocr = twins.generate("synth_ocrbench", "eval", 1, seed=0)
    assert twins.score("synth_ocrbench", [f"it says {ocr[0]['answer']}"], ocr) == 1.0


def _visible(sample: dict, name: str) -> bool:
    """Whether the answer can be read off the drawn cells."""
    cells, answer = sample["cells"], sample["answer"]
    rows = ["".join(c or " " for c in row) for row in cells]
    if name == "synth_ocrbench":
        return sum(answer in row for row in rows) == 1 and sum(len(r.strip()) for r in rows) == len(answer)
    if name == "synth_textvqa":
        return rows[sample["row"]][sample["col"]:sample["col"] + len(answer)] == answer
    if name == "synth_docvqa":
        return sum(row.strip() == f"{sample['key']}:{answer}" for row in rows) == 1
    heights = {cells[-1][c]: sum(cells[r][c] == BAR for r in range(GRID)) for c in range(GRID) if cells[-1][c]}
    assert sorted(heights.values()) == sorted(sample["values"])
    if sample["kind"] == "value":
        return str(heights[sample["question"][-2]]) == answer
    return heights[answer] == (max if sample["kind"] == "tallest" else min)(heights.values())


@pytest.mark.parametrize("name", NAMES)
def test_answer_is_drawn_and_cells_match_the_pixels(name):
    for sample in twins.generate(name, "eval", 30, seed=2):
        assert _visible(sample, name), sample["id"]
        luma = np.asarray(sample["image"].convert("L"), dtype=np.int16).reshape(GRID, 8, GRID, 8)
        darkest = luma.min(axis=(1, 3))  # (GRID, GRID): darkest pixel of each cell
        glyph = np.array([[c not in ("", BAR) for c in row] for row in sample["cells"]])
        blank = np.array([[c == "" for c in row] for row in sample["cells"]])
        if name == "synth_chartqa":
            blank[GRID - 2] = False  # the chart's baseline runs through these cells
        assert (darkest[glyph] < 100).all(), sample["id"]  # every recorded glyph is inked
        assert (darkest[blank] > 100).all(), sample["id"]  # no ink where nothing is recorded


def test_blank_image_keeps_size_and_drops_content():
    image = twins.generate("synth_ocrbench", "eval", 1, seed=0)[0]["image"]
    blank = twins.blank_image(image)
    assert blank.size == image.size and blank.mode == image.mode
    pixels = np.asarray(blank)
    assert (pixels == pixels[0, 0]).all() and pixels[0, 0].min() > 150  # one light colour


@pytest.fixture(scope="module")
def task_manager():
    from lmms_eval.tasks import TaskManager

    return TaskManager(include_path=str(twins.TASKS_DIR), include_defaults=False)


def test_task_yamls_load_offline_and_score_through_process_results(task_manager):
    from lmms_eval.tasks import get_task_dict

    # the _hr ones: tests/test_twins_hr.py; synth_video: tests/test_twin_video.py
    assert set(task_manager.all_subtasks) == set(NAMES) | set(twins.HR_TWINS) | set(twins.VIDEO_TWINS)
    assert sorted(task_manager.all_groups) == sorted([twins.GROUP, twins.GROUP_HR])
    tasks = {name: task for name, task in get_task_dict(NAMES, task_manager).items()}
    for name, task in tasks.items():
        docs = list(task.test_docs())
        assert len(docs) == twins.EVAL_SIZE
        assert task.doc_to_text(docs[0]) == docs[0]["question"]
        assert task.doc_to_visual(docs[0])[0].size == (64, 64)
        metric, aggregate = twins.TWINS[name].metric, task.aggregation()[twins.TWINS[name].metric]
        truth = [task.process_results(d, [d["answer"]])[metric] for d in docs]
        wrong = [task.process_results(d, [WRONG])[metric] for d in docs]
        assert aggregate(truth) == 1.0 and aggregate(wrong) == 0.0
        assert twins.score(name, [d["answer"] for d in docs[:20]], docs[:20]) == 1.0  # same code as score()


def test_group_runs_end_to_end_in_lmms_eval(task_manager):
    """An oracle model through ``simple_evaluate``: 100% on every twin, a fixed wrong answer 0%."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_oracle import Oracle

    def check(visuals):
        assert visuals[0].size == (64, 64)

    for wrong, expected in ((False, 1.0), (True, 0.0)):
        results = simple_evaluate(model=Oracle(wrong, check, WRONG), tasks=[twins.GROUP], task_manager=task_manager, limit=8,
                                  log_samples=False, bootstrap_iters=0)["results"]
        for name in NAMES:
            assert results[name][f"{twins.TWINS[name].metric},none"] == expected, name
