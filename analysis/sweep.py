"""Sweep glue: the Hydra side of the main job.

* :func:`register_configs` -- the ``op`` config group, one option per registered variant method
  (:mod:`analysis.families`), and the ``variants`` sweeper;
* :func:`sweep_tag` -- the folder of an ad-hoc sweep (``runs/<model>-<eval>-<overrides>/``), so that it
  never lands in the main job's folder;
* :func:`check_overrides` -- an unknown group option is one line, before Hydra's multi-line error;
* :class:`VariantSweeper` -- Hydra's basic sweeper over a *union of grids* (the default sweep: five
  ops x eight start layers, plus ProxyV at every start layer the model has a trained checkpoint for),
  that validates every job before the first one runs, checks the runs dir can be written (reading
  finished records needs no write access), shows one progress bar, and writes the report at the end;
* :class:`SweepProgress` -- the Hydra callback that advances that bar.

Imports neither torch nor lmms-eval (the runner's spec, imported when a sweep starts, reads config.json
files through transformers).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback

from .config_groups import CONF_DIR, CONFIG_GROUPS, ConfigError, group_choices

__all__ = ["CONF_DIR", "ConfigError", "SweepProgress", "VariantSweeper", "check_overrides", "group_choices",
           "hydra_argv", "register_configs", "sweep_tag"]

log = logging.getLogger("analysis.sweep")
TRAINED = "trained"  # a grid's start_layer value: every start layer the model lists a trained checkpoint for


# ----------------------------------------------------------------------------- config groups

@dataclass
class VariantSweeperConf:
    _target_: str = "hydra_plugins.vision_redundancy.VariantSweeper"
    max_batch_size: int | None = None
    params: dict[str, str] | None = None
    grids: list[dict[str, Any]] = field(default_factory=list)


def register_configs() -> None:
    """Store the ``op`` group (from the variant registry) and the sweeper in Hydra's ConfigStore."""
    from .variant import family_of, methods

    store = ConfigStore.instance()
    for method in methods():
        store.store(group="op", name=method, node={"name": method, **family_of(method).methods()[method]})
    store.store(group="hydra/sweeper", name="variants", node=VariantSweeperConf)


register_configs()


def check_overrides(argv: list[str]) -> None:
    """Raise ConfigError (one line) for a command-line override that selects a config-group option
    that does not exist, e.g. ``op=skip_fn`` -> "unknown op 'skip_fn'; known: ...". Other overrides
    are left to Hydra and to the sweeper's validation of every job."""
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


def sweep_tag(argv: list[str]) -> str:
    """The suffix of an ad-hoc sweep's folder, from the overrides that change what is computed.

    ``python experiments/run.py`` -> "" (the main job: ``runs/tiny-synthetic``);
    ``-m op=skip_ffn start_layer=8,12,16`` -> "-op=skip_ffn-start_layer=8,12,16". ``model=`` and ``eval=``
    are already in the folder's name; ``run.*`` and ``hydra*`` change how, not what. The same command
    gives the same folder, so re-running it resumes."""
    def key(arg: str) -> str:
        return arg.split("=", 1)[0].lstrip("+~")

    parts = [a for a in argv if "=" in a and not a.startswith("-")
             and not key(a).startswith(("run.", "hydra")) and key(a) not in ("model", "eval")]
    if not parts:
        return ""
    text = "-".join(re.sub(r"[^A-Za-z0-9_.,=+-]", "_", p.lstrip("+~")) for p in parts)
    if len(text) > 80:
        text = f"{text[:60]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return f"-{text}"


def hydra_argv(argv: list[str]) -> list[str]:
    """The command line as Hydra should see it: ``op.<param>=`` becomes ``++op.<param>=`` (set or add), since in a
    sweep over ``op`` Hydra first composes the default op, which may not declare that parameter (each job's
    own op is checked: an op that does not take it is a one-line error); an ad-hoc sweep gets its folder tag."""
    out = [f"++{a}" if a.startswith("op.") and "=" in a else a for a in argv]
    tag = sweep_tag(argv)
    if tag and not any(a.lstrip("+").startswith(("run.sweep_name=", "run.sweep_tag=")) for a in argv):
        out.append(f"run.sweep_tag='{tag}'")
    return out


# ----------------------------------------------------------------------------- the sweeper

_PROGRESS: dict[str, Any] = {"bar": None}


