"""FLOPs of FastV / PyramidDrop on a ProxyV Qwen2.5-VL / Qwen3-VL model (analysis.flops.proxyv_reduction: the
reduction's count below the start layer L, ProxyV's layer on the block alive at L, planned as the execution plans
it) == torch's FlopCounterMode on the forward executed: per layer and per component, the decoder, the LM head on
the rows the pruned forward outputs, the vision side; images of two sizes, several images + a video beside a
text-only sample, multi-block videos; eager and sdpa. The count places each sample's kept vision tokens evenly over
its vision positions: which blocks keep a cell is checked against the execution's own plan, and where the ranking
emptied a whole block (Qwen3-VL's 4-block video under FastV at L), the count given the execution's kept tokens is
exact and the default one over-counts."""

from __future__ import annotations

import pytest
import torch
from qwen_helpers import SAMPLE_SETS, make_batch
from test_flops_proxyv_qwen import counter_view
from test_proxyv_reduction_qwen import VARIANTS, L, proxyv_model

from analysis import ablate
from analysis.flops import PrefillTokens, TextDims, count_flops, make_variant
from analysis.flops.measure_qwen import measure_qwen_torch
from analysis.flops.proxyv_reduction import ProxyVReductionFlops, qwen_block_shapes
from analysis.flops.qwen import qwen_vision_flops


def executed(model, batch, op, where):
    """The execution's plan at L (proxies per sample, grid and block) and its kept vision positions at L."""
    proxyv, seen = model.model.proxyv, []
    handle = model.model.language_model.layers[L].register_forward_hook(
        lambda *_: seen.append(proxyv.state.plan.counts if proxyv.state is not None else None))
    try:
        with torch.no_grad(), ablate(model, op, **where) as state:
            model(**batch)
            kept = [k.tolist() for k in state.kept_vision[-1]]
    finally:
        handle.remove()
    return seen[0], kept


def without_proxyv(config):
    return config.__class__(**{k: v for k, v in config.to_dict().items() if k != "proxyv"})


