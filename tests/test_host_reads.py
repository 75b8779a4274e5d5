"""The operators' and ProxyV's decoder layers read nothing back to the host (analysis.host_reads): on a GPU one such
read per layer empties the launch queue, and a cheap layer then costs its Python time instead of its FLOPs."""

from __future__ import annotations

import copy

import pytest
import torch

from analysis import OPERATORS, ablate
from analysis.host_reads import HostRead, LayerReads, host_reads
from analysis.proxyv import apply_proxyv
from analysis.rows import scatter_add_rows, select_rows
from conftest import MODEL_SPECS, MULTI, make_batch, model_for
from qwen_helpers import make_batch as make_qwen_batch
from qwen_helpers import model_for as qwen_model_for

ACTIVE = sorted(set(OPERATORS) - {"none"})
# After Qwen3-VL's DeepStack layers (0, 1 in the tiny model): HF's own addition there indexes by a boolean mask.
START = {"qwen2_5_vl": 1, "qwen3_vl": 2, "llava": 1}


def test_recorder_names_each_kind_of_read_and_where():
    x = torch.tensor([1.0, -2.0, 3.0])
    with host_reads() as reads:
        bool(x.any())
        x[x > 0]
        x.nonzero()
        x.sum().item()
        x.index_select(0, torch.tensor([0, 2])) * 2  # index tensors, no read
    here = f"tests/test_host_reads.py:{test_recorder_names_each_kind_of_read_and_where.__code__.co_firstlineno + 3}"
    assert [r.op for r in reads] == ["aten._local_scalar_dense", "aten.index", "aten.nonzero",
                                     "aten._local_scalar_dense"]
    assert reads[0] == HostRead("aten._local_scalar_dense", here)


def _reads_in_layers(model, start: int, run) -> list[HostRead]:
    """Reads from layer ``start`` to the end of the language model during ``run()``, with a deliberate read after
    layer ``start`` to show the span records (it is removed from the result)."""
    lm = model.model.language_model
    spy = LayerReads(lm, lm.layers, start)

    def read(module, args, out):  # returns None: the layer's output stays
        bool(args[0].isnan().any())

    probe = lm.layers[start].register_forward_hook(read)
    try:
        run()
    finally:
        probe.remove()
        spy.remove()
    probes = [r for r in spy.reads if r.where.startswith("tests/test_host_reads.py")]
    assert len(probes) == 1, "the span did not record the probe's read"
    return [r for r in spy.reads if r not in probes]


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_operator_layers_read_nothing_back_qwen(kind):
    model = qwen_model_for(kind)
    batch = make_qwen_batch(kind)  # images and a multi-block video, left padding
    start = START[kind]
    for op in ACTIVE:
        def run():
            with torch.no_grad(), ablate(model, op, start_layer=start):
                model(**batch)
        assert _reads_in_layers(model, start, run) == [], op


@pytest.mark.parametrize("spec", sorted(MODEL_SPECS))
def test_operator_layers_read_nothing_back_llava(spec):
    model = model_for(spec)
    batch = make_batch(MODEL_SPECS[spec][0], MULTI)  # several images and a text-only sample: filler rows
    for op in ACTIVE:
        def run():
            with torch.no_grad(), ablate(model, op, start_layer=1):
                model(**batch)
        assert _reads_in_layers(model, 1, run) == [], op


@pytest.mark.parametrize("init", ["spatial", "learned"])
@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl", "llava"])
def test_proxyv_layers_read_nothing_back(kind, init):
    if kind == "llava":
        base, batch = model_for("llava-llama"), make_batch("llava", MULTI)
    else:
        base, batch = qwen_model_for(kind), make_qwen_batch(kind)
    learned = {"learned_proxies": 2} if init == "learned" and kind != "llava" else {}
    model = apply_proxyv(copy.deepcopy(base), START[kind], 2, init=init, seed=0, **learned)

    def run():
        with torch.no_grad():
            model(**batch)
    assert _reads_in_layers(model, START[kind], run) == []


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "llava"])
def test_pruned_layers_after_the_drop_read_nothing_back(kind):
    """FastV ranks and gathers at its drop layer (data-dependent by nature: reads there); the layers after it run
    on the kept rows under one mask, whose causal question is asked once, not in every layer."""
    if kind == "llava":
        model, batch = model_for("llava-llama"), make_batch("llava", MULTI[:1])  # batch 1: the mask is causal
    else:
        model, batch = qwen_model_for(kind), make_qwen_batch(kind)

    def run():
        with torch.no_grad(), ablate(model, "fastv", start_layer=1, keep=0.5):
            model(**batch)
    assert _reads_in_layers(model, 2, run) == []


def test_scatter_add_rows_leaves_filler_rows_exact():
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[True, False, True, True, False], [False, True, False, False, False]])
    rows, valid = select_rows(mask)  # sample 1 has one selected row and two filler slots
    update = torch.randn(2, rows.shape[1], 3)
    update[1, 2] = float("inf")  # a non-finite value computed on a filler row must not leak
    expected = x.clone()
    for b in range(2):
        for i, t in enumerate(mask[b].nonzero().flatten().tolist()):
            expected[b, t] += update[b, i]
    out = scatter_add_rows(x, rows, valid, update)
    assert torch.equal(out, expected)
    assert torch.equal(out[~mask], x[~mask])
