"""One run of the main job: load a LLaVA model, apply a variant, score it with lmms-eval, write the record.

``experiments/run.py`` (Hydra) calls :func:`run_one` once per job of a sweep. A run:

1. **validates** the config before any heavy work (:func:`prepare`): the op is known, the weights are
   there (the error says how to get them), the layers exist in this model; a bad config raises
   :class:`ConfigError`, which the entry script prints as one line;
2. **skips** itself if a finished record with the same config hash exists (its directory is named
   after the hash, so this is one file lookup): a re-run of a killed sweep recomputes nothing;
3. gets the **baseline** of its (model, eval) pair -- computed once under a file lock, stored in
   ``run.baselines_dir`` and reused by every later run and sweep;
4. **evaluates** the variant through ``lmms_eval.evaluator.simple_evaluate`` with our model class
   (:class:`analysis.lmms_model.LlavaAblate`) and a local TaskManager; one loaded model serves all
   jobs of a sweep in this process;
5. measures prefill **latency** (median, batch 1), **agreement** with the baseline's answers and the
   decoder **FLOPs** (:mod:`analysis.flops`; per evaluated sample, unpadded, batch 1 -- the prefill of
   each prompt as it is, independent of the evaluation batch size -- averaged over the samples);
6. writes ``samples.jsonl`` and ``result.json`` atomically (:mod:`analysis.results`). Any exception in
   3-5 is recorded as a failed run and the sweep goes on.
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import results

log = logging.getLogger("analysis.runner")
logging.getLogger("numexpr").setLevel(logging.WARNING)  # "NumExpr defaulting to N threads" on every import
REPO_ROOT = results.REPO_ROOT
CONF_DIR = REPO_ROOT / "conf"


class ConfigError(ValueError):
    """A bad config or override, found before any work; its message is one line that names the fix."""


# ----------------------------------------------------------------------------- the run spec

MODEL_IDENTITY_KEYS = ("name", "dtype", "attn_implementation", "newline_tokens")


@dataclass
class ModelRef:
    """A model config resolved to its weights: ``identity`` is what of it determines results."""

    name: str
    path: str
    cfg: dict

    @property
    def identity(self) -> dict:
        # The weights' fingerprint, not their path: moving a checkpoint keeps its results, retraining does not.
        return {**{k: self.cfg.get(k) for k in MODEL_IDENTITY_KEYS}, "weights": results.weights_fingerprint(self.path)}


@dataclass
class RunSpec:
    """Everything a run needs, validated: what is computed (hashed) and how (not hashed).

    ``model`` is what the variant runs on; ``base`` is the model of the baseline: the same, except for
    ProxyV, whose trained checkpoint is compared with the model it was made from.
    """

    cfg: dict
    model: ModelRef
    base: ModelRef
    num_layers: int
    op: str
    layers: tuple[int, ...]
    tasks: dict[str, str]  # lmms-eval task -> metric key of its per-sample result
    eval_name: str
    limit: int | None
    blind: bool
    seed: int
    sweep_root: Path
    baselines_dir: Path
    proxyv: dict | None = None  # ProxyV settings of the variant's checkpoint
    include_path: str | None = None
    include_defaults: bool = False
    settings: dict = field(default_factory=dict)  # the `run` group: batch size, device, progress...

    @property
    def model_name(self) -> str:
        return self.cfg["model"]["name"]

    @property
    def model_path(self) -> str:
        return self.model.path

    def identity(self, baseline: bool = False) -> dict:
        """What determines the result: eval, seed, model identity, op and layers (``run.*``, hydra and the
        spelling of the layers excluded)."""
        cfg = {k: v for k, v in self.cfg.items() if k not in ("run", "hydra", "start_layer", "end_layer", "op", "model")}
        if baseline:
            return {**cfg, "model": self.base.identity, "op": {"name": "none"}, "layers": []}
        return {**cfg, "model": self.model.identity, "op": dict(self.cfg["op"]), "layers": list(self.layers),
                **({"proxyv": self.proxyv} if self.proxyv else {})}

    @property
    def key(self) -> str:
        return results.config_hash(self.identity())

    @property
    def baseline_key(self) -> str:
        return results.config_hash(self.identity(baseline=True))

    @property
    def run_name(self) -> str:
        """The record's directory name: readable, and unique through the config hash."""
        where = f"_L{self.layers[0]}-{self.layers[-1] + 1}" if self.layers else ""
        return f"{self.op}{where}{'_blind' if self.blind else ''}_{self.key[:10]}"

    @property
    def run_dir(self) -> Path:
        return self.sweep_root / self.run_name

    @property
    def baseline_dir(self) -> Path:
        return self.baselines_dir / f"{self.base.name}-{self.eval_name}{'-blind' if self.blind else ''}_" \
                                    f"{self.baseline_key[:10]}"


