"""Trainable groups: exactly the intended parameters train, each at its learning rate."""

from __future__ import annotations

import pytest
import torch

from analysis import tiny
from analysis.proxyv import apply_proxyv
from analysis.training.groups import parameter_groups


def names(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_stage_recipes_train_exactly_their_groups(kind):
    model = apply_proxyv(tiny.build_model(kind, "llama", num_layers=4), start_layer=2, init="learned", seed=0)
    every = {n for n, _ in model.named_parameters()}
    tower = {n for n in every if ".vision_tower." in n}
    proxyv = {n for n in every if ".proxyv." in n}
    projector = {n for n in every if ".multi_modal_projector." in n or n.endswith("image_newline")}
    llm = every - tower - proxyv - projector
    assert proxyv and projector and tower and any(n.startswith("lm_head.") for n in llm)

    stage1 = parameter_groups(model, {"proxyv": 3e-4, "projector": 1e-3, "llm": None})
    assert [(g["name"], g["lr"]) for g in stage1] == [("proxyv", 3e-4), ("projector", 1e-3)]
    assert names(model, stage1[0]["params"]) == proxyv and names(model, stage1[1]["params"]) == projector
    assert {n for n, p in model.named_parameters() if p.requires_grad} == proxyv | projector

    stage2 = parameter_groups(model, {"proxyv": 4e-5, "projector": 4e-5, "llm": 4e-5})
    assert names(model, stage2[2]["params"]) == llm
    assert {n for n, p in model.named_parameters() if p.requires_grad} == every - tower

    # one optimizer step moves exactly the trained groups, each by its own learning rate (Adam: ~lr per entry)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(parameter_groups(model, {"proxyv": 1e-2, "projector": 1e-3, "llm": None}))
    loss = sum(p.float().pow(2).sum() for p in model.parameters() if p.requires_grad)
    loss.backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == proxyv | projector
    step = {n: (p - before[n]).abs().max().item() for n, p in model.named_parameters() if n in moved}
    assert all(abs(step[n] - 1e-2) < 1e-4 for n in proxyv if step[n] > 0)
    assert all(abs(step[n] - 1e-3) < 1e-5 for n in projector if step[n] > 0)


def test_recipes_must_be_explicit_and_complete():
    model = tiny.build_model("llava", "llama", num_layers=2)
    with pytest.raises(ValueError, match=r"missing \['llm'\]"):
        parameter_groups(model, {"proxyv": None, "projector": 1e-3})
    with pytest.raises(ValueError, match=r"no parameter in group\(s\) \['proxyv'\]"):
        parameter_groups(model, {"proxyv": 1e-4, "projector": 1e-3, "llm": None})
    with pytest.raises(ValueError, match=r"every group is frozen \(all learning rates None\)"):
        parameter_groups(model, {"proxyv": None, "projector": None, "llm": None})
    with pytest.raises(ValueError, match="must be a positive number or None"):
        parameter_groups(model, {"proxyv": None, "projector": 0, "llm": None})
    model.extra = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"parameter 'extra.weight' belongs to no trainable group"):
        parameter_groups(model, {"proxyv": None, "projector": 1e-3, "llm": None})
