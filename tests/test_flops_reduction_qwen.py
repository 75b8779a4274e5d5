"""FLOPs of FastV and PyramidDrop on Qwen2.5-VL / Qwen3-VL (analysis.flops.reduction fed the Qwen token layout):
analytic == torch's FlopCounterMode on the forward executed under the reduction -- per layer and component (the
ranking included), the decoder, the LM head on the rows the pruned forward outputs, the tower, the PatchMerger and the
DeepStack mergers -- on the tiny fixtures (images of two sizes, a multi-block video beside an image, left-padded
batches of two, a sample alone, a text-only sample), eager and sdpa; the kept counts and output rows are the
execution's; a shipped config by hand."""

from __future__ import annotations

import pytest
import torch
from qwen_helpers import MULTI, PAIR, VIDEOS, make_batch, model_for
from test_flops_qwen import assert_exact

from analysis import ablate
from analysis.flops import (
    PrefillTokens,
    TextDims,
    count_flops,
    load_config,
    make_variant,
)
from analysis.flops.measure_qwen import measure_qwen_torch

# the tiny fixtures have 3 decoder layers (Qwen3-VL: DeepStack added after layers 0 and 1)
CASES = (
    ("fastv", {"start_layer": 1, "keep": 0.5}),
    ("fastv", {"start_layer": 2, "keep": 0.3}),
    ("pdrop", {"layers": [1, 2], "keep": 0.6}),
)
# images of two sizes (padded); a 4-block video then an image, and a sample opening with a video (padded); one alone
SAMPLES = {"images": PAIR, "videos": VIDEOS, "alone": VIDEOS[:1]}


def assert_reduction_exact(model, batch, op, where):
    tokens = PrefillTokens.from_batch(batch, model.config)
    report = count_flops(model.config, tokens, op, **where)
    assert_exact(report, tokens, model.config, measure_qwen_torch(model, batch, op, **where))
    # the kept vision tokens per stage and the rows the forward outputs are the execution's
    counted = make_variant(op, TextDims.from_config(model.config).layers, **where)
    with torch.no_grad(), ablate(model, op, **where) as state:
        logits = model(**batch).logits
    if counted.active(tokens):
        stages = counted.schedule(tokens).stages
        assert [[len(kept) for kept in stage] for stage in state.kept_vision] == [list(rows.vision)
                                                                                 for _, rows in stages[1:]]
        assert logits.shape[:2] == (tokens.batch, stages[-1][1].width)
    else:
        assert state.kept_vision == [] and logits.shape[1] == tokens.seq_len
    return report


@pytest.mark.parametrize("samples", sorted(SAMPLES))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_analytic_equals_torch_counter(kind, attn, samples):
    model = model_for(kind, attn)
    batch = make_batch(kind, SAMPLES[samples])
    for op, where in CASES:
        report = assert_reduction_exact(model, batch, op, where)
        assert report.total < report.baseline and report.theoretical < report.theoretical_baseline, (op, where)
        assert report.vision == count_flops(model.config, PrefillTokens.from_batch(batch, model.config)).vision
        if samples != "alone":
            assert report.groups()["padding"] > 0  # left padding, then filler slots, are executed


@pytest.mark.filterwarnings("ignore:ablate\\(\\):UserWarning")
@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_several_images_a_video_and_a_text_only_sample(kind):
    model = model_for(kind)
    for samples in (MULTI, MULTI[1:]):  # the text-only sample keeps all its rows; alone, the baseline runs
        batch = make_batch(kind, samples)
        for op, where in CASES:
            report = assert_reduction_exact(model, batch, op, where)
            assert (report.total == report.baseline) == (samples == MULTI[1:])


def test_fastv_by_hand_on_qwen25_vl_7b():
    """One 448 x 672 image (384 tokens) + 64 text tokens, FastV K = 2, R = 0.5: layers 0, 1 on 448 rows, the last
    prompt token's score row over 448 keys (counted in layer 2), layers 2..27 on 64 + 192 rows; the vision side is
    the baseline's (the tower and merger run on the whole image)."""
    config = load_config("qwen2.5-vl-7b")
    d, h, kv, hd, f = 3584, 28, 4, 128, 18944  # 28 layers
    tokens = PrefillTokens.from_qwen_counts(config, [(1, 32, 48)], (), 64, 20)
    row = 2 * d * h * hd * 2 + 2 * d * kv * hd * 2 + 3 * 2 * d * f  # q, o, k, v, gate, up, down
    pair = 2 * 2 * h * hd

    def layer(n):
        return n * row + n * n * pair

    report = count_flops(config, tokens, "fastv", start_layer=2, keep=0.5)
    assert report.total == 2 * layer(448) + 2 * h * hd * 448 + 26 * layer(256)
    assert report.lm_head == 2 * 256 * d * 152064  # the rows the pruned forward outputs
    baseline = count_flops(config, tokens)
    assert report.vision == baseline.vision and report.vision_parts == baseline.vision_parts
    assert report.reduction == pytest.approx(0.401, abs=1e-3)