def _resolve_path(path: str) -> Path | None:
    """An existing directory for ``path``: as given (absolute or from the working directory), else from the repo root."""
    for candidate in (Path(path).expanduser(), REPO_ROOT / path):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def resolve_weights(model: dict) -> str:
    """The local directory of the model's weights: ``model.pretrained`` as a directory, or that hub id
    in the HF cache (looked up offline). Raises ConfigError saying how to get them."""
    pretrained = str(model["pretrained"])
    found = _resolve_path(pretrained)
    if found is not None:
        if not (found / "config.json").exists():
            raise ConfigError(f"model {model['name']}: {found} has no config.json; "
                              "point model.pretrained at a save_pretrained() directory")
        return str(found)
    hub_id = model.get("hub_id")
    if hub_id and pretrained == hub_id:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return snapshot_download(hub_id, local_files_only=True)
        except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
            pass
    how = model.get("how_to_get") or (f"hf download {hub_id}" if hub_id else None)
    where = f"no directory {pretrained!r}" + (f" and {hub_id} is not in the HF cache" if hub_id else "")
    raise ConfigError(f"model {model['name']}: weights not found ({where}); get them with: {how}"
                      + (f" (~{model['download_gb']} GB)" if model.get("download_gb") else "")
                      + ", or set model.pretrained=/path/to/checkpoint")


def _int_or_none(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer or null, got {value!r}")
    return value


def prepare(cfg: DictConfig | dict) -> RunSpec:
    """Validate a composed config and resolve it into a :class:`RunSpec`; raises :class:`ConfigError`."""
    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    cfg.pop("hydra", None)
    run = cfg["run"]
    set_offline(run.get("offline", True))
    from .ops import OPERATORS

    op = cfg["op"]["name"]
    if op not in OPERATORS and op not in EXTRA_OPS:
        raise ConfigError(f"unknown op {op!r}; known ops: {', '.join(sorted([*OPERATORS, *EXTRA_OPS]))}")
    start, end = _int_or_none("start_layer", cfg.get("start_layer")), _int_or_none("end_layer", cfg.get("end_layer"))
    model = ModelRef(cfg["model"]["name"], resolve_weights(cfg["model"]), cfg["model"])
    base, hf_config = model, _hf_config(model)
    num_layers = hf_config.text_config.num_hidden_layers
    proxyv = getattr(hf_config, "proxyv", None)
    if proxyv:  # the model is itself a ProxyV checkpoint: compare it with the model it was made from
        if op not in ("none", "proxyv"):
            raise ConfigError(f"model {model.name} is a ProxyV checkpoint; run it with op=none (or op=proxyv), not {op}")
        base = _base_model(cfg["model"])
        op, start, end = "proxyv", proxyv["start_layer"], None
    elif op == "proxyv":  # op=proxyv start_layer=L: the model's trained ProxyV checkpoint for L
        model, proxyv = _proxyv_checkpoint(cfg["model"], start, end, num_layers)
    from .layers import resolve_layers

    blind = bool(cfg["eval"].get("blind", False))
    try:  # the same selection as LlavaAblate.set_variant, without importing lmms-eval for an early error
        identity_op = op != "proxyv" and OPERATORS[op]().is_identity
        layers = () if identity_op else tuple(resolve_layers(num_layers, None, start, end))
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{error} (model {cfg['model']['name']}; set start_layer / end_layer)") from None
    op = op if layers else "none"
    ev = cfg["eval"]
    tasks = ev["tasks"]
    if not isinstance(tasks, dict) or not tasks:
        raise ConfigError(f"eval {ev.get('name')}: `tasks` must map each lmms-eval task to its metric key")
    limit = ev.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ConfigError(f"eval.limit must be a positive integer (samples per task) or null, got {limit!r}")
    include = ev.get("include_path")
    if include and not Path(include).is_absolute():
        include = str(REPO_ROOT / include)
    runs_dir = Path(run["runs_dir"]).expanduser()
    return RunSpec(
        cfg=cfg, model=model, base=base, num_layers=num_layers, op=op, layers=layers, tasks=dict(tasks),
        eval_name=ev["name"], limit=limit, blind=blind, seed=int(cfg.get("seed", 0)),
        sweep_root=runs_dir / run["sweep_name"], baselines_dir=Path(run["baselines_dir"]).expanduser(),
        proxyv=dict(proxyv) if proxyv else None, include_path=include,
        include_defaults=bool(ev.get("include_defaults", False)), settings=run,
    )


# Variants that are not ablation operators: ProxyV runs a trained checkpoint (conf/op/proxyv.yaml).
EXTRA_OPS: tuple[str, ...] = ("proxyv",)


def _hf_config(model: ModelRef):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model.path)
        config.text_config.num_hidden_layers  # noqa: B018 -- a LLaVA config has a text config
        return config
    except (OSError, ValueError, AttributeError) as error:
        raise ConfigError(f"model {model.name}: cannot read {model.path}/config.json as a LLaVA config "
                          f"({str(error).splitlines()[0]})") from None


