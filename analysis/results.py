"""Result records: the files a run leaves behind, and everything that reads them.

Each run directory holds two files, written atomically (temporary file + ``os.replace``), samples
first, so a ``result.json`` that exists is complete and its samples are there:

``result.json`` -- one record (schema version :data:`SCHEMA_VERSION`):

    ==================  ==========================================================================
    status              "ok" or "failed"; ``error`` (one line) and ``traceback`` when failed
    config_hash         hash of the resolved config that determines the result (:func:`config_hash`)
    sweep               sweep name (the directory under ``runs/`` and ``reports/``)
    model               model config name (e.g. "tiny"); ``model_path`` the checkpoint loaded
    op                  operator name ("none" for the baseline)
    variant             :meth:`analysis.variant.Variant.to_record`: family, method, layers, params, blind,
                        checkpoint, label, layer_text, start_layer, end_layer (older records lack it:
                        :func:`record_variant` builds it from op and layers)
    layers              ablated decoder-layer indices; ``start_layer`` / ``end_layer`` (exclusive)
    num_layers          decoder depth of the model
    eval                eval config name; ``tasks`` the lmms-eval tasks; ``limit``; ``blind``
    scores              task -> score in 0..1 (mean of the task metric over its samples)
    score               mean of ``scores``
    relative_score      score / baseline score of the same model and eval (null if that is 0)
    baseline            {"score", "scores", "latency_ms", "config_hash", "path"} of that baseline
    flops               {"total", "baseline", "reduction", "theoretical", "theoretical_baseline",
                        "theoretical_reduction", "lm_head", "vision", "per"}: language-model decoder
                        prefill FLOPs, mean per evaluated sample (``per`` says so); see analysis.flops
    latency_ms          median prefill wall time of one sample (batch 1) under the variant
    latency             {"median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "n", "warmup", "threads",
                        "load_1min", "cpus", "device"} of those timings (older records: latency_ms only, or no
                        device; :func:`record_latency` reads them all)
    agreement           fraction of answers identical to the baseline's (same task and doc)
    n_samples           evaluated samples, all tasks together; ``n_per_task``: task -> samples scored
    seed, git_commit, git_dirty, versions (package -> version), device, hostname
    started_at, finished_at (ISO 8601, UTC), wall_time_s
    config              the resolved run config
    ==================  ==========================================================================

``samples.jsonl`` -- one line per evaluated sample: ``task``, ``doc_id``, ``prediction``,
``target``, ``score`` (the task metric of that sample).

This module imports no torch: the report and the notebook read records through it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import math
import os
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

SCHEMA_VERSION = 1
RESULT_FILE = "result.json"
SAMPLES_FILE = "samples.jsonl"
REPO_ROOT = Path(__file__).resolve().parents[1]
VERSIONED_PACKAGES = ("torch", "transformers", "lmms_eval", "hydra-core", "vision-redundancy", "numpy", "datasets")
log = logging.getLogger("analysis.results")


# ----------------------------------------------------------------------------- writing

def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc), else set and restored."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part.

    The file gets the permissions of an ordinary new file (``0o666 & ~umask``), not mkstemp's 0600,
    so collaborators who share the runs and reports can read them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _jsonable(value):
    """JSON-safe copy: numpy scalars -> Python numbers, NaN/inf -> None, tuples -> lists."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_record(run_dir: str | Path, record: dict, samples: Iterable[dict] | None = None) -> Path:
    """Write ``samples.jsonl`` (if given) then ``result.json`` into ``run_dir``; returns the record's path."""
    run_dir = Path(run_dir)
    if samples is not None:
        lines = "".join(json.dumps(_jsonable(s), ensure_ascii=False) + "\n" for s in samples)
        atomic_write_text(run_dir / SAMPLES_FILE, lines)
    record = {"schema": SCHEMA_VERSION, **record}
    return atomic_write_text(run_dir / RESULT_FILE, json.dumps(_jsonable(record), indent=2, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- reading

def read_record(path: str | Path) -> dict | None:
    """The record in ``path`` (a result.json or its directory), with ``path`` added; None if unreadable."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULT_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    record["path"] = str(path)
    return record


def read_samples(run_dir: str | Path) -> list[dict]:
    """The per-sample rows beside a record (``[]`` if there are none)."""
    path = Path(run_dir)
    path = path / SAMPLES_FILE if path.is_dir() else path.with_name(SAMPLES_FILE)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def iter_records(root: str | Path, unreadable: list[Path] | None = None) -> Iterator[dict]:
    """Every readable record under ``root`` (recursively), in path order.

    A ``result.json`` that cannot be read (truncated, not JSON, not an object) is skipped with one
    warning naming it, and appended to ``unreadable`` when a list is given."""
    root = Path(root)
    if not root.exists():
        return
    for path in sorted(root.rglob(RESULT_FILE)):
        record = read_record(path)
        if record is None:
            _note_unreadable(path, unreadable)
        else:
            yield record


def _note_unreadable(path: Path, unreadable: list[Path] | None) -> None:
    log.warning("unreadable result record (skipped; a re-run recomputes it): %s", path)
    if unreadable is not None:
        unreadable.append(Path(path))


def load_records(*roots: str | Path, include_baselines: bool = True, dedupe: bool = True,
                 unreadable: list[Path] | None = None) -> list[dict]:
    """Records under ``roots``; one per ``config_hash`` (the latest finished), failed ones included.

    With ``include_baselines``, the baseline records the variants point to are added (as op "none")
    when no baseline of the same hash is among them, so a report always has its reference row.
    Unreadable files are warned about once each and appended to ``unreadable`` (see :func:`iter_records`).
    """
    bad: list[Path] = []
    records = [r for root in roots for r in iter_records(root, bad)]
    if include_baselines:
        records += _referenced_baselines(records, bad)
    if unreadable is not None:
        unreadable.extend(bad)
    if not dedupe:
        return records
    best: dict[str, dict] = {}
    for r in records:
        key = r.get("config_hash") or r["path"]
        old = best.get(key)
        # an ok record beats a failed one; among equals the later one wins
        rank = (r.get("status") == "ok", r.get("finished_at") or "")
        if old is None or rank >= (old.get("status") == "ok", old.get("finished_at") or ""):
            best[key] = r
    return sorted(best.values(), key=sort_key)


def _referenced_baselines(records: list[dict], bad: list[Path]) -> list[dict]:
    """The baseline records that ``records`` point to and do not contain (each read once)."""
    have = {r.get("config_hash") for r in records}
    tried, found = set(), []
    for r in records:
        base = r.get("baseline") or {}
        key = base.get("config_hash")
        if not key or key in have or key in tried or not base.get("path"):
            continue
        tried.add(key)
        where = _resolve(base["path"], r["path"])
        record = read_record(where)
        if record is not None:
            found.append(record)
        elif where.is_file() and where.resolve() not in {p.resolve() for p in bad}:
            _note_unreadable(where, bad)
    return found


def _resolve(path: str, relative_to: str) -> Path:
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return Path(relative_to).parent / p


def sort_key(record: dict):
    """Baseline first, then by op name, start layer, blind flag."""
    layers = record.get("layers") or []
    return (record.get("model") or "", record.get("eval") or "", record.get("op") != "none", record.get("op") or "",
            layers[0] if layers else -1, len(layers), bool(record.get("blind")))


# ----------------------------------------------------------------------------- identity and skipping

def canonical_json(value) -> str:
    return json.dumps(_jsonable(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_hash(identity: dict, length: int = 16) -> str:
    """Hex digest of a config's canonical JSON: equal configs, equal hashes, whatever the key order."""
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:length]


def weights_fingerprint(path: str | Path) -> str:
    """A cheap identity of a checkpoint directory: its config.json, and per weight file its name, size and 16
    blocks of 64 KiB read at evenly spaced offsets (retraining changes the weights everywhere, so two fine-tunes
    of one architecture differ even at equal sizes; moving or touching the directory changes nothing; a
    multi-GB checkpoint costs 1 MiB of reads per file)."""
    path = Path(path)
    if not path.is_dir():
        return str(path)
    digest = hashlib.sha256()
    config = path / "config.json"
    if config.exists():
        digest.update(config.read_bytes())
    for file in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt")):
        size = file.stat().st_size
        digest.update(f"\n{file.name}:{size}".encode())
        with open(file, "rb") as handle:
            for i in range(FINGERPRINT_BLOCKS):
                handle.seek(size * i // FINGERPRINT_BLOCKS)
                digest.update(handle.read(FINGERPRINT_BLOCK))
    return digest.hexdigest()[:16]


FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK = 16, 64 * 1024


@contextlib.contextmanager
def file_lock(path: str | Path):
    """An exclusive advisory lock on ``path`` (created if missing), released on exit or when the process dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- provenance

def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_state(repo: str | Path = REPO_ROOT) -> tuple[str | None, bool | None]:
    """(commit hash, whether the tracked tree has local changes); (None, None) outside a git checkout."""
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def package_versions(names: Iterable[str] = VERSIONED_PACKAGES) -> dict[str, str | None]:
    """Installed versions (``importlib.metadata``, nothing is imported), plus Python's."""
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# ----------------------------------------------------------------------------- fields of a record, old or new

# What decides which samples a run was scored on (with the baseline it is compared against, the
# report's group key: see analysis.report.group_records).
SAMPLE_FIELDS = ("model", "eval", "tasks", "limit", "blind", "seed")
NOISY_SPREAD = 0.25  # a latency whose interquartile range exceeds this share of its median is noisy


def sample_key(record: dict) -> tuple:
    """(model, eval, tasks (sorted), limit, blind, seed) of a record: runs that differ here scored other samples."""
    tasks = record.get("tasks")
    tasks = tuple(sorted(tasks)) if isinstance(tasks, (list, tuple, dict)) else tasks
    return (record.get("model"), record.get("eval"), tasks, record.get("limit"), bool(record.get("blind")),
            record.get("seed"))


def baseline_hash(record: dict) -> str | None:
    """The ``config_hash`` of the baseline record the relative score was computed against: ``baseline.config_hash``,
    or a baseline record's own hash; None when the record does not say (a failed run, an old record)."""
    ref = record.get("baseline")
    if isinstance(ref, dict) and ref.get("config_hash"):
        return ref["config_hash"]
    if record.get("op") == "none" and not ref:
        return record.get("config_hash")
    return None


def record_variant(record: dict) -> dict:
    """The record's ``variant`` field (:meth:`analysis.variant.Variant.to_record`); for records written before
    it existed, built from ``op``, ``layers``, ``blind`` (and a ProxyV run's ``proxyv`` settings)."""
    stored = record.get("variant")
    if isinstance(stored, dict) and stored.get("label"):
        return stored
    from .variant import Variant

    op = record.get("op") or "none"
    family = "proxyv" if op == "proxyv" else "ablation"
    params = _legacy_proxyv_params(record) if family == "proxyv" else {}
    return Variant(family, op, tuple(sorted(record.get("layers") or ())), tuple(sorted(params.items())),
                   bool(record.get("blind"))).to_record()


def _legacy_proxyv_params(record: dict) -> dict:
    from .variant import family

    settings = record.get("proxyv") or {}
    return {k: settings[k] for k in family("proxyv").methods()["proxyv"] if settings.get(k) is not None}


def record_latency(record: dict) -> dict:
    """Prefill latency of a record: ``median_ms``, ``q1_ms``, ``q3_ms``, ``n`` (timed forwards), ``load_1min``,
    ``cpus`` from its ``latency`` field (older records: ``latency_ms`` as the median, the rest None), and
    ``noisy``: the interquartile range exceeds :data:`NOISY_SPREAD` of the median, or the 1-minute load
    exceeded the CPU count (None when the record cannot tell); where the timings ran, so that a report compares
    only timings taken alike: ``host``, ``device``, ``threads`` (each None where the record does not say: older
    records lack the device) and ``timed_on``, those joined for display (None when there is none)."""
    stats = record.get("latency") if isinstance(record.get("latency"), dict) else {}
    median = stats.get("median_ms", record.get("latency_ms"))
    out = {"median_ms": median, **{k: stats.get(k) for k in ("q1_ms", "q3_ms", "n", "load_1min", "cpus")}}
    out["noisy"] = latency_is_noisy(median, out["q1_ms"], out["q3_ms"], out["load_1min"], out["cpus"])
    timed = median is not None
    out.update(host=record.get("hostname") if timed else None, device=stats.get("device") if timed else None,
               threads=stats.get("threads") if timed else None)
    threads = out["threads"]
    parts = [out["host"], out["device"], f"{threads} thread{'s' if threads != 1 else ''}" if threads else None]
    out["timed_on"] = " · ".join(str(p) for p in parts if p) or None
    return out


def latency_is_noisy(median, q1, q3, load_1min=None, cpus=None) -> bool | None:
    """True if (q3 - q1) / median > :data:`NOISY_SPREAD` or load_1min > cpus; None without a spread to judge."""
    if load_1min is not None and cpus and load_1min > cpus:
        return True
    if median is None or q1 is None or q3 is None or median <= 0:
        return None
    return (q3 - q1) / median > NOISY_SPREAD


def user_path(path: str | Path) -> Path:
    """A path as the user typed it: an absolute one as is; a relative one from where the user launched
    the program -- ``$PWD`` (the shell's directory, inherited by e.g. ``jupyter lab`` and its kernels,
    whose own working directory is the notebook's folder) when it names an existing directory, else
    the current working directory."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    launched = os.environ.get("PWD")
    base = Path(launched) if launched and Path(launched).is_dir() else Path.cwd()
    return base / path


# ----------------------------------------------------------------------------- tables

TABLE_COLUMNS = ("model", "eval", "op", "start_layer", "end_layer", "blind", "status", "score", "relative_score",
                 "gflops", "flops_reduction", "theoretical_reduction", "latency_ms", "agreement", "n_samples",
                 "label", "method", "family", "layer_text", "series", "tasks", "limit", "seed", "baseline_hash",
                 "n_per_task", "latency_q1_ms", "latency_q3_ms", "latency_n", "latency_noisy", "latency_timed_on",
                 "latency_host", "latency_device", "latency_threads", "finished_at", "checkpoint")


def records_table(records: list[dict]):
    """A pandas DataFrame, one row per record: :data:`TABLE_COLUMNS` (and ``num_layers``, ``config_hash``,
    ``error``, ``path``), then one ``score:<task>`` column per task.

    ``label`` / ``method`` / ``layer_text`` come from the record's variant (:func:`record_variant`);
    ``series`` is the label without its layers (the variant's line across start layers); ``latency_ms``
    is the median prefill time (:func:`record_latency`)."""
    import pandas as pd

    rows = [_table_row(r) for r in records]
    table = pd.DataFrame(rows, columns=None if rows else [*TABLE_COLUMNS, "num_layers", "config_hash", "error", "path"])
    for column in ("start_layer", "end_layer", "num_layers", "n_samples", "limit", "seed", "latency_n"):
        if column in table:
            table[column] = table[column].astype("Int64")
    return table


def _table_row(r: dict) -> dict:
    layers = r.get("layers") or []
    flops = r.get("flops") or {}
    variant = record_variant(r)
    latency = record_latency(r)
    label, text = variant["label"], variant["layer_text"]
    row = {
        "model": r.get("model"), "eval": r.get("eval"), "op": r.get("op"),
        "start_layer": layers[0] if layers else None, "end_layer": layers[-1] + 1 if layers else None,
        "blind": bool(r.get("blind")), "status": r.get("status"), "score": r.get("score"),
        "relative_score": r.get("relative_score"),
        "gflops": flops["total"] / 1e9 if flops.get("total") is not None else None,
        "flops_reduction": flops.get("reduction"),
        "theoretical_reduction": flops.get("theoretical_reduction"), "latency_ms": latency["median_ms"],
        "agreement": r.get("agreement"), "n_samples": r.get("n_samples"),
        "label": label, "method": variant["method"], "family": variant["family"], "layer_text": text,
        "checkpoint": variant.get("checkpoint"),
        "series": label.replace(f" L{text}", "", 1) if layers else label,
        "tasks": ",".join(sample_key(r)[2] or ()), "limit": r.get("limit"), "seed": r.get("seed"),
        "baseline_hash": baseline_hash(r), "n_per_task": r.get("n_per_task"),
        "latency_q1_ms": latency["q1_ms"], "latency_q3_ms": latency["q3_ms"], "latency_n": latency["n"],
        "latency_noisy": latency["noisy"], "latency_timed_on": latency["timed_on"], "latency_host": latency["host"],
        "latency_device": latency["device"], "latency_threads": latency["threads"], "finished_at": r.get("finished_at"),
        "num_layers": r.get("num_layers"), "config_hash": r.get("config_hash"), "error": r.get("error"),
        "path": r.get("path"),
    }
    for task, value in sorted((r.get("scores") or {}).items()):
        row[f"score:{task}"] = value
    return row
