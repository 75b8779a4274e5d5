"""The video twin (synth_video): deterministic clips split by content, one character per 2-frame block, written as
lossless .mp4 that decode bit-exact at 2 fps, handed to lmms-eval as a file path and scored by exact match."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from analysis import twins
from analysis.twins.video import BLOCK, FPS, stack

NAME = "synth_video"
REPO = Path(__file__).resolve().parents[1]


def pixels(sample: dict) -> list[np.ndarray]:
    return [np.asarray(frame) for frame in sample["frames"]]


def decode(path) -> tuple[list[np.ndarray], list[float], float]:
    """Every frame of an .mp4 as RGB arrays, their times in seconds, and the stream's average frame rate (PyAV)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        rate = float(stream.average_rate)
        return [f.to_ndarray(format="rgb24") for f in frames], [float(f.time) for f in frames], rate


def test_registry_keeps_video_out_of_the_picture_twins():
    assert list(twins.VIDEO_TWINS) == [NAME] and twins.get(NAME) is twins.VIDEO_TWINS[NAME]
    assert NAME in twins.ALL_TWINS and NAME not in twins.TWINS and NAME not in twins.HR_TWINS


def test_same_args_same_clip_other_seed_differs_and_sample_i_ignores_n_and_start():
    a, b = twins.generate(NAME, "eval", 5, seed=3), twins.generate(NAME, "eval", 5, seed=3)
    for x, y in zip(a, b):
        assert all((p == q).all() for p, q in zip(pixels(x), pixels(y)))
        assert {k: v for k, v in x.items() if k != "frames"} == {k: v for k, v in y.items() if k != "frames"}
    other = twins.generate(NAME, "eval", 5, seed=4)
    assert [s["block_cells"] for s in a] != [s["block_cells"] for s in other]
    tail = twins.generate(NAME, "eval", 2, seed=3, start=3)
    assert [s["id"] for s in tail] == [s["id"] for s in a[3:]]
    assert all((p == q).all() for x, y in zip(a[3:], tail) for p, q in zip(pixels(x), pixels(y)))


def test_train_and_eval_share_no_clip_content():
    def key(s):
        return tuple(map(tuple, stack(s["block_cells"])))

    train = {key(s) for s in twins.generate(NAME, "train", 300, seed=0)}
    evals = twins.generate(NAME, "eval", 60, seed=twins.EVAL_SEED)
    assert not train & {key(s) for s in evals}
    assert all(twins.split_of(NAME, stack(s["block_cells"])) == "eval" for s in evals)
    assert all(twins.split_of(NAME, stack(s["block_cells"])) == "train" for s in twins.generate(NAME, "train", 60, 1))


def test_clip_is_2n_frames_of_64_px_rgb_at_2_fps():
    samples = twins.generate(NAME, "eval", 40, seed=2)
    assert {len(s["answer"]) for s in samples} == {3, 4, 5}
    for s in samples:
        assert s["n_frames"] == len(s["frames"]) == BLOCK * len(s["answer"]) == 2 * len(s["block_cells"])
        assert s["fps"] == FPS == 2 and s["answers"] == [s["answer"]]
        assert all(f.size == (64, 64) and f.mode == "RGB" for f in s["frames"])


def test_answer_is_the_block_characters_in_order_and_each_block_shows_only_its_own():
    for s in twins.generate(NAME, "eval", 30, seed=2):
        shown = []
        for k, cells in enumerate(s["block_cells"]):
            drawn = [(r, c, char) for r, row in enumerate(cells) for c, char in enumerate(row) if char]
            assert len(drawn) == 1 and len(cells) == 8 and all(len(row) == 8 for row in cells)
            shown.append(drawn[0][2])
            glyph = np.array([[bool(char) for char in row] for row in cells])
            for frame in s["frames"][BLOCK * k:BLOCK * (k + 1)]:
                luma = np.asarray(frame.convert("L"), dtype=np.int16).reshape(8, 8, 8, 8)
                darkest = luma.min(axis=(1, 3))  # (8, 8): the darkest pixel of each 8 px cell
                assert darkest[glyph].max() < 100 and darkest[~glyph].min() > 100, s["id"]  # the glyph alone is inked
        assert "".join(shown) == s["answer"], s["id"]


