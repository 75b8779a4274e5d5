"""The main job's runs, in two steps: a composed config becomes a validated :class:`RunSpec` holding
one :class:`~analysis.variant.Variant` (:mod:`.spec`), and one job evaluates it, reuses or computes
its baseline and writes its record (:mod:`.job`). The Hydra side of a sweep is :mod:`analysis.sweep`;
lmms-eval is reached through :mod:`analysis.eval_bridge`.
"""

from .job import agreement, run_one
from .spec import ConfigError, ModelRef, RunSpec, prepare, resolve_weights

__all__ = ["ConfigError", "ModelRef", "RunSpec", "agreement", "prepare", "resolve_weights", "run_one"]
