"""FLOPs of token reduction on a ProxyV model (analysis.flops.proxyv_reduction) == torch's counter on the real
forward, layer by layer; and its refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MULTI, PAIR
from test_proxyv import batch_of, build, processor

from analysis import ablate
from analysis.flops import PrefillTokens, TextDims, mean_flops
from analysis.flops.measure import torch_flop_counter
from analysis.flops.proxyv_reduction import ProxyVReductionFlops
from analysis.lmms_model import LlavaAblate

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


def test_an_emptied_image_is_counted_from_the_kept_tokens(monkeypatch):
    """FastV's ranking steered to the latest tokens (score = position), so the two-image sample keeps cells of its
    second image only and its first image gets no proxies at L: the count given the execution's kept tokens
    (kept=, what the plugin records with each prompt) equals torch's counter layer by layer; the default count,
    which assumes every crop keeps a cell, over-counts from L."""
    from analysis.reduction import runtime
    from analysis.flops.proxyv_reduction import crops_kept

    ranked = runtime.fastv_scores

    def steered(attn, q, k, cos, sin, index, valid):
        ranked(attn, q, k, cos, sin, index, valid)  # the ranking's own FLOPs still run (and are counted)
        return index.float()

    monkeypatch.setattr(runtime, "fastv_scores", steered)
    model = build("llava-llama", "sdpa", start_layer=L, reduce_factor=2, init="learned")
    batch = batch_of("llava", MULTI)
    tokens = PrefillTokens.from_batch(batch, model.config)
    dims = TextDims.from_config(model.config)
    name = type(model).__name__
    method, where, layers = "fastv", {"start_layer": 2, "keep": 0.25}, [2, 3]
    with torch.no_grad(), ablate(model, method, **where) as state, torch_flop_counter() as counter:
        model(**batch)
    counts = counter.get_flop_counts()
    measured = [sum(counts[f"{name}.model.language_model.layers.{i}"].values()) for i in range(4)]
    kept = [k.tolist() for k in state.kept_vision[-1]]
    assert [len(crops) for crops in tokens.crop_shapes] == [2, 0] and crops_kept(tokens, kept) == (1, 0)
    exact = ProxyVReductionFlops(method, list(range(2, 4)), where["keep"], model.config.proxyv, kept=kept)
    assert [exact.layer_flops(i, dims, tokens).total for i in range(4)] == measured
    placed = counted(model, method, where, layers)
    assert placed.layer_flops(L, dims, tokens).total > measured[L]
    # the plugin records the kept tokens with the prompt, and the runner's count (mean_flops) reads them
    lm = LlavaAblate(model=model, processor=processor("llava"), op=method, progress=False, **where)
    lm._record_prompt_shapes(batch)
    with torch.no_grad(), lm.variant_context() as state:
        model(**batch)
    lm._record_kept_vision(state, batch)
    record = lm.prompt_shapes[0]  # the two-image sample, counted alone (unpadded), as the runner counts it
    assert len(record["kept_vision"]) == len(kept[0])
    with torch.no_grad(), ablate(model, method, **where), torch_flop_counter() as counter:
        model(**batch_of("llava", MULTI[:1]))
    counts = counter.get_flop_counts()
    alone = sum(sum(counts[f"{name}.model.language_model.layers.{i}"].values()) for i in range(4))
    assert mean_flops(model.config, [record], lm.variant)["total"] == alone
    without = {key: value for key, value in record.items() if key != "kept_vision"}
    assert mean_flops(model.config, [without], lm.variant)["total"] > alone


def test_refusals_name_the_fix():
    spatial = {"start_layer": 3, "reduce_factor": 2, "init": "spatial", "light_width": 0}
    with pytest.raises(ValueError, match="needs learned proxies"):
        ProxyVReductionFlops("fastv", [2, 3], 0.5, spatial)
    with pytest.raises(ValueError, match="every drop must come at or before layer 2"):
        ProxyVReductionFlops("pdrop", [1, 3], 0.5, {**spatial, "init": "learned", "start_layer": 2})


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind_spec", ["llava-llama", "next-llama"])
@pytest.mark.parametrize("samples", [PAIR, MULTI], ids=["padded", "multi-and-text-only"])
def test_visionzip_on_proxyv_equals_torch_counter_layer_by_layer(kind_spec, attn, samples):
    from conftest import MODEL_SPECS

    from analysis.flops import count_flops

    model = build(kind_spec, attn, start_layer=L, reduce_factor=2, init="learned")
    batch = batch_of(MODEL_SPECS[kind_spec][0], samples)
    tokens = PrefillTokens.from_batch(batch, model.config)  # the original prompt: the count shortens it
    report = count_flops(model.config, tokens, "visionzip", dominant=10, contextual=4)  # the ProxyV config counts it
    plain = count_flops(model.config.__class__(**{k: v for k, v in model.config.to_dict().items() if k != "proxyv"}),
                        tokens, "visionzip", dominant=10, contextual=4)
    with torch.no_grad(), ablate(model, "visionzip", dominant=10, contextual=4), torch_flop_counter() as counter:
        logits = model(**batch).logits
    counts = counter.get_flop_counts()
    name = type(model).__name__
    measured = [sum(counts[f"{name}.model.language_model.layers.{i}"].values()) for i in range(4)]
    assert [layer.total for layer in report.per_layer] == measured
    assert report.per_layer[L].total != plain.per_layer[L].total  # the ProxyV layers are what is counted
    assert report.per_layer[0].total == plain.per_layer[0].total and report.vision == plain.vision
    assert report.lm_head == 2 * logits.shape[0] * logits.shape[1] * model.config.text_config.hidden_size * \
        model.config.text_config.vocab_size


def test_cli_counts_reduction_on_a_proxyv_model(capsys):
    from analysis.flops import count_flops, load_config, main

    args = ["--config", "llava-1.5-7b", "--vision-tokens", "576", "--text-tokens", "64", "--json"]
    config = load_config("llava-1.5-7b")
    tokens = PrefillTokens.from_counts(576, 64, 576)
    settings = {"start_layer": 16, "reduce_factor": 4, "init": "learned", "light_width": 0}
    for flags, method, where in ((["--op", "fastv", "--start-layer", "3", "--keep", "0.5"], "fastv",
                                  {"start_layer": 3, "keep": 0.5}),
                                 (["--op", "pdrop", "--layers", "4,8,16", "--keep", "0.5"], "pdrop",
                                  {"layers": [4, 8, 16], "keep": 0.5}),
                                 (["--op", "visionzip", "--dominant", "54", "--contextual", "10"], "visionzip",
                                  {"dominant": 54, "contextual": 10})):
        assert main([*args, *flags, "--on-proxyv", "16"]) == 0
        got = json.loads(capsys.readouterr().out)
        want = count_flops(config, tokens, method, proxyv=16, proxyv_settings=settings, **where)
        plain = count_flops(config, tokens, method, **where)
        assert got["total_flops"] == want.total < plain.total and got["baseline_flops"] == plain.baseline
    for flags, message in ((["--op", "fastv", "--start-layer", "20", "--keep", "0.5", "--on-proxyv", "16"],
                            "every drop must come at or before layer 16"),
                           (["--op", "skip_ffn", "--on-proxyv", "16"], "--on-proxyv applies to --op fastv"),
                           (["--op", "fastv", "--start-layer", "3", "--proxy-reduce", "2"], "--proxy-reduce applies")):
        assert main([*args, *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
