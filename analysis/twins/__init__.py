"""Synthetic twins of TextVQA, DocVQA, OCRBench and ChartQA, small enough for a CPU-trained LLaVA.

Each picture is a GRID x GRID lattice of cells (8 x 8 px at the default 64 px, one CLIP patch
each) with at most one glyph per cell; the answer is only readable from the picture. Samples are
deterministic in (twin, split, seed, index), and the train / eval splits never share content.
``HR_TWINS`` are the same four drawn at 128 px on a 16 x 16 lattice of the same 8 px cells
(``synth_<name>_hr``): legible to the tiny tower only in LLaVA-NeXT's 64 px AnyRes crops, not in
the base crop (the picture shrunk to 64 px); ``TWINS`` stays the four 64 px ones.
``VIDEO_TWINS`` holds ``synth_video`` (which characters appear, in order; ``video.py``): a clip of 64 px frames
written as a lossless .mp4, for models that take ``videos=`` (Qwen-VL). It is in neither ``TWINS`` nor
``HR_TWINS`` (what training iterates expects pictures); ``ALL_TWINS`` (``get``) knows all nine.
Scoring goes through lmms-eval's own metric functions (``tasks/utils.py``).

    >>> docs = generate("synth_docvqa", "eval", n=4, seed=0)
    >>> score("synth_docvqa", [d["answer"] for d in docs], docs)
    1.0
"""

from __future__ import annotations

from pathlib import Path

from analysis.twins.base import SPLITS, Scene, Twin, split_of
from analysis.twins.blind import blank_image
from analysis.twins.canvas import BAR, BLANK, CELL_VOCAB, CHARSET, GRID
from analysis.twins.chartqa import ChartQA, ChartQAHR
from analysis.twins.docvqa import DocVQA, DocVQAHR
from analysis.twins.ocrbench import OCRBench, OCRBenchHR
from analysis.twins.textvqa import TextVQA, TextVQAHR
from analysis.twins.video import VideoOrder

TWINS: dict[str, Twin] = {twin.name: twin for twin in (TextVQA(), DocVQA(), OCRBench(), ChartQA())}
HR_TWINS: dict[str, Twin] = {twin.name: twin for twin in (TextVQAHR(), DocVQAHR(), OCRBenchHR(), ChartQAHR())}
VIDEO_TWINS: dict[str, Twin] = {twin.name: twin for twin in (VideoOrder(),)}  # samples have frames, not an image
ALL_TWINS: dict[str, Twin] = {**TWINS, **HR_TWINS, **VIDEO_TWINS}
TASKS_DIR = Path(__file__).parent / "tasks"
GROUP = "synth_finegrained"
GROUP_HR = "synth_finegrained_hr"
DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "twins"  # where the task yamls read eval splits
EVAL_SEED = 1234
EVAL_SIZE = 200

__all__ = [
    "BAR",
    "BLANK",
    "CELL_VOCAB",
    "CHARSET",
    "DATA_DIR",
    "EVAL_SEED",
    "EVAL_SIZE",
    "GRID",
    "GROUP",
    "GROUP_HR",
    "HR_TWINS",
    "ALL_TWINS",
    "SPLITS",
    "TASKS_DIR",
    "TWINS",
    "VIDEO_TWINS",
    "Scene",
    "Twin",
    "blank_image",
    "doc_to_visual",
    "eval_docs",
    "generate",
    "get",
    "score",
    "split_of",
    "ensure_eval_data",
    "write_split",
]


def get(name: str) -> Twin:
    """The twin called ``name``; the error lists the known names."""
    if name not in ALL_TWINS:
        raise KeyError(f"unknown twin {name!r}; known: {sorted(ALL_TWINS)}")
    return ALL_TWINS[name]


def generate(name: str, split: str, n: int, seed: int, image_size: int | None = None, start: int = 0) -> list[dict]:
    """Samples ``start .. start+n-1`` of a twin's split: dicts with id, image (PIL RGB,
    image_size square, default the twin's: 64, or 128 for ``_hr``), question, answers (list[str]),
    answer (canonical str), cells (grid x grid
    list of the character drawn in each cell, "" for none, BAR for a chart bar) and the twin's
    own fields; a video twin's have frames, fps and block_cells instead of image and cells
    (``video.py``). Sample i is the same whatever ``n`` and ``start``."""
    twin = get(name)
    return [twin.sample(split, seed, i, image_size) for i in range(start, start + n)]


def write_split(name: str, split: str, n: int, seed: int, out_dir: str | Path = DATA_DIR,
                image_size: int | None = None) -> Path:
    """Generate ``n`` samples and write them to ``out_dir/<name>/<split>.parquet``; returns the path.
    A video twin's clips go to ``out_dir/<name>/videos/<id>.mp4``, named by the rows. Same arguments, same bytes."""
    from analysis.twins.parquet import write_parquet, write_video_parquet

    write = write_video_parquet if name in VIDEO_TWINS else write_parquet
    return write(generate(name, split, n, seed, image_size), Path(out_dir) / name / f"{split}.parquet")


def eval_docs(name: str, n: int | None = None) -> list[dict]:
    """The first ``n`` (None: all) docs of the twin's eval split as its lmms-eval task reads them: the rows of
    ``data/twins/<name>/eval.parquet`` (written first if missing); pictures as HF image dicts, clips as ``video``
    paths relative to the twin's folder."""
    import pyarrow.parquet as pq

    ensure_eval_data([name])
    table = pq.read_table(DATA_DIR / get(name).name / "eval.parquet")
    return table.slice(0, table.num_rows if n is None else n).to_pylist()


def doc_to_visual(name: str):
    """The twin's lmms-eval ``doc_to_visual``: ``[image]`` for a picture twin, ``[clip path]`` for a video twin."""
    from analysis.twins.tasks.utils import twin_doc_to_visual, video_doc_to_visual

    return video_doc_to_visual if get(name).name in VIDEO_TWINS else twin_doc_to_visual


def score(name: str, predictions: list[str], docs: list[dict]) -> float:
    """Mean metric of the twin in 0..1 for ``predictions`` (one string per doc), computed by the
    same process_results and aggregation as its lmms-eval task (predictions stripped, as there)."""
    from analysis.twins.tasks.utils import SCORING

    if len(predictions) != len(docs):
        raise ValueError(f"{len(predictions)} predictions for {len(docs)} docs")
    process_results, metric, aggregate = SCORING[get(name).name]
    return float(aggregate([process_results(doc, [str(p).strip()])[metric] for p, doc in zip(predictions, docs)]))


def ensure_eval_data(tasks) -> None:
    """Write the eval split of every twin among ``tasks`` whose parquet file is missing (a clean
    checkout ships the 64 px ones; the ``_hr`` ones and ``synth_video``'s clips are written on first use),
    under a lock so that parallel jobs write once."""
    from analysis.results import file_lock

    groups = {GROUP: list(TWINS), GROUP_HR: list(HR_TWINS)}
    for name in [member for task in tasks for member in groups.get(task, [task])]:
        if name in ALL_TWINS:
            path = DATA_DIR / name / "eval.parquet"
            if not path.exists():
                with file_lock(path.parent / ".write.lock"):
                    if not path.exists():
                        write_split(name, "eval", EVAL_SIZE, EVAL_SEED)
