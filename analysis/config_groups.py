"""The main job's config tree: where it lives (``conf/``), its config groups and their options, and the one
error a bad config or override raises. Read by the runner's spec (:mod:`analysis.runner.spec`) and by the Hydra
side of a sweep (:mod:`analysis.sweep`), which sits above the runner: a module of its own so that the runner
does not import the sweep that calls it. Imports neither torch, lmms-eval nor Hydra."""

from __future__ import annotations

from .results import REPO_ROOT

CONF_DIR = REPO_ROOT / "conf"
CONFIG_GROUPS = {"model": "model", "op": "op", "eval": "eval", "hydra/launcher": "launcher"}
BUILTIN_CHOICES = {"hydra/launcher": ("basic",)}


class ConfigError(ValueError):
    """A bad config or override, found before any work; its message is one line that names the fix."""


def group_choices(group: str) -> list[str]:
    """The options of a config group: the registered methods for ``op``, else its YAML files under conf/."""
    if group == "op":
        from .variant import methods

        return sorted(methods())
    files = [p.stem for p in (CONF_DIR / group).glob("*.yaml")]
    return sorted({*files, *BUILTIN_CHOICES.get(group, ())})
