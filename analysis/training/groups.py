"""Trainable parameter groups of the official ProxyV recipe: ``proxyv``, ``projector``, ``llm``, each with its own
learning rate (``None``: frozen), as optimizer parameter groups a transformers ``Trainer`` (or any torch
optimizer) takes.

    groups = parameter_groups(model, {"proxyv": 3e-4, "projector": 1e-3, "llm": None})   # stage 1
    groups = parameter_groups(model, {"proxyv": 4e-5, "projector": 4e-5, "llm": 4e-5})   # stage 2
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)

Which parameter is which (names of HF's LLaVA / LLaVA-NeXT classes, ``analysis.models.llava_core``):

* ``proxyv``: ``<core>.proxyv.*`` (the light MLPs, the learned-proxy initializer; :mod:`analysis.proxyv`);
* ``projector``: ``<core>.multi_modal_projector.*`` and LLaVA-NeXT's ``<core>.image_newline``;
* ``llm``: ``<core>.language_model.*`` and ``lm_head.*`` (the embeddings included);
* the vision tower is never trained here (frozen in both official stages).

Every parameter of the model is in exactly one group or in the tower; a parameter of an unknown module is an
error naming it, so a model with new parts cannot train them silently or silently leave them out.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..models import llava_core

GROUPS = ("proxyv", "projector", "llm")


def group_of(name: str, core_prefix: str) -> str | None:
    """The group of parameter ``name`` (full name in the model); ``None`` for the frozen vision tower."""
    local = name[len(core_prefix):] if core_prefix and name.startswith(core_prefix) else name
    if local.startswith("vision_tower."):
        return None
    if local.startswith("proxyv."):
        return "proxyv"
    if local.startswith("multi_modal_projector.") or local == "image_newline":
        return "projector"
    if local.startswith("language_model.") or name.startswith("lm_head."):
        return "llm"
    raise ValueError(f"parameter {name!r} belongs to no trainable group ({', '.join(GROUPS)}) nor the vision tower; "
                     "extend analysis.training.groups.group_of for it")


def parameter_groups(model, lrs: Mapping[str, float | None]) -> list[dict]:
    """Optimizer groups ``[{"name", "params", "lr"}]`` for the groups given a learning rate; every other parameter
    (frozen groups, the vision tower) gets ``requires_grad=False``. ``lrs`` must name every group of
    :data:`GROUPS` (``None`` to freeze one) so a stage's recipe is explicit."""
    missing, unknown = set(GROUPS) - set(lrs), set(lrs) - set(GROUPS)
    if missing or unknown:
        raise ValueError(f"learning rates must name exactly the groups {', '.join(GROUPS)} (None freezes one); "
                         f"missing {sorted(missing)}, unknown {sorted(unknown)}")
    if all(lr is None for lr in lrs.values()):
        raise ValueError("every group is frozen (all learning rates None): nothing would train")
    for group, lr in lrs.items():
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0):
            raise ValueError(f"learning rate of {group} must be a positive number or None, got {lr!r}")
    core = llava_core(model)
    prefix = next((f"{n}." for n, m in model.named_modules() if m is core and n), "")
    members: dict[str, list[torch.nn.Parameter]] = {g: [] for g in GROUPS}
    for name, param in model.named_parameters():
        group = group_of(name, prefix)
        trained = group is not None and lrs[group] is not None
        param.requires_grad_(trained)
        if trained:
            members[group].append(param)
    empty = [g for g in GROUPS if lrs[g] is not None and not members[g]]
    if empty:
        raise ValueError(f"no parameter in group(s) {empty} (a ProxyV group on a model without ProxyV?); give it None")
    return [{"name": g, "params": members[g], "lr": float(lrs[g])} for g in GROUPS if lrs[g] is not None]