def test_other_image_size_draws_the_same_content_larger():
    small, big = twins.generate(NAME, "train", 3, seed=0), twins.generate(NAME, "train", 3, seed=0, image_size=128)
    assert [s["block_cells"] for s in big] == [s["block_cells"] for s in small]
    assert all(f.size == (128, 128) for s in big for f in s["frames"])


def test_blank_image_blanks_a_frame():
    frame = twins.generate(NAME, "eval", 1, seed=0)[0]["frames"][0]
    blank = np.asarray(twins.blank_image(frame))
    assert blank.shape == (64, 64, 3) and (blank == blank[0, 0]).all() and blank[0, 0].min() > 150


def test_written_split_decodes_bit_exact_at_2_fps_and_is_byte_identical(tmp_path):
    import pyarrow.parquet as pq

    path = twins.write_split(NAME, "eval", 3, seed=5, out_dir=tmp_path / "a")
    again = twins.write_split(NAME, "eval", 3, seed=5, out_dir=tmp_path / "b")
    assert path == tmp_path / "a" / NAME / "eval.parquet" and path.read_bytes() == again.read_bytes()
    rows, samples = pq.read_table(path).to_pylist(), twins.generate(NAME, "eval", 3, seed=5)
    assert [r["id"] for r in rows] == [s["id"] for s in samples]
    for row, sample in zip(rows, samples):
        assert row["video"] == f"videos/{sample['id']}.mp4" and "frames" not in row
        keys = ("answer", "answers", "question")
        assert [row[k] for k in keys] == [sample[k] for k in keys]
        assert (row["n_frames"], row["fps"]) == (sample["n_frames"], 2)
        cells = [["".join(c or " " for c in line) for line in block] for block in sample["block_cells"]]
        assert row["block_cells"] == cells
        frames, times, rate = decode(path.parent / row["video"])
        assert len(frames) == sample["n_frames"] and all((f == p).all() for f, p in zip(frames, pixels(sample)))
        assert rate == 2.0 and times == [i / 2 for i in range(sample["n_frames"])]
        assert (path.parent / row["video"]).read_bytes() == (again.parent / row["video"]).read_bytes()