@pytest.mark.parametrize("samples", sorted(SAMPLE_SETS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_analytic_equals_torch_counter(kind, attn, samples):
    model = proxyv_model(kind, attn)
    config = model.config
    batch = make_batch(kind, SAMPLE_SETS[samples])
    tokens = PrefillTokens.from_batch(batch, config)
    dims = TextDims.from_config(config)
    emptied = []
    for name, (op, where, _) in VARIANTS.items():
        report = count_flops(config, tokens, op, **where)  # the ProxyV config counts its ProxyV layers itself
        measured = measure_qwen_torch(model, batch, op, **where)
        plain = count_flops(without_proxyv(config), tokens, op, **where)
        assert report.per_layer[L].total != plain.per_layer[L].total  # ProxyV's layer is what is counted at L
        assert [layer.total for layer in report.per_layer[:L]] == list(measured.per_layer[:L])
        assert report.lm_head == measured.lm_head
        assert report.vision == measured.visual == qwen_vision_flops(config, tokens.vision_grids).total
        rows = make_variant(op, dims.layers, **where).schedule(tokens).rows_at(L)
        counts, kept = executed(model, batch, op, where)
        if qwen_block_shapes(tokens, rows, config.proxyv, dims.hidden).counts != counts:
            # the ranking emptied a block the even placement reaches: given the execution's kept tokens, exact
            emptied.append(name)
            shapes = qwen_block_shapes(tokens, rows, config.proxyv, dims.hidden, kept=kept)
            assert shapes.counts == counts
            flops = ProxyVReductionFlops(op, make_variant(op, dims.layers, **where).layers, where["keep"],
                                         config.proxyv, kept=kept)
            got = [flops.layer_flops(i, dims, tokens).total for i in range(dims.layers)]
            assert got == list(measured.per_layer), name
            assert all(a.total > b for a, b in zip(report.per_layer[L:], got[L:]))  # the default over-counts
            continue
        assert [layer.total for layer in report.per_layer] == list(measured.per_layer), name
        for layer, components in zip(report.per_layer, measured.components):
            assert counter_view(layer.executed) == components, (name, layer.layer)
        assert report.total == measured.decoder
        assert report.total + report.lm_head + report.vision == measured.total
    assert emptied == (["fastv-at-L"] if (kind, samples) == ("qwen3_vl", "videos") else [])


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_the_runner_count_agrees(kind):
    """What the plugin records per prompt (the mask, blocks, grids; no input_ids) counted by the runner
    (analysis.runner.counting, each sample alone, the LM head on the last row) is the count of the sample's own
    batch, and torch's counter on it wherever the execution keeps a cell in the blocks the count places them in."""
    from analysis.layout_qwen import layout_of_batch
    from analysis.runner.counting import qwen_mean_flops
    from analysis.variant import resolve_variant

    model = proxyv_model(kind)
    config, dims = model.config, TextDims.from_config(model.config)
    checked = 0
    for samples in SAMPLE_SETS.values():
        for parts in samples:
            batch = make_batch(kind, (parts,))
            tokens = PrefillTokens.from_batch(batch, config)
            layout = layout_of_batch(batch, config)
            record = {"mask": "".join("v" if v else "t" for v in tokens.vision[0].tolist()),
                      "crop_shapes": tuple(tuple(b.shape) for g in layout.samples[0].grids for b in g.blocks),
                      "vision_grids": tuple(tuple(int(x) for x in g.grid_thw) for g in layout.samples[0].grids)}
            for op, where, _ in VARIANTS.values():
                params = {k: v for k, v in where.items() if k != "start_layer"}
                variant = resolve_variant(op, dims.layers, start_layer=where.get("start_layer"),
                                          params={**params, "proxyv": L})
                recorded = qwen_mean_flops(config, [record], variant)
                report = count_flops(config, tokens, op, **where, lm_head="last")
                assert recorded["total"] == report.total and recorded["baseline"] == report.baseline
                if not tokens.vision.any():
                    continue
                rows = make_variant(op, dims.layers, **where).schedule(tokens).rows_at(L)
                if qwen_block_shapes(tokens, rows, config.proxyv, dims.hidden).counts == executed(
                        model, batch, op, where)[0]:
                    checked += 1
                    assert report.total == measure_qwen_torch(model, batch, op, **where).decoder
    assert checked >= 10


def test_the_plugin_records_the_blocks_an_execution_kept():
    """Where the ranking empties a whole video block (Qwen3-VL's video batch, FastV at L), the plugin records with
    each prompt the vision tokens the execution kept at L (unpadded indices), and the runner's count of each prompt
    is then torch's counter on that prompt alone; without them the count over-counts (the emptied block's proxies)."""
    from analysis import tiny_qwen
    from analysis.lmms_model import LlavaAblate
    from analysis.runner.counting import qwen_mean_flops

    kind, (op, where, _) = "qwen3_vl", VARIANTS["fastv-at-L"]
    model = proxyv_model(kind)
    lm = LlavaAblate(model=model, processor=tiny_qwen.build_processor(kind), op=op, progress=False, **where)
    batch = make_batch(kind, SAMPLE_SETS["videos"])  # left-padded: the recorded indices are unpadded ones
    lm._record_prompt_shapes(batch)
    with torch.no_grad(), lm.variant_context() as state:
        model(**batch)
    lm._record_kept_vision(state, batch)
    over = []
    for record, parts in zip(lm.prompt_shapes, SAMPLE_SETS["videos"]):
        assert "kept_vision" in record and all(record["mask"][i] == "v" for i in record["kept_vision"])
        measured = measure_qwen_torch(model, make_batch(kind, (parts,)), op, **where)  # the prompt alone
        assert qwen_mean_flops(model.config, [record], lm.variant)["total"] == measured.decoder
        placed = qwen_mean_flops(model.config, [{k: v for k, v in record.items() if k != "kept_vision"}], lm.variant)
        over.append(placed["total"] > measured.decoder)
    assert any(over)  # this batch is the one where the even placement misses an emptied block


def test_a_shipped_config_by_counts():
    """qwen2.5-vl-7b from counts (what the CLI's --on-proxyv counts): learned_proxies is required (one line); with
    it, ProxyV's layers from L count less than the reduction alone on this vision-heavy prompt."""
    from analysis.flops import load_config

    config = load_config("qwen2.5-vl-7b")
    tokens = PrefillTokens.from_qwen_counts(config, [(1, 36, 54)], [(8, 24, 42)], 64, 20)
    settings = {"start_layer": 16, "reduce_factor": 4, "init": "learned", "light_width": 0}
    with pytest.raises(ValueError, match=r"^learned ProxyV on Qwen-VL needs its proxies per block"):
        count_flops(config, tokens, "fastv", start_layer=3, keep=0.5, proxyv=16, proxyv_settings=settings)
    report = count_flops(config, tokens, "fastv", start_layer=3, keep=0.5, proxyv=16,
                         proxyv_settings={**settings, "learned_proxies": 16})
    plain = count_flops(config, tokens, "fastv", start_layer=3, keep=0.5)
    assert report.per_layer[15].total == plain.per_layer[15].total
    assert report.per_layer[16].total < plain.per_layer[16].total and report.baseline == plain.baseline
