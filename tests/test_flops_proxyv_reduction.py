"""FLOPs of token reduction on a ProxyV model (analysis.flops.proxyv_reduction) == torch's counter on the real
forward, layer by layer; and its refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import MULTI, PAIR
from test_proxyv import batch_of, build

from analysis import ablate
from analysis.flops import PrefillTokens, TextDims
from analysis.flops.measure import torch_flop_counter
from analysis.flops.proxyv_reduction import ProxyVReductionFlops

L = 3
CASES = [("fastv", {"start_layer": 2, "keep": 0.5}, [2, 3]), ("fastv", {"start_layer": 3, "keep": 0.3}, [3]),
         ("pdrop", {"layers": [1, 3], "keep": 0.5}, [1, 3])]


def counted(model, method, where, layers):
    settings = model.config.proxyv
    stages = list(range(layers[0], 4)) if method == "fastv" else layers
    return ProxyVReductionFlops(method, stages, where["keep"], settings)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("samples", [PAIR[:1], PAIR, MULTI], ids=["one", "padded", "multi-and-text-only"])
def test_analytic_equals_torch_counter_layer_by_layer(attn, samples):
    model = build("llava-llama", attn, start_layer=L, reduce_factor=2, init="learned")
    batch = batch_of("llava", samples)
    tokens = PrefillTokens.from_batch(batch, model.config)
    dims = TextDims.from_config(model.config)
    name = type(model).__name__
    for method, where, layers in CASES:
        flops = counted(model, method, where, layers)
        with torch.no_grad(), ablate(model, method, **where) as state, torch_flop_counter() as counter:
            model(**batch)
        counts = counter.get_flop_counts()
        measured = [sum(counts[f"{name}.model.language_model.layers.{i}"].values()) for i in range(4)]
        analytic = [flops.layer_flops(i, dims, tokens).total for i in range(4)]
        assert analytic == measured, (method, where)
        # the count's assumption, checked on the execution: every crop kept at least one cell
        kept = [len(k) for k in state.kept_vision[-1]]
        assert kept == list(flops.schedule(tokens).rows_at(L).vision)
        assert analytic[L] != flops.__class__.__mro__[1].layer_flops(flops, L, dims, tokens).total  # ProxyV counted


def test_refusals_name_the_fix():
    spatial = {"start_layer": 3, "reduce_factor": 2, "init": "spatial", "light_width": 0}
    with pytest.raises(ValueError, match="needs learned proxies"):
        ProxyVReductionFlops("fastv", [2, 3], 0.5, spatial)
    with pytest.raises(ValueError, match="every drop must come at or before layer 2"):
        ProxyVReductionFlops("pdrop", [1, 3], 0.5, {**spatial, "init": "learned", "start_layer": 2})