def _writable(path: Path) -> bool:
    """Whether ``path`` can be written: it, or its nearest existing ancestor, allows writing."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return os.access(path, os.W_OK | os.X_OK)


def _quit(message: str) -> None:
    """End the sweep with one line (SystemExit passes Hydra's handler, which would print a traceback)."""
    raise SystemExit(f"error: {message}")


from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # noqa: E402 -- the sweeper it extends


class VariantSweeper(BasicSweeper):
    """Hydra's basic sweeper over a union of ``grids`` (each a basic-sweeper ``params`` mapping).

    A command-line sweep of any key a grid sets (e.g. ``op=...`` or ``start_layer=...``) replaces the grids:
    the user's sweep is exactly what they typed. Otherwise each grid is combined with the command line.
    A grid's ``start_layer: trained`` means every start layer its model lists a trained checkpoint for
    (none: the grid is left out, with a log line).
    """

    def __init__(self, max_batch_size: int | None = None, params: dict | None = None, grids=None) -> None:
        # Not BasicSweeper.__init__: Hydra re-executes its core plugin modules while scanning for plugins, so
        # that class's own `super(BasicSweeper, self)` names a newer class object than the one we extend.
        self.overrides = None
        self.batch_index = 0
        self.max_batch_size = max_batch_size
        self.params = params or {}
        self.hydra_context = self.config = self.launcher = None
        self.grids = [dict(g) for g in (grids or [])]

    # ------------------------------------------------------------ which jobs
    def _parse(self, overrides: list[str]):
        from hydra.core.override_parser.overrides_parser import OverridesParser

        return OverridesParser.create(config_loader=self.hydra_context.config_loader).parse_overrides(overrides)

    def _compose(self, job: list[str]):
        return self.hydra_context.config_loader.load_sweep_config(self.config, list(job))

    def job_overrides(self, arguments: list[str]) -> list[list[str]]:
        """Every job's overrides, in order, duplicates removed."""
        given = {o.get_key_element() for o in self._parse(list(arguments))}
        grids = [] if any(set(g) & given for g in self.grids) else self.grids
        jobs: list[list[str]] = []
        for grid in grids or [{}]:
            grid = self._expand(grid, arguments)
            if grid is None:
                continue
            params = [*self._parse_config(), *(f"{k}={v}" for k, v in grid.items()), *arguments]
            for batch in self.split_arguments(self._parse(params), None):
                jobs += [job for job in batch if job not in jobs]
        return jobs

    def _expand(self, grid: dict, arguments: list[str]) -> dict | None:
        """The grid with ``start_layer: trained`` replaced by the model's trained start layers."""
        if str(grid.get("start_layer")) != TRAINED:
            return grid
        from .variant import family_of

        base = self._compose([*arguments, *(f"{k}={v}" for k, v in grid.items() if k != "start_layer")])
        fam = family_of(str(base.op.name)).name
        starts = sorted(int(k) for k in (base.model.get(fam) or {}))
        if not starts:
            log.info("model %s lists no trained %s checkpoints: that part of the default sweep is left out",
                     base.model.name, fam)
            return None
        return {**grid, "start_layer": ",".join(map(str, starts))}

    # ------------------------------------------------------------ validation
    def validate(self, jobs: list[list[str]]) -> list:
        """Every job's RunSpec; the first bad one ends the sweep with one line naming the job and the fix."""
        from .runner.spec import prepare

        values: dict[str, set] = {}
        for job in jobs:
            for override in job:
                key, _, value = override.partition("=")
                values.setdefault(key, set()).add(value)
        swept = {key for key, seen in values.items() if len(seen) > 1}
        specs = []
        for job in jobs:
            try:
                specs.append(prepare(self._compose(job)))
            except ConfigError as error:
                shown = " ".join(o for o in job if o.partition("=")[0] in swept)
                _quit(f"{error}" + (f" [job {shown}]" if shown else ""))
        return specs

    def check_writable(self, specs: list) -> list:
        """The specs still to compute; ends the sweep with one line if their folders cannot be written."""
        from .runner.job import finished_record

        todo = [s for s in specs if finished_record(s.run_dir, s.key) is None]
        for spec in todo:
            for folder, what in ((spec.sweep_root, "runs dir"), (spec.baselines_dir, "baselines dir")):
                if not _writable(folder):
                    _quit(f"the {what} {folder} is not writable and {len(todo)} of {len(specs)} runs are not "
                          "finished; make it writable or set run.runs_dir=/a/writable/dir")
        return todo

    # ------------------------------------------------------------ the sweep
    def sweep(self, arguments: list[str]) -> Any:
        from omegaconf import OmegaConf

        t0 = time.perf_counter()
        jobs = self.job_overrides(list(arguments))
        specs = self.validate(jobs)
        if self.config.run.get("dry_run"):
            return self.plan(specs)
        todo = self.check_writable(specs)
        launch = [job for job, spec in zip(jobs, specs) if spec in todo]  # finished runs are not launched at all
        roots = list(dict.fromkeys(s.sweep_root for s in specs))
        run_cfg = self.config.run
        print(f"sweep: {len(jobs)} runs ({len(jobs) - len(todo)} finished before) -> "
              f"{', '.join(map(_shown, roots))}", file=sys.stderr)
        returns = []
        if todo:
            sweep_dir = Path(self.config.hydra.sweep.dir)
            sweep_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
            logging.getLogger("hydra._internal.core_plugins.basic_launcher").setLevel(logging.WARNING)
            in_process = "BasicLauncher" in type(self.launcher).__name__
            if in_process and run_cfg.get("progress", True):
                from tqdm.auto import tqdm

                _PROGRESS["bar"] = tqdm(total=len(launch), desc="sweep", unit="run", dynamic_ncols=True,
                                        file=sys.stderr, disable=None)  # a terminal only: logs stay plain lines
            try:
                returns = self._launch(launch)
            finally:
                bar, _PROGRESS["bar"] = _PROGRESS["bar"], None
                if bar is not None:
                    bar.close()
        if run_cfg.get("report", True):
            self._report(roots, Path(run_cfg.reports_dir))
        print(f"sweep: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        return returns

    @staticmethod
    def plan(specs: list) -> list:
        """``run.dry_run=true``: every run of the sweep (validated as for a real sweep), whether it is finished or
        would be computed, and each baseline it needs; nothing is evaluated or written."""
        from .runner.job import finished_record

        def state(directory: Path, key: str) -> str:
            return "finished" if finished_record(directory, key) is not None else "to run"

        states = [state(spec.run_dir, spec.key) for spec in specs]
        todo = states.count("to run")
        roots = ", ".join(map(_shown, dict.fromkeys(s.sweep_root for s in specs)))
        print(f"sweep (dry run): {len(specs)} runs, {len(specs) - todo} finished, {todo} to run -> {roots}")
        baselines = {}
        for spec, run_state in zip(specs, states):
            baselines.setdefault((spec.baseline_dir, spec.baseline_key), spec)
            print(f"  {run_state:<9} {spec.variant.label:<48} {_shown(spec.run_dir)}")
        for (directory, key), spec in baselines.items():
            print(f"  {state(directory, key):<9} {'baseline of ' + spec.base.name:<48} {_shown(directory)}")
        return []

    def _launch(self, jobs: list[list[str]]) -> list:
        returns, index = [], 0
        for batch in self.split_overrides_to_chunks(jobs, self.max_batch_size):
            results = self.launcher.launch(batch, initial_job_idx=index)
            for r in results:
                _ = r.return_value  # raises if the job raised
            index += len(batch)
            returns.append(results)
        return returns

    def _report(self, roots: list[Path], reports_dir: Path) -> None:
        from .report import write_report

        for root in roots:
            out = reports_dir / root.name
            if not _writable(out):
                log.warning("report not written: %s is not writable (set run.reports_dir=...)", out)
                continue
            print(f"sweep: report {_shown(write_report(root, out))}", file=sys.stderr)


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


class _AboveTheBar:
    """A stream for log handlers that writes its lines above the progress bar (tqdm.write), not through it."""

    def write(self, text: str) -> None:
        from tqdm.auto import tqdm

        if text.strip():
            tqdm.write(text.rstrip("\n"), file=sys.stderr)

    def flush(self) -> None:
        sys.stderr.flush()


class SweepProgress(Callback):
    """Advances the sweeper's progress bar as jobs end (jobs run in this process with the basic launcher),
    and prints each job's log lines above it."""

    def on_job_start(self, config, **kwargs) -> None:
        bar = _PROGRESS.get("bar")
        if bar is None or bar.disable:
            return
        for handler in logging.getLogger().handlers:  # Hydra configured them for this job just before
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setStream(_AboveTheBar())

    def on_job_end(self, config, job_return, **kwargs) -> None:
        bar = _PROGRESS.get("bar")
        if bar is not None and not bar.disable:
            bar.update(1)
