"""lmms-eval hooks of the twin tasks: visuals, prompts, per-sample scoring and aggregation.

Scoring delegates to lmms-eval's own metric code for the real benchmarks, keeping only the
metric each twin reports: TextVQA accuracy (its ``submission`` output writes files and is
dropped), ANLS, OCRBench's containment test, ChartQA's relaxed accuracy; synth_video's exact
match (ignoring case) is lmms-eval's ``exact_match_hf_evaluate``. OCRBench's aggregator
is replaced: lmms-eval's divides by a fixed 1000 and accumulates in module state across runs.

Imported by file path from the yamls (``!function utils.x``) and as
``analysis.twins.tasks.utils`` by ``analysis.twins.score``: it must stay stateless.
"""

from __future__ import annotations

import io
from pathlib import Path
from statistics import mean

from lmms_eval.api.metrics import anls, exact_match_hf_evaluate
from lmms_eval.tasks.chartqa.utils import chartqa_process_results
from lmms_eval.tasks.ocrbench.utils import ocrbench_process_results
from lmms_eval.tasks.textvqa.utils import textvqa_process_results
from PIL import Image


def twin_doc_to_visual(doc: dict) -> list[Image.Image]:
    """The sample's image as a one-element RGB list (accepts PIL, HF image dicts or PNG bytes)."""
    image = doc["image"]
    if isinstance(image, dict):
        image = image["bytes"]
    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    return [image.convert("RGB")]


def video_doc_to_visual(doc: dict) -> list[str]:
    """The sample's clip as a one-element list holding its .mp4's absolute path, as lmms-eval's video tasks
    (VideoMME etc.) hand their videos to a model; ``doc["video"]`` is relative to data/twins/synth_video/."""
    path = Path(__file__).resolve().parents[3] / "data" / "twins" / "synth_video" / doc["video"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; write synth_video's clips with "
                                "`python experiments/make_twins.py --twins synth_video`")
    return [str(path)]


def twin_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question, with the optional pre/post prompts of the task yaml (empty by default)."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def textvqa_results(doc: dict, results: list[str]) -> dict:
    """{"exact_match": TextVQA accuracy in 0..1} (lmms-eval's code; it edits answers, so copy)."""
    doc = {**doc, "answers": list(doc["answers"])}
    return {"exact_match": textvqa_process_results(doc, results)["exact_match"]}


def docvqa_results(doc: dict, results: list[str]) -> dict:
    """{"anls": ANLS in 0..1} against the reference answers (lmms-eval's registry metric)."""
    return anls(references=list(doc["answers"]), predictions=results)


def ocrbench_results(doc: dict, results: list[str]) -> dict:
    """{"ocrbench_accuracy": {"score": 0 or 1, ...}} from lmms-eval's OCRBench code."""
    return ocrbench_process_results(doc, results)


def ocrbench_accuracy(items: list[dict]) -> float:
    """Fraction of samples whose answer is in the prediction (replaces lmms-eval's /1000 sum)."""
    return float(mean(item["score"] for item in items))


def chartqa_results(doc: dict, results: list[str]) -> dict:
    """{"relaxed_overall": 0 or 1}: ChartQA's relaxed accuracy (5% numeric tolerance)."""
    return {"relaxed_overall": chartqa_process_results(doc, results)["relaxed_overall"]}


def video_results(doc: dict, results: list[str]) -> dict:
    """{"exact_match": 0 or 1}: the prediction equals the answer, ignoring case and surrounding whitespace
    (lmms-eval's ``exact_match_hf_evaluate``)."""
    match = exact_match_hf_evaluate([results[0].strip()], [doc["answer"].strip()], ignore_case=True)
    return {"exact_match": float(match["exact_match"])}


# twin name -> (process_results, metric key, aggregation over that key's per-sample values)
SCORING = {
    "synth_textvqa": (textvqa_results, "exact_match", mean),
    "synth_docvqa": (docvqa_results, "anls", mean),
    "synth_ocrbench": (ocrbench_results, "ocrbench_accuracy", ocrbench_accuracy),
    "synth_chartqa": (chartqa_results, "relaxed_overall", mean),
}
# The high-resolution twins (128 px, read through LLaVA-NeXT's AnyRes crops) score as their 64 px originals.
SCORING.update({f"{name}_hr": scoring for name, scoring in list(SCORING.items())})
SCORING["synth_video"] = (video_results, "exact_match", mean)