def test_make_twins_writes_the_video_twin(tmp_path):
    subprocess.run([sys.executable, "experiments/make_twins.py", "--twins", NAME, "--n", "2", "--out", str(tmp_path)],
                   cwd=REPO, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    ids = [s["id"] for s in twins.generate(NAME, "eval", 2, seed=twins.EVAL_SEED)]
    assert (tmp_path / NAME / "eval.parquet").is_file()
    assert sorted(p.name for p in (tmp_path / NAME / "videos").iterdir()) == [f"{i}.mp4" for i in ids]


def test_ensure_eval_data_writes_the_video_twin(tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr(twins, "DATA_DIR", tmp_path)
    monkeypatch.setattr(twins, "write_split", lambda name, split, n, seed: written.append((name, split, n, seed)))
    twins.ensure_eval_data([twins.GROUP, NAME])
    assert written == [(name, "eval", twins.EVAL_SIZE, twins.EVAL_SEED) for name in [*twins.TWINS, NAME]]


@pytest.fixture(scope="module")
def eval_rows() -> list[dict]:
    """The eval split's rows, written to data/twins/synth_video on first use (ignored by git)."""
    import pyarrow.parquet as pq

    twins.ensure_eval_data([NAME])
    return pq.read_table(twins.DATA_DIR / NAME / "eval.parquet").to_pylist()


def test_eval_rows_resolve_to_the_generated_clips(eval_rows):
    from analysis.twins.tasks.utils import video_doc_to_visual

    assert len(eval_rows) == twins.EVAL_SIZE
    first = twins.generate(NAME, "eval", 1, seed=twins.EVAL_SEED)[0]
    visual = video_doc_to_visual(eval_rows[0])
    assert visual == [str(twins.DATA_DIR / NAME / "videos" / f"{first['id']}.mp4")] and Path(visual[0]).is_absolute()
    frames, _, _ = decode(visual[0])
    assert len(frames) == first["n_frames"] and all((f == p).all() for f, p in zip(frames, pixels(first)))
    assert all(Path(video_doc_to_visual(row)[0]).is_file() for row in eval_rows)


def test_missing_clip_names_the_file_and_the_command_that_writes_it():
    from analysis.twins.tasks.utils import video_doc_to_visual

    command = r"`python experiments/make_twins\.py --twins synth_video`"
    with pytest.raises(FileNotFoundError, match=rf"videos/nope\.mp4.*{command}"):
        video_doc_to_visual({"video": "videos/nope.mp4"})


def test_score_is_exact_match_ignoring_case_and_surrounding_space():
    docs = twins.generate(NAME, "eval", 40, seed=1)
    assert twins.score(NAME, [d["answer"] for d in docs], docs) == 1.0
    assert twins.score(NAME, [f" {d['answer'].lower()}\n" for d in docs], docs) == 1.0
    assert twins.score(NAME, ["#"] * len(docs), docs) == 0.0
    assert twins.score(NAME, [d["answer"][:-1] for d in docs], docs) == 0.0  # a prefix is not the answer
    assert twins.score(NAME, [d["answer"][::-1] for d in docs], docs) < 0.2  # the right characters, wrong order
    half = [d["answer"] if i % 2 else "#" for i, d in enumerate(docs)]
    assert twins.score(NAME, half, docs) == 0.5


def test_training_refuses_the_video_twin():
    from analysis.training.run import twin_names

    with pytest.raises(ValueError, match="synth_video is a video twin"):
        twin_names({"data": {"twins": NAME}})


@pytest.fixture(scope="module")
def task(eval_rows):
    from lmms_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(twins.TASKS_DIR), include_defaults=False)
    assert NAME in manager.all_subtasks
    return manager, get_task_dict([NAME], manager)[NAME]


def test_task_yaml_loads_the_clips_and_scores_through_process_results(task, eval_rows):
    _, task = task
    docs = list(task.test_docs())
    assert [d["id"] for d in docs] == [r["id"] for r in eval_rows]
    assert task.doc_to_text(docs[0]) == docs[0]["question"]
    visual = task.doc_to_visual(docs[0])
    assert visual == [str(twins.DATA_DIR / NAME / docs[0]["video"])] and Path(visual[0]).is_file()
    truth = [task.process_results(d, [d["answer"]])["exact_match"] for d in docs]
    wrong = [task.process_results(d, ["#"])["exact_match"] for d in docs]
    aggregate = task.aggregation()["exact_match"]
    assert aggregate(truth) == 1.0 and aggregate(wrong) == 0.0


def test_task_runs_end_to_end_in_lmms_eval_with_a_path(task):
    """An oracle handed each clip's path through ``simple_evaluate``: 100%; a fixed wrong answer 0%."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_oracle import Oracle

    manager, _ = task

    def check(visuals):
        (video,) = visuals
        assert isinstance(video, str) and video.endswith(".mp4") and Path(video).is_file()

    for wrong, expected in ((False, 1.0), (True, 0.0)):
        results = simple_evaluate(model=Oracle(wrong, check), tasks=[NAME], task_manager=manager, limit=4,
                                  log_samples=False, bootstrap_iters=0)["results"]
        assert results[NAME]["exact_match,none"] == expected


def test_eval_config_runs_the_video_task_with_its_metric():
    from omegaconf import OmegaConf

    conf = OmegaConf.load(REPO / "conf" / "eval" / "synthetic_video.yaml")
    assert conf.name == "synthetic_video" and dict(conf.tasks) == {NAME: twins.get(NAME).metric}
    assert (REPO / conf.include_path / f"{NAME}.yaml").is_file() and conf.include_defaults is False
    assert conf.blind is False and conf.limit == 50