def _base_model(model_cfg: dict) -> ModelRef:
    """The model a ProxyV checkpoint was made from (``model.baseline_model``, a conf/model/ name)."""
    name = model_cfg.get("baseline_model")
    if not name:
        raise ConfigError(f"model {model_cfg['name']} is a ProxyV checkpoint: set model.baseline_model to the "
                          "conf/model/ name of the model it was made from (its baseline), e.g. tiny")
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"model.baseline_model={name!r} is not a model config; known: "
                          f"{', '.join(group_choices('model'))}")
    base_cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return ModelRef(base_cfg["name"], resolve_weights(base_cfg), base_cfg)


def _proxyv_checkpoint(model_cfg: dict, start: int | None, end: int | None, num_layers: int):
    """(ModelRef, settings) of the trained ProxyV checkpoint listed for ``start`` in ``model.proxyv``."""
    available = {int(k): v for k, v in (model_cfg.get("proxyv") or {}).items()}
    if end is not None and end != num_layers:
        raise ConfigError(f"op=proxyv runs from start_layer through the last layer; drop end_layer={end}")
    if start not in available:
        listed = ", ".join(map(str, sorted(available))) or "none"
        raise ConfigError(f"model {model_cfg['name']} has no trained ProxyV checkpoint for start_layer={start} "
                          f"(listed in model.proxyv: {listed}); train one with experiments/train_tiny.py's "
                          f"ProxyV variant and add it to conf/model/{model_cfg['name']}.yaml")
    ref = ModelRef(model_cfg["name"], resolve_weights({**model_cfg, "pretrained": available[start], "hub_id": None}),
                   model_cfg)
    settings = getattr(_hf_config(ref), "proxyv", None)
    if not settings or settings.get("start_layer") != start:
        raise ConfigError(f"{ref.path} is not a ProxyV checkpoint starting at layer {start} "
                          f"(its config.json has proxyv={settings})")
    return ref, settings


def set_offline(offline: bool) -> None:
    """No network for HF hub and datasets (read from the local cache only), unless ``run.offline=false``."""
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ----------------------------------------------------------------------------- sessions

_SESSIONS: dict[tuple, "Session"] = {}


@dataclass
class Session:
    """A loaded model wrapped for lmms-eval, and a TaskManager: built once per process, shared by its jobs."""

    lm: object
    task_manager: object


def session_for(spec: RunSpec, model: ModelRef) -> Session:
    """The session of ``model`` (the variant's or the baseline's), loading it on first use. Two are kept:
    a ProxyV sweep alternates between the base model (baseline) and ProxyV checkpoints."""
    settings = spec.settings
    batch_size = int(settings.get("batch_size") or model.cfg.get("batch_size", 8))
    key = (model.path, settings.get("device"), model.cfg.get("dtype"), model.cfg.get("attn_implementation"),
           spec.include_path, spec.include_defaults)
    if key not in _SESSIONS:
        import torch

        if settings.get("threads"):
            torch.set_num_threads(int(settings["threads"]))
        from lmms_eval.tasks import TaskManager

        from .lmms_model import LlavaAblate

        t0 = time.perf_counter()
        lm = LlavaAblate(model.path, batch_size=batch_size, device=settings.get("device"),
                         dtype=model.cfg.get("dtype", "auto"), attn_implementation=model.cfg.get("attn_implementation",
                                                                                                 "sdpa"),
                         newline_tokens=model.cfg.get("newline_tokens", "vision"),
                         progress=settings.get("progress", True))
        manager = TaskManager(verbosity="WARNING", include_path=spec.include_path,
                              include_defaults=spec.include_defaults)
        log.info("loaded %s (%s) on %s in %.1f s", model.name, model.path, lm.device, time.perf_counter() - t0)
        while len(_SESSIONS) >= 2:
            _SESSIONS.pop(next(iter(_SESSIONS)))
        _SESSIONS[key] = Session(lm, manager)
    session = _SESSIONS.pop(key)
    _SESSIONS[key] = session  # most recently used last
    session.lm.batch_size_per_gpu = batch_size
    return session


