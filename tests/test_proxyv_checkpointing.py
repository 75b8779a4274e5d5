"""HF gradient checkpointing on a ProxyV model: the ProxyV layers are recomputed in the backward pass, and
the gradients equal those of the same step without checkpointing (the proxies must flow layer to layer)."""

from __future__ import annotations

import copy

import pytest
import torch

from analysis.proxyv import apply_proxyv
from conftest import make_batch, model_for


def _grads(model, batch, labels):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("init", ["spatial", "learned", "none"])
@pytest.mark.parametrize("spec", ["llava-llama", "next-llama"])
def test_checkpointed_gradients_equal_plain_ones(spec, init):
    kind = "llava" if spec.startswith("llava") else "llava_next"
    model = apply_proxyv(copy.deepcopy(model_for(spec, "eager")), start_layer=1, init=init, seed=0).float().train()
    batch = dict(make_batch(kind))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    calls = []
    hooks = [g.register_forward_hook(lambda *_: calls.append(1)) for g in model.model.proxyv.layers.values()]

    loss, plain = _grads(model, batch, labels)
    plain_calls, calls[:] = len(calls), []
    model.activation_checkpointing_enable()
    try:
        loss_ckpt, checkpointed = _grads(model, batch, labels)
    finally:
        model.activation_checkpointing_disable()
        for hook in hooks:
            hook.remove()

    n_proxyv = len(model.model.proxyv.layers)
    assert plain_calls == n_proxyv
    assert len(calls) == 2 * n_proxyv  # every ProxyV layer ran again in the backward pass
    assert torch.equal(loss, loss_ckpt)
    assert plain.keys() == checkpointed.keys()
    assert any(name.startswith("model.proxyv") for name in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
