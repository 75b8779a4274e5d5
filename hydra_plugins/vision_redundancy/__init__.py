"""Hydra finds sweeper plugins only under the ``hydra_plugins`` namespace: this is where it finds ours.
The logic is :class:`analysis.sweep.VariantSweeper`; ``experiments/run.py`` puts the repo root on the path."""

from analysis.sweep import VariantSweeper as _VariantSweeper


class VariantSweeper(_VariantSweeper):
    """:class:`analysis.sweep.VariantSweeper`, at the module path Hydra accepts for plugins."""
