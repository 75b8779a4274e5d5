"""The bridge to lmms-eval: one loaded model per process (a :class:`Session`), and scoring a variant
through ``lmms_eval.evaluator.simple_evaluate`` with our model class (:class:`analysis.lmms_model.LlavaAblate`).

The runner calls :func:`session_for` (load once, reuse across the jobs of a sweep) and
:func:`score_variant` (per-task scores, per-sample rows, the prompts' token shapes for FLOPs, and
the prefill latency). lmms-eval's own progress bars and logs are silenced unless ``run.progress`` is
``"verbose"``.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

from .variant import Variant

log = logging.getLogger("analysis.eval_bridge")


@dataclass
class Session:
    """A loaded model wrapped for lmms-eval, and a TaskManager: built once per process, shared by its jobs."""

    lm: object
    task_manager: object


_SESSIONS: dict[tuple, Session] = {}


def session_for(spec, model) -> Session:
    """The session of ``model`` (a :class:`~analysis.runner.spec.ModelRef`: the variant's or the baseline's),
    loading it on first use. Two are kept: a ProxyV sweep alternates between the base model and checkpoints."""
    from .runner.spec import VISION_KEYS

    settings = spec.settings
    batch_size = int(settings.get("batch_size") or model.cfg.get("batch_size", 8))
    key = (model.path, settings.get("device"), model.cfg.get("dtype"), model.cfg.get("attn_implementation"),
           *(model.cfg.get(k) for k in VISION_KEYS), spec.include_path, spec.include_defaults)
    if key not in _SESSIONS:
        import torch

        threads = settings.get("threads")
        if threads:
            torch.set_num_threads(int(threads))
        from lmms_eval.tasks import TaskManager

        from transformers.utils import logging as hf_logging

        from .lmms_model import LlavaAblate

        if settings.get("progress") != "verbose":
            hf_logging.disable_progress_bar()  # "Loading weights" bars
        t0 = time.perf_counter()
        lm = LlavaAblate(model.path, batch_size=batch_size, device=settings.get("device"),
                         dtype=model.cfg.get("dtype", "auto"),
                         attn_implementation=model.cfg.get("attn_implementation", "sdpa"),
                         newline_tokens=model.cfg.get("newline_tokens", "vision"),
                         **{k: model.cfg.get(k) for k in VISION_KEYS},
                         progress=settings.get("progress") == "verbose")
        manager = TaskManager(verbosity="ERROR", include_path=spec.include_path,
                              include_defaults=spec.include_defaults)
        log.debug("loaded %s (%s) on %s in %.1f s", model.name, model.path, lm.device, time.perf_counter() - t0)
        while len(_SESSIONS) >= 2:
            _SESSIONS.pop(next(iter(_SESSIONS)))
        _SESSIONS[key] = Session(lm, manager)
    session = _SESSIONS.pop(key)
    _SESSIONS[key] = session  # most recently used last
    session.lm.batch_size_per_gpu = batch_size
    return session


@dataclass
class Scores:
    """What one evaluation of a variant produced."""

    scores: dict[str, float]  # task -> mean per-sample metric
    samples: list[dict]  # task, doc_id, prediction, target, score
    latency: dict | None  # see LlavaAblate.prefill_latency
    prompts: list[dict]  # per evaluated prompt: token mask and crop shapes (for FLOPs)
    lmms_scores: dict[str, float | None]  # lmms-eval's own aggregate, for cross-checking

    @property
    def score(self) -> float:
        return statistics.fmean(self.scores.values())

    @property
    def n_per_task(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.samples:
            counts[s["task"]] = counts.get(s["task"], 0) + 1
        return counts


def _sample_score(value) -> float:
    """A task's per-sample metric as a number (OCRBench-style metrics return a dict with ``score``)."""
    if isinstance(value, dict):
        value = value.get("score", value.get("value"))
    return float(value)


