"""One job of a sweep: score a variant, against its baseline, and write its record.

``experiments/run.py`` (Hydra) calls :func:`run_one` once per job. A job:

1. **validates** its config (:func:`analysis.runner.spec.prepare`, one-line :class:`ConfigError`);
2. **skips** itself if a finished record with the same config hash exists in its sweep (its directory
   is named after the hash: one file lookup), or **reuses** one from another sweep under the same
   runs dir (copied, with ``reused_from``); an unreadable record is reported and recomputed;
3. **claims** the run: an exclusive lock on ``.<run>.lock`` beside its directory, held while it
   computes and released by the OS when the process ends (a crash or SIGKILL too), so two identical
   sweeps started together compute each run once -- the second waits, then finds the record;
4. gets the **baseline** of its (model, eval) pair: read when finished (no write access needed),
   else computed once under its own lock in ``run.baselines_dir``, shared by every sweep;
5. **scores** the variant through lmms-eval (:mod:`analysis.eval_bridge`), counts its decoder FLOPs
   per evaluated prompt (:func:`analysis.flops.mean_flops`; Qwen-VL: with its tower on each prompt's grids,
   :mod:`analysis.runner.counting`) and its prefill latency;
6. writes ``samples.jsonl`` and ``result.json`` atomically (:mod:`analysis.results`). Any exception in
   4-5 is recorded as a failed run and the sweep goes on.
"""

from __future__ import annotations

import logging
import shutil
import socket
import time
import traceback
from pathlib import Path

from .. import results
from ..eval_bridge import agreement, score_variant, session_for
from .counting import run_flops
from .spec import ConfigError, RunSpec, prepare, proxyv_field

log = logging.getLogger("analysis.runner")
logging.getLogger("numexpr").setLevel(logging.WARNING)  # "NumExpr defaulting to N threads" on every import

__all__ = ["ConfigError", "agreement", "finished_record", "run_one"]


# ----------------------------------------------------------------------------- records

def _provenance(spec: RunSpec) -> dict:
    commit, dirty = results.git_state()
    return {"seed": spec.seed, "git_commit": commit, "git_dirty": dirty, "versions": results.package_versions(),
            "hostname": socket.gethostname()}


def _record(spec: RunSpec, variant, **fields) -> dict:
    """A record with every pinned field (see :mod:`analysis.results`) and the variant's own."""
    return {
        "status": "ok", "error": None, "config_hash": spec.key, "sweep": spec.sweep_root.name,
        "model": spec.model_name, "model_path": spec.model.path, "op": variant.method, "layers": list(variant.layers),
        "start_layer": variant.start_layer, "end_layer": variant.end_layer, "num_layers": spec.num_layers,
        "eval": spec.eval_name, "tasks": list(spec.tasks), "limit": spec.limit, "blind": variant.blind,
        "proxyv": proxyv_field(variant), "variant": variant.to_record(), **fields, **_provenance(spec), "config": spec.cfg,
    }


def _scored(result, base_score: float | None, flops: dict, reference=None) -> dict:
    """The score fields of a record from an evaluation."""
    latency = result.latency or {}
    return dict(scores=result.scores, score=result.score,
                relative_score=1.0 if reference is None else (result.score / base_score if base_score else None),
                agreement=1.0 if reference is None else agreement(result.samples, reference),
                latency_ms=latency.get("median_ms"), latency=result.latency, flops=flops,
                n_samples=len(result.samples), n_per_task=result.n_per_task, lmms_scores=result.lmms_scores)


def finished_record(run_dir: Path, key: str) -> dict | None:
    """The finished (``ok``) record of ``key`` in ``run_dir``; an unreadable one is reported (and redone)."""
    record = results.read_record(run_dir)
    if record is None and (run_dir / results.RESULT_FILE).exists():
        log.warning("unreadable record %s: recomputing it", run_dir / results.RESULT_FILE)
    if record is not None and record.get("status") == "ok" and record.get("config_hash") == key:
        return record
    return None


def _reuse_from_other_sweep(spec: RunSpec) -> dict | None:
    """A finished record of the same config hash in another sweep under the runs dir, copied into this one."""
    for other in sorted(spec.sweep_root.parent.glob(f"*/{spec.run_name}")):
        if other.parent == spec.sweep_root:
            continue
        record = finished_record(other, spec.key)
        if record is not None:
            spec.run_dir.mkdir(parents=True, exist_ok=True)
            if (other / results.SAMPLES_FILE).exists():
                shutil.copyfile(other / results.SAMPLES_FILE, spec.run_dir / results.SAMPLES_FILE)
            record = {k: v for k, v in record.items() if k != "path"}
            results.write_record(spec.run_dir, {**record, "sweep": spec.sweep_root.name,
                                                "reused_from": str(other)})
            return results.read_record(spec.run_dir)
    return None


