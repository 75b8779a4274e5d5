"""The frozen-row norm cache of ``skip_attn_ffn`` (analysis/frozen_rows.py): bit for bit HF's own norm, used only
where the rows really are unchanged (one full normalisation per run of consecutive ablated layers, a fresh one after
Qwen3-VL's DeepStack injection, a full layer, a replaced or edited tensor, or under autograd), and never for a norm
that is not HF's plain RMSNorm."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import make_batch as llava_batch
from conftest import model_for as llava_model
from qwen_helpers import SAMPLE_SETS
from qwen_helpers import make_batch as qwen_batch
from qwen_helpers import model_for as qwen_model

from analysis import ablate, frozen_rows
from analysis.frozen_rows import FrozenRows, is_plain_rms_norm
from analysis.models import decoder_layers, vlm_core
from analysis.rows import gather_rows, select_rows


def _norm(dtype, D=48):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    norm = Qwen2RMSNorm(D, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
    return norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_norm_is_bit_for_bit_the_module(dtype):
    """Two samples (different text counts, so sample 1 has a filler slot); each "layer" returns a copy of its input
    with the text rows changed and the vision rows the same: the cached norm equals the module's every time."""
    g = torch.Generator().manual_seed(0)
    vision = torch.zeros(2, 10, dtype=torch.bool)
    vision[0, 2:7] = True
    vision[1, 1:8] = True
    rows, valid = select_rows(~vision)
    norm, cache = _norm(dtype), FrozenRows()
    h = (torch.randn(2, 10, 48, generator=g) * 3).to(dtype)
    with torch.no_grad():
        for _ in range(4):
            assert torch.equal(cache.input_norm(norm, h, rows, valid, gather_rows(h, rows)), norm(h))
            out = h.clone()
            out[~vision] += torch.randn(int((~vision).sum()), 48, generator=g).to(dtype)
            cache.returned(out)
            h = out
    assert cache.fresh == 1


def test_reuse_only_for_the_returned_unmodified_tensor():
    norm, cache = _norm(torch.float32), FrozenRows()
    g = torch.Generator().manual_seed(1)
    vision = torch.tensor([[False, True, True, False, True]])
    rows, valid = select_rows(~vision)
    h = torch.randn(1, 5, 48, generator=g)
    with torch.no_grad():
        cache.input_norm(norm, h, rows, valid, gather_rows(h, rows))
        out = h.clone()
        out[:, 0] += 1.0  # a text row changes, as in an ablated layer
        cache.returned(out)
        assert torch.equal(cache.input_norm(norm, out, rows, valid, gather_rows(out, rows)), norm(out))
        assert cache.fresh == 1  # reused: only the text rows were renormalised
        cache.returned(out)
        out[:, 1] += 1.0  # an in-place edit of a vision row (a user's hook): the version counter moves
        assert torch.equal(cache.input_norm(norm, out, rows, valid, gather_rows(out, rows)), norm(out))
        assert cache.fresh == 2
        cache.returned(out)
        other = out.clone()  # another tensor with the same values
        assert torch.equal(cache.input_norm(norm, other, rows, valid, gather_rows(other, rows)), norm(out))
        assert cache.fresh == 3
    out.requires_grad_(True)
    cache.returned(out)
    got = cache.input_norm(norm, out, rows, valid, gather_rows(out, rows))  # autograd: the module, differentiable
    assert got.grad_fn is not None and torch.equal(got, norm(out)) and cache.units is None


def test_only_hf_plain_rms_norm_qualifies():
    norm = _norm(torch.float32)
    assert is_plain_rms_norm(norm)
    for model in (llava_model("llava-llama"), llava_model("next-mistral-gqa"), qwen_model("qwen2_5_vl"),
                  qwen_model("qwen3_vl")):
        assert all(is_plain_rms_norm(layer.input_layernorm) for layer in decoder_layers(vlm_core(model)))

    class OnePlusWeight(type(norm)):  # Gemma's form: (1 + weight) * unit
        def forward(self, x):
            return (1 + self.weight) * frozen_rows.unit_rows(x, self.variance_epsilon)

    assert not is_plain_rms_norm(OnePlusWeight(48))
    handle = norm.register_forward_hook(lambda module, args, out: out * 2)
    assert not is_plain_rms_norm(norm)
    handle.remove()
    norm.forward = lambda x: x
    assert not is_plain_rms_norm(norm)


