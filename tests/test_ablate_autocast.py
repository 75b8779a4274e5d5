"""Ops under mixed precision (the training recipes' bf16 autocast): every op runs forward and backward with an fp32
residual stream and half-precision matmul outputs, and stays close to its fp32 result."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_batch, model_for

from analysis.ablation import ablate
from analysis.ops import OPERATORS


@pytest.mark.parametrize("op", sorted(OPERATORS))
def test_op_trains_under_bf16_autocast(op):
    model = copy.deepcopy(model_for("llava-llama", "eager")).train()
    batch = dict(make_batch("llava"))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with ablate(model, op, start_layer=1):
        with torch.no_grad():
            reference = model(**batch).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**batch, labels=labels)
        out.loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(p.grad is not None for p in model.parameters())
    valid = batch["attention_mask"].bool()
    assert (out.logits.float()[valid] - reference[valid]).abs().max() < 0.1 * reference[valid].abs().max()