def _baseline(spec: RunSpec, session_factory) -> tuple[dict, list[dict]]:
    """The baseline record and samples of ``spec``'s (model, eval): read if finished, else computed once
    under a lock (a second process waits, then reads it)."""
    directory = spec.baseline_dir
    record = finished_record(directory, spec.baseline_key)
    if record is not None:
        return record, results.read_samples(directory)
    with results.file_lock(directory.parent / f".{directory.name}.lock"):
        record = finished_record(directory, spec.baseline_key)
        if record is not None:
            return record, results.read_samples(directory)
        log.info("computing the baseline of %s on %s", spec.base.name, spec.eval_name)
        started, t0 = results.now_iso(), time.perf_counter()
        variant = spec.baseline_variant
        session = session_factory(spec, spec.base)
        result = score_variant(spec, session, variant)
        flops = run_flops(session.lm.model.config, result.prompts, variant)
        record = _record(spec, variant, **_scored(result, None, flops), started_at=started,
                         finished_at=results.now_iso(), wall_time_s=time.perf_counter() - t0)
        record.update(config_hash=spec.baseline_key, model=spec.base.name, model_path=spec.base.path,
                      sweep="baselines", baseline=None, config={**spec.cfg, "model": spec.base.cfg, "op": {"name": "none"}})
        results.write_record(directory, record, result.samples)
        return results.read_record(directory), result.samples


def _baseline_ref(record: dict) -> dict:
    return {k: record.get(k) for k in ("score", "scores", "latency_ms", "config_hash", "path")}


# ----------------------------------------------------------------------------- one job

def run_one(cfg, session_factory=session_for) -> dict:
    """Run one job of a sweep (see the module docstring); returns its record. Raises only ConfigError."""
    spec = prepare(cfg)
    done = finished_record(spec.run_dir, spec.key)
    if done is not None:
        log.info("%s: finished before (%s)", spec.variant.label, spec.run_dir)
        return done
    try:
        lock = _claim_path(spec)
        with results.file_lock(lock):
            done = finished_record(spec.run_dir, spec.key) or _reuse_from_other_sweep(spec)
            if done is not None:
                log.info("%s: finished by another sweep (%s)", spec.variant.label, done.get("reused_from") or spec.run_dir)
                return done
            return _compute(spec, session_factory)
    except PermissionError as error:
        raise ConfigError(f"cannot write to {Path(error.filename or spec.sweep_root).parent}: permission denied; "
                          "make the runs dir writable or set run.runs_dir=/a/writable/dir") from None


def _claim_path(spec: RunSpec) -> Path:
    return spec.sweep_root / f".{spec.run_name}.lock"


def _compute(spec: RunSpec, session_factory) -> dict:
    started, t0 = results.now_iso(), time.perf_counter()
    variant = spec.variant
    try:
        base, base_samples = _baseline(spec, session_factory)
        if variant.is_baseline:
            fields = {k: base.get(k) for k in ("scores", "score", "latency_ms", "latency", "flops", "n_samples",
                                               "n_per_task", "lmms_scores")}
            fields.update(relative_score=1.0, agreement=1.0)
            samples = base_samples
        else:
            session = session_factory(spec, spec.model)
            result = score_variant(spec, session, variant)
            flops = run_flops(session.lm.model.config, result.prompts, variant)
            fields = _scored(result, base.get("score"), flops, reference=base_samples)
            samples = result.samples
        record = _record(spec, variant, **fields, baseline=_baseline_ref(base), started_at=started,
                         finished_at=results.now_iso(), wall_time_s=time.perf_counter() - t0)
        results.write_record(spec.run_dir, record, samples)
        log.info("%s", run_line(record))
    except PermissionError:
        raise
    except Exception as error:  # noqa: BLE001 -- a crashed run is recorded and the sweep goes on
        message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        record = _record(spec, variant, status="failed", error=message, traceback=traceback.format_exc(),
                         started_at=started, finished_at=results.now_iso(), wall_time_s=time.perf_counter() - t0)
        results.write_record(spec.run_dir, record)
        log.error("%s failed: %s (record: %s)", variant.label, message, spec.run_dir / results.RESULT_FILE)
    return results.read_record(spec.run_dir)


def run_line(record: dict) -> str:
    """The one line a finished run prints."""
    def fmt(value, pattern: str) -> str:
        return "n/a" if value is None else pattern.format(value)

    latency = record.get("latency") or {}
    spread = f" (IQR {latency['q3_ms'] - latency['q1_ms']:.1f})" if latency.get("q1_ms") is not None else ""
    label = (record.get("variant") or {}).get("label") or record.get("op")
    return (f"{label}: score {fmt(record.get('score'), '{:.3f}')} (relative {fmt(record.get('relative_score'), '{:.3f}')}"
            f", n={record.get('n_samples')}), FLOPs -{fmt((record.get('flops') or {}).get('reduction'), '{:.1%}')}, "
            f"prefill {fmt(record.get('latency_ms'), '{:.1f} ms')}{spread}, agreement "
            f"{fmt(record.get('agreement'), '{:.2f}')} [{record.get('wall_time_s', 0):.0f} s]")