def score_variant(spec, session: Session, variant: Variant) -> Scores:
    """Score ``variant`` on ``spec``'s tasks through lmms-eval's simple_evaluate (``variant`` runs on the
    session's model: a trained variant's checkpoint is the session's model itself)."""
    from lmms_eval.evaluator import simple_evaluate

    from .twins import ensure_eval_data

    lm = session.lm
    lm.set_variant(variant)
    ensure_eval_data(spec.tasks)
    with _quiet_lmms(spec.settings.get("progress") != "verbose"):
        out = simple_evaluate(
            model=lm, tasks=list(spec.tasks), limit=spec.limit, task_manager=session.task_manager,
            bootstrap_iters=0, log_samples=True, verbosity="ERROR", random_seed=spec.seed,
            numpy_random_seed=spec.seed, torch_random_seed=spec.seed, process_docs_parallel=1,
        )
    samples, scores, lmms_scores = [], {}, {}
    for task, metric in spec.tasks.items():
        rows = out["samples"].get(task)
        if not rows:
            raise RuntimeError(f"lmms-eval returned no samples for task {task!r}")
        for row in sorted(rows, key=lambda r: r["doc_id"]):
            if metric not in row:
                raise KeyError(f"task {task}: metric {metric!r} not in its results (has: "
                               f"{sorted(k for k in row if k not in ('doc', 'arguments', 'resps'))})")
            prediction = row["filtered_resps"][0] if row.get("filtered_resps") else ""
            samples.append({"task": task, "doc_id": row["doc_id"], "prediction": str(prediction),
                            "target": row.get("target"), "score": _sample_score(row[metric])})
        scores[task] = statistics.fmean(s["score"] for s in samples if s["task"] == task)
        lmms_scores[task] = (out["results"].get(task) or {}).get(f"{metric},none")
    settings = spec.settings
    latency = lm.prefill_latency(prompts=int(settings.get("latency_prompts", 4)),
                                 repeats=int(settings.get("latency_repeats", 5)),
                                 warmup=int(settings.get("latency_warmup", 2)))
    return Scores(scores, samples, latency, list(lm.prompt_shapes), lmms_scores)


class _quiet_lmms:
    """Silence lmms-eval's loguru logger, its progress bars (bound as ``tqdm`` in its modules) and the
    ``datasets`` bars for the block; everything is put back on exit."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.undo: list = []

    def __enter__(self):
        if not self.quiet:
            return self
        import sys

        import datasets
        from loguru import logger
        from tqdm import tqdm

        logger.disable("lmms_eval")
        self.undo.append(lambda: logger.enable("lmms_eval"))
        if datasets.is_progress_bar_enabled():
            datasets.disable_progress_bars()
            self.undo.append(datasets.enable_progress_bars)
        silent = _silent(tqdm)
        for name, module in list(sys.modules.items()):
            if name.startswith("lmms_eval") and getattr(module, "tqdm", None) is tqdm:
                module.tqdm = silent
                self.undo.append(lambda module=module: setattr(module, "tqdm", tqdm))
        return self

    def __exit__(self, *exc):
        while self.undo:
            self.undo.pop()()
        return False


def _silent(tqdm_class):
    class Silent(tqdm_class):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


def agreement(samples: list[dict], reference: list[dict]) -> float | None:
    """Fraction of samples whose answer (stripped) equals the reference's for the same (task, doc_id)."""
    ref = {(s["task"], s["doc_id"]): str(s["prediction"]).strip() for s in reference}
    pairs = [(str(s["prediction"]).strip(), ref[(s["task"], s["doc_id"])]) for s in samples
             if (s["task"], s["doc_id"]) in ref]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None


def twin_prompt_shapes(lm, tasks, limit: int | None) -> list[dict]:
    """The prompt shapes (token masks and crops, as :func:`score_variant` records them for FLOPs) of the first
    ``limit`` eval docs of each synthetic twin in ``tasks`` (pictures or clips), without generating: what an
    evaluation of those docs counts."""
    from . import twins
    from .twins.tasks.utils import twin_doc_to_text

    lm.prompt_shapes.clear()
    for name in tasks:
        for doc in twins.eval_docs(name, limit or twins.EVAL_SIZE):
            visuals = lm._visuals(twins.doc_to_visual(name), doc)
            lm._record_prompt_shapes(lm.encode([lm._prompt(twin_doc_to_text(doc), visuals)], [visuals]))
    return list(lm.prompt_shapes)
