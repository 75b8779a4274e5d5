"""FLOPs of ProxyV on Qwen2.5-VL / Qwen3-VL: analytic (shapes from the batch's plan) == torch's FlopCounterMode on the
ProxyV forward, per layer and per linear layer (the light MLPs, the learned initialiser and the splat counted in the
layer that runs them, as the counter sees it), the decoder, the LM head and the vision side; spatial, learned and
init "none"; images of two sizes, several images and a video, videos of several blocks; eager and sdpa."""

from __future__ import annotations

import copy
import functools

import pytest
from qwen_helpers import SAMPLE_SETS, make_batch, model_for

from analysis.flops import PrefillTokens, count_flops
from analysis.flops.measure import LINEARS, by_module
from analysis.flops.measure_qwen import measure_qwen_torch
from analysis.flops.qwen import qwen_vision_flops
from analysis.proxyv import apply_proxyv, proxyv_shapes

START = 2  # the tiny fixtures have 3 layers; Qwen3-VL's DeepStack is added after layers 0 and 1


@functools.cache
def proxyv_model(kind: str, attn: str, init: str):
    model = copy.deepcopy(model_for(kind, attn)).eval()
    return apply_proxyv(model, START, 2, init=init, seed=0, learned_proxies=3 if init == "learned" else 0)


def analytic(model, batch):
    s = model.config.proxyv
    shapes = proxyv_shapes(model.config, batch["input_ids"], batch["attention_mask"],
                           image_grid_thw=batch.get("image_grid_thw"), video_grid_thw=batch.get("video_grid_thw"))
    tokens = PrefillTokens.from_batch(batch, model.config)
    report = count_flops(model.config, tokens, "proxyv", start_layer=s["start_layer"], reduce_factor=s["reduce_factor"],
                         init=s["init"], light_width=s["light_width"], shapes=shapes)
    return report, tokens


def counter_view(executed) -> dict[str, int]:
    """The analytic breakdown as the counter splits a layer: its own linear layers, the rest under ``attention``."""
    split = by_module(executed)
    linear = {name: split.pop(name) for name in LINEARS if name in split}
    return {**linear, "attention": sum(split.values())}


@pytest.mark.parametrize("samples", sorted(SAMPLE_SETS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("init", ["spatial", "learned", "none"])
@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_analytic_equals_torch_counter(kind, init, attn, samples):
    model = proxyv_model(kind, attn, init)
    batch = make_batch(kind, SAMPLE_SETS[samples])
    report, tokens = analytic(model, batch)
    measured = measure_qwen_torch(model, batch)
    assert [layer.ablated for layer in report.per_layer] == [False, False, True]
    assert [layer.total for layer in report.per_layer] == list(measured.per_layer)
    for layer, components in zip(report.per_layer, measured.components):
        assert counter_view(layer.executed) == components, f"layer {layer.layer}"
    assert report.total == measured.decoder and report.lm_head == measured.lm_head
    assert report.vision == measured.visual == qwen_vision_flops(model.config, tokens.vision_grids).total
    assert report.total + report.lm_head + report.vision == measured.total
    if samples == "videos":  # vision-heavy: ProxyV saves (the tiny multi batch pays for a text-only sample's filler)
        assert report.total < report.baseline and report.theoretical < report.theoretical_baseline


@pytest.mark.parametrize("init", ["spatial", "learned", "none"])
@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_tokens_alone_give_the_same_count(kind, init):
    """What the runner has per prompt -- the vision mask, the blocks and the grids in sequence order, no input_ids --
    gives the same report as the batch's own plan (Qwen3-VL: timestamps between a video's blocks)."""
    model = proxyv_model(kind, "sdpa", init)
    s = model.config.proxyv
    for samples in SAMPLE_SETS.values():
        batch = make_batch(kind, samples)
        report, tokens = analytic(model, batch)
        alone = count_flops(model.config, tokens, "proxyv", start_layer=s["start_layer"],
                            reduce_factor=s["reduce_factor"], init=s["init"], light_width=s["light_width"])
        assert alone == report