def ensure_twin_data(tasks) -> None:
    """Write the eval split of every synthetic twin among ``tasks`` whose parquet file is missing."""
    from . import twins

    for name in tasks:
        if name in twins.TWINS:
            path = twins.DATA_DIR / name / "eval.parquet"
            if not path.exists():
                with results.file_lock(path.parent / ".write.lock"):
                    if not path.exists():
                        log.info("writing the eval split of %s (%d samples)", name, twins.EVAL_SIZE)
                        twins.write_split(name, "eval", twins.EVAL_SIZE, twins.EVAL_SEED)


# ----------------------------------------------------------------------------- evaluation

@dataclass
class Evaluation:
    scores: dict[str, float]
    samples: list[dict]
    latency_ms: float | None
    layouts: list[dict]
    lmms_scores: dict[str, float | None]

    @property
    def score(self) -> float:
        return statistics.fmean(self.scores.values())


def _sample_score(value) -> float:
    """A task's per-sample metric as a number (OCRBench-style metrics return a dict with ``score``)."""
    if isinstance(value, dict):
        value = value.get("score", value.get("value"))
    return float(value)


def evaluate(spec: RunSpec, session: Session, baseline: bool = False) -> Evaluation:
    """Score the variant of ``spec`` (or its baseline) on its tasks through lmms-eval's simple_evaluate."""
    from lmms_eval.evaluator import simple_evaluate

    lm = session.lm
    ablated = not baseline and spec.op not in EXTRA_OPS  # a ProxyV checkpoint is its own variant
    lm.set_variant(spec.op if ablated else "none", layers=list(spec.layers) if ablated else None, blind=spec.blind)
    ensure_twin_data(spec.tasks)
    out = simple_evaluate(
        model=lm, tasks=list(spec.tasks), limit=spec.limit, task_manager=session.task_manager, bootstrap_iters=0,
        log_samples=True, verbosity="WARNING", random_seed=spec.seed, numpy_random_seed=spec.seed,
        torch_random_seed=spec.seed, process_docs_parallel=1,
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
        task_scores = [s["score"] for s in samples if s["task"] == task]
        scores[task] = statistics.fmean(task_scores)
        lmms_scores[task] = (out["results"].get(task) or {}).get(f"{metric},none")
    latency = lm.prefill_latency_ms(n=int(spec.settings.get("latency_samples", 4)))
    return Evaluation(scores, samples, latency, list(lm.token_layouts), lmms_scores)


def agreement(samples: list[dict], reference: list[dict]) -> float | None:
    """Fraction of samples whose answer (stripped) equals the reference's for the same (task, doc_id)."""
    ref = {(s["task"], s["doc_id"]): str(s["prediction"]).strip() for s in reference}
    pairs = [(str(s["prediction"]).strip(), ref[(s["task"], s["doc_id"])]) for s in samples
             if (s["task"], s["doc_id"]) in ref]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None


def mean_flops(model_config, layouts: list[dict], op: str, layers, proxyv: dict | None = None) -> dict:
    """Decoder prefill FLOPs of ``op`` on ``layers`` and of the baseline, mean per evaluated sample.

    Each sample counts as its own unpadded batch-1 prefill (``lm_head="last"``, as ``generate()``), so
    the figures do not depend on the evaluation batch size. See :mod:`analysis.flops` for conventions.
    ``proxyv``: the settings of a ProxyV checkpoint (``op="proxyv"``), passed to its FLOPs variant.
    """
    import torch

    from .flops import TokenLayout, count_flops

    if not layouts:
        return {}
    options = {}
    if op == "proxyv":
        options = {k: v for k, v in (proxyv or {}).items() if k not in ("start_layer", "format")}
    totals: Counter = Counter()
    # ProxyVShapes is a frozen dataclass of tuples: hashable, so samples of one shape still count once
    groups = Counter((lay["mask"], lay["crop_shapes"], lay.get("proxyv_shapes")) for lay in layouts)
    for (mask, crops, shapes), n in groups.items():
        vision = torch.tensor([[c == "v" for c in mask]])
        layout = TokenLayout(vision, torch.ones_like(vision), (crops,))
        extra = {"shapes": shapes} if op == "proxyv" and shapes is not None else {}
        report = count_flops(model_config, layout, op, list(layers) or None, lm_head="last", **options, **extra)
        totals.update({"total": n * report.total, "baseline": n * report.baseline,
                       "theoretical": n * report.theoretical, "theoretical_baseline": n * report.theoretical_baseline,
                       "lm_head": n * report.lm_head, "vision": n * (report.vision or 0)})
    count = len(layouts)
    flops = {k: v / count for k, v in totals.items()}
    flops["reduction"] = (flops["baseline"] - flops["total"]) / flops["baseline"]
    flops["theoretical_reduction"] = (flops["theoretical_baseline"] - flops["theoretical"]) / flops["theoretical_baseline"]
    flops["per"] = "LM decoder prefill FLOPs, mean per evaluated sample (unpadded, batch 1)"
    return flops


# ----------------------------------------------------------------------------- records

def _provenance(spec: RunSpec) -> dict:
    commit, dirty = results.git_state()
    return {"seed": spec.seed, "git_commit": commit, "git_dirty": dirty, "versions": results.package_versions(),
            "hostname": socket.gethostname()}


def _record(spec: RunSpec, **fields) -> dict:
    return {
        "status": "ok", "error": None, "config_hash": spec.key, "sweep": spec.sweep_root.name,
        "model": spec.model_name, "model_path": spec.model_path, "op": spec.op, "layers": list(spec.layers),
        "start_layer": spec.layers[0] if spec.layers else None,
        "end_layer": spec.layers[-1] + 1 if spec.layers else None, "num_layers": spec.num_layers,
        "eval": spec.eval_name, "tasks": list(spec.tasks), "limit": spec.limit, "blind": spec.blind,
        "proxyv": spec.proxyv, **fields, **_provenance(spec), "config": spec.cfg,
    }


def _baseline(spec: RunSpec, session_factory) -> tuple[dict, list[dict]]:
    """The baseline record and samples of ``spec``'s (model, eval): read, or computed once under a lock."""
    directory = spec.baseline_dir
    with results.file_lock(directory.parent / f".{directory.name}.lock"):
        record = results.read_record(directory)
        if record is not None and record.get("status") == "ok":
            return record, results.read_samples(directory)
        log.info("computing the baseline of %s on %s", spec.base.name, spec.eval_name)
        started, t0 = results.now_iso(), time.perf_counter()
        session = session_factory(spec, spec.base)
        result = evaluate(spec, session, baseline=True)
        flops = mean_flops(session.lm.model.config, result.layouts, "none", [])
        record = _record(spec, scores=result.scores, score=result.score, relative_score=1.0, agreement=1.0,
                         latency_ms=result.latency_ms, flops=flops, n_samples=len(result.samples),
                         lmms_scores=result.lmms_scores, started_at=started, finished_at=results.now_iso(),
                         wall_time_s=time.perf_counter() - t0)
        record.update(op="none", layers=[], start_layer=None, end_layer=None, config_hash=spec.baseline_key,
                      model=spec.base.name, model_path=spec.base.path, proxyv=None, sweep="baselines", baseline=None,
                      config={**spec.cfg, "model": spec.base.cfg, "op": {"name": "none"}})
        results.write_record(directory, record, result.samples)
        return results.read_record(directory), result.samples


def _baseline_ref(record: dict) -> dict:
    return {k: record.get(k) for k in ("score", "scores", "latency_ms", "config_hash", "path")}


def run_one(cfg: DictConfig | dict, session_factory=session_for) -> dict:
    """Run one job of a sweep (see the module docstring); returns its record. Raises only ConfigError."""
    spec = prepare(cfg)
    label = f"{spec.op}" + (f" L{spec.layers[0]}-{spec.layers[-1] + 1}" if spec.layers else "") + \
            (" blind" if spec.blind else "")
    mark_sweep(spec.sweep_root)
    done = results.read_record(spec.run_dir)
    if done is not None and done.get("status") == "ok" and done.get("config_hash") == spec.key:
        log.info("skip %s: finished before (%s)", label, spec.run_dir)
        return done
    started, t0 = results.now_iso(), time.perf_counter()
    try:
        base, base_samples = _baseline(spec, session_factory)
        if spec.op == "none":
            record = {k: base[k] for k in ("scores", "score", "latency_ms", "flops", "n_samples", "lmms_scores")}
            record.update(relative_score=1.0, agreement=1.0)
            samples = base_samples
        else:
            session = session_factory(spec, spec.model)
            result = evaluate(spec, session)
            relative = result.score / base["score"] if base.get("score") else None
            record = dict(scores=result.scores, score=result.score, relative_score=relative,
                          agreement=agreement(result.samples, base_samples), latency_ms=result.latency_ms,
                          flops=mean_flops(session.lm.model.config, result.layouts, spec.op, spec.layers, spec.proxyv),
                          n_samples=len(result.samples), lmms_scores=result.lmms_scores)
            samples = result.samples
        record = _record(spec, **record, baseline=_baseline_ref(base), started_at=started,
                         finished_at=results.now_iso(), wall_time_s=time.perf_counter() - t0)
        results.write_record(spec.run_dir, record, samples)
        log.info("%s: score %.3f (relative %s), FLOPs -%s, prefill %s, agreement %s [%.0f s]", label,
                 record["score"], _fmt(record["relative_score"], "{:.3f}"),
                 _fmt((record["flops"] or {}).get("reduction"), "{:.1%}"), _fmt(record["latency_ms"], "{:.1f} ms"),
                 _fmt(record["agreement"], "{:.2f}"), record["wall_time_s"])
    except Exception as error:  # noqa: BLE001 -- a crashed run is recorded and the sweep goes on
        message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        record = _record(spec, status="failed", error=message, traceback=traceback.format_exc(),
                         started_at=started, finished_at=results.now_iso(), wall_time_s=time.perf_counter() - t0)
        results.write_record(spec.run_dir, record)
        log.error("%s failed: %s (record: %s)", label, message, spec.run_dir / results.RESULT_FILE)
    return results.read_record(spec.run_dir)


def _fmt(value, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


# ----------------------------------------------------------------------------- sweep bookkeeping

SWEEP_MARKS = "sweep_roots.txt"


def mark_sweep(root: Path) -> None:
    """Note ``root`` in the Hydra sweep directory, so the end-of-sweep report finds every sweep touched."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_sweep = Path(HydraConfig.get().sweep.dir)
    except (ImportError, ValueError):
        return
    marks = hydra_sweep / SWEEP_MARKS
    marks.parent.mkdir(parents=True, exist_ok=True)
    with open(marks, "a") as handle:  # O_APPEND: concurrent jobs add whole lines
        handle.write(f"{Path(root).resolve()}\n")


# ----------------------------------------------------------------------------- command-line checks

CONFIG_GROUPS = {"model": "model", "op": "op", "eval": "eval", "hydra/launcher": "launcher"}
BUILTIN_CHOICES = {"hydra/launcher": ("basic",)}


def group_choices(group: str) -> list[str]:
    """The options of a config group: its YAML files under conf/ (plus Hydra's built-ins)."""
    files = [p.stem for p in (CONF_DIR / group).glob("*.yaml")]
    return sorted({*files, *BUILTIN_CHOICES.get(group, ())})


def check_overrides(argv: list[str]) -> None:
    """Raise ConfigError (one line) for a command-line override that selects a config-group option
    that does not exist, e.g. ``op=skip_fn`` -> "unknown op 'skip_fn'; known: ...". Other overrides
    are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    candidates = [a for a in argv if not a.startswith("-") and "=" in a and a.split("=", 1)[0] in CONFIG_GROUPS]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except HydraException as error:
        raise ConfigError(str(error).strip().splitlines()[0]) from None
    for override in overrides:
        group = override.key_or_group
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() \
            else [override.get_value_element_as_str()]
        known = group_choices(group)
        for value in values:
            if value not in known:
                raise ConfigError(f"unknown {CONFIG_GROUPS[group]} {value!r}; known: {', '.join(known)}")