def _count_full_normalisations(monkeypatch, T):
    calls = []
    original = frozen_rows.unit_rows

    def counting(x, eps):
        if x.shape[1] == T:
            calls.append(x.shape)
        return original(x, eps)

    monkeypatch.setattr(frozen_rows, "unit_rows", counting)
    return calls


@contextlib.contextmanager
def _module_norms(model):
    """Force every input norm through the module (a hook makes it not plain): the uncached computation."""
    handles = [layer.input_layernorm.register_forward_hook(lambda module, args, out: None)
               for layer in decoder_layers(vlm_core(model))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _case(name, dtype):
    if name in ("qwen2_5_vl", "qwen3_vl"):
        model, batch = qwen_model(name), qwen_batch(name, SAMPLE_SETS["videos"], "left")
    else:
        model, batch = llava_model(name), llava_batch("llava_next" if name.startswith("next") else "llava")
    if dtype != torch.float32:
        import copy

        model = copy.deepcopy(model).to(dtype)
        batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    return model, batch


# (model, layers, full normalisations expected): one per run of consecutive ablated layers; Qwen3-VL's DeepStack
# adds to the vision rows after layers 0 and 1, so each of layers 0..2 starts afresh.
CASES = [
    ("llava-llama", range(1, 4), 1),
    ("llava-llama", [0, 1, 3], 2),
    ("next-mistral-gqa", range(0, 4), 1),
    ("qwen2_5_vl", range(0, 3), 1),
    ("qwen3_vl", range(0, 3), 3),
    ("qwen3_vl", [0, 2], 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,layers,fresh", CASES)
def test_skip_attn_ffn_with_the_cache_equals_without_bit_for_bit(monkeypatch, name, layers, fresh, dtype):
    model, batch = _case(name, dtype)
    T = batch["input_ids"].shape[1]
    with torch.no_grad():
        with _module_norms(model), ablate(model, "skip_attn_ffn", layers=layers):
            expected = model(**batch).logits
        calls = _count_full_normalisations(monkeypatch, T)
        with ablate(model, "skip_attn_ffn", layers=layers):
            got = model(**batch).logits
    assert len(calls) == fresh
    assert torch.equal(got, expected)


def test_inference_mode_runs_without_reuse(monkeypatch):
    """Inference tensors keep no version counter, so an in-place edit could not be seen: every layer starts afresh,
    with the same result."""
    model, batch = _case("qwen2_5_vl", torch.float32)
    with torch.no_grad(), ablate(model, "skip_attn_ffn", layers=range(0, 3)):
        expected = model(**batch).logits
    calls = _count_full_normalisations(monkeypatch, batch["input_ids"].shape[1])
    with torch.inference_mode(), ablate(model, "skip_attn_ffn", layers=range(0, 3)):
        got = model(**batch).logits
    assert len(calls) == 3 and torch.equal(got, expected)


def test_disabled_calls_the_module_in_every_layer(monkeypatch):
    """``frozen_rows.disabled()`` (the benchmark's control): every ablated layer normalises in full, same logits."""
    model, batch = _case("qwen2_5_vl", torch.float32)
    with torch.no_grad(), ablate(model, "skip_attn_ffn", layers=range(0, 3)):
        expected = model(**batch).logits
    calls = _count_full_normalisations(monkeypatch, batch["input_ids"].shape[1])
    with torch.no_grad(), frozen_rows.disabled(), ablate(model, "skip_attn_ffn", layers=range(0, 3)):
        got = model(**batch).logits
    assert calls == [] and torch.equal(got, expected)  # the module itself, not unit_rows
    with torch.no_grad(), ablate(model, "skip_attn_ffn", layers=range(0, 3)):
        model(**batch)
    assert len(calls) == 1  # enabled again after the block
