"""Token reduction: FastV and PyramidDrop, executed exactly as specified in docs/reduction.md.

    from analysis import ablate
    with ablate(model, "fastv", start_layer=3, keep=0.5):          # rank with layer 2, prune from layer 3
        model.generate(**batch)
    with ablate(model, "pdrop", layers=[8, 16, 24], keep=0.5):   # positions="renumber" (default) | "original"
        model(**batch)

Modules: :mod:`.counts` (how many vision tokens stay; torch-free, shared with FLOPs models),
:mod:`.ranking` (the last token's attention row), :mod:`.prune` (kept-row layout and masks),
:mod:`.runtime` (hooks, pruned layers, the per-stage cache book). Importing this package imports no torch.
"""

from __future__ import annotations

from .counts import fastv_kept, kept_per_stage, pdrop_kept

__all__ = ["fastv_kept", "kept_per_stage", "pdrop_kept", "reduction_context"]


def reduction_context(model, variant, newline_tokens: str = "vision"):
    """The context manager in which ``model`` computes the reduction ``variant`` (registered as this
    family's execution in :mod:`analysis.families`); it yields a :class:`.runtime.Reduction`."""
    if getattr(variant, "method", None) == "visionzip":
        from .visionzip import visionzip_context

        return visionzip_context(model, variant, newline_tokens=newline_tokens)
    from .runtime import reduction_context as context

    return context(model, variant, newline_tokens=newline_tokens)
