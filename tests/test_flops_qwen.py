"""analysis.flops on Qwen2-VL / Qwen2.5-VL / Qwen3-VL: analytic == torch's FlopCounterMode on the tiny fixtures (vision
tower per block, PatchMerger, DeepStack mergers, decoder per layer and component, LM head), the operators' formulas
against hand counts, the shipped configs against their HF classes and parameter counts, the CLI.

The counter checks the baseline forward here (FastV and PyramidDrop: tests/test_flops_reduction_qwen.py); the
operators' executed and theoretical counts are checked against counts written out in the tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from qwen_helpers import PAIR, VIDEOS, make_batch, model_for
from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

from analysis.flops import PrefillTokens, TextDims, count_flops, load_config, main
from analysis.flops.measure import by_module
from analysis.flops.measure_qwen import measure_qwen_torch
from analysis.flops.qwen import QwenVisionDims, grid_of_resolution, qwen_vision_flops

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# images of different sizes (PAIR: 32x48 and 56x24 px, padded), a video of 4 blocks beside an image and one of 3 blocks
SAMPLES = {"images": PAIR, "videos": VIDEOS}


def assert_exact(report, tokens, config, measured):
    assert measured.decoder_outside_layers == 0  # M-RoPE angles, DeepStack additions: no products
    assert measured.visual_outside_parts == 0  # position embedding interpolation, vision rotary: no products
    assert [layer.total for layer in report.per_layer] == list(measured.per_layer)
    for layer, components in zip(report.per_layer, measured.components):
        assert by_module(layer.executed) == components, f"layer {layer.layer}"
    assert report.total == measured.decoder
    assert report.lm_head == measured.lm_head
    vision = qwen_vision_flops(config, tokens.vision_grids)
    assert vision.patch_embed == measured.patch_embed
    assert vision.blocks == measured.blocks
    assert vision.merger == measured.merger
    assert vision.deepstack == measured.deepstack
    assert report.vision_parts == measured.vision_parts
    assert report.vision == measured.visual == vision.total
    assert report.total + report.lm_head + report.vision == measured.total


@pytest.mark.parametrize("samples", sorted(SAMPLES))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", KINDS)
def test_analytic_equals_torch_counter(kind, attn, samples):
    model = model_for(kind, attn)
    batch = make_batch(kind, SAMPLES[samples])
    tokens = PrefillTokens.from_batch(batch, model.config)
    assert tokens.vision_grids and bool(tokens.vision.any()) and not bool(tokens.valid.all())  # padded
    report = count_flops(model.config, tokens)
    assert_exact(report, tokens, model.config, measure_qwen_torch(model, batch))
    if kind == "qwen3_vl":
        assert len(report.vision_parts) == 3 and report.vision_parts["deepstack"] == 2 * report.vision_parts["merger"]
    else:
        assert report.vision_parts["deepstack"] == 0


def test_tokens_of_a_batch_follow_the_grids():
    model = model_for("qwen2_5_vl")
    batch = make_batch("qwen2_5_vl", VIDEOS)
    tokens = PrefillTokens.from_batch(batch, model.config)
    images = [tuple(g) for g in batch["image_grid_thw"].tolist()]
    videos = [tuple(g) for g in batch["video_grid_thw"].tolist()]
    grids = [videos[0], images[0], videos[1]]  # in sequence order: sample 0 a video then an image, sample 1 a video
    assert list(tokens.vision_grids) == grids
    assert int(tokens.vision.sum()) == sum(t * h * w for t, h, w in grids) // 4
    # per sample one (h, w) block per image and per temporal block of a video
    assert [len(shapes) for shapes in tokens.crop_shapes] == [4 + 1, 3]
    assert tokens.crop_shapes[1] == ((4, 4),) * 3  # 32x32 px frames: 8x8 patches, 4x4 merged


# ----------------------------------------------------------------------------- vision formulas by hand

def test_qwen25_window_attention_differs_per_block():
    model = model_for("qwen2_5_vl")
    dims = QwenVisionDims.from_config(model.config)
    assert dims.window == 2 and dims.full_blocks == (1,)  # 16 px windows: 2x2 merged tokens
    # 56 x 24 px: 14 x 6 patches, 7 x 3 merged -> window rows 2,2,2,1 x cols 2,1
    grid = (1, 14, 6)
    assert dims.segments(grid, 0) == [16, 8, 16, 8, 16, 8, 8, 4]
    assert dims.segments(grid, 1) == [84]
    assert dims.block_attention_flops(grid, 0) == 4 * dims.hidden * (3 * 16 ** 2 + 4 * 8 ** 2 + 4 ** 2)
    assert dims.block_attention_flops(grid, 1) == 4 * dims.hidden * 84 ** 2
    video = (3, 8, 8)  # three frames, each its own segment, each 2x2 windows
    assert dims.segments(video, 0) == [16] * 12 and dims.segments(video, 1) == [64] * 3
    measured = measure_qwen_torch(model, make_batch("qwen2_5_vl", PAIR))
    assert measured.blocks[0] < measured.blocks[1]  # the windowed block attends less


def test_vision_formulas_by_hand_on_the_shipped_configs():
    # Qwen2.5-VL-7B, an image of 32 x 48 patches (448 x 672 px): 16 x 24 merged, 4 x 4 windows of 64 patches
    config = load_config("qwen2.5-vl-7b")
    dv, f, d, n = 1280, 3420, 3584, 32 * 48
    vision = qwen_vision_flops(config, [(1, 32, 48)])
    assert vision.patch_embed == 2 * n * (3 * 2 * 14 * 14) * dv
    linear = 2 * n * dv * 4 * dv + 3 * 2 * n * dv * f
    windowed, full = 24 * 4 * 64 ** 2 * dv, 4 * n ** 2 * dv
    assert vision.blocks == tuple(linear + (full if b in (7, 15, 23, 31) else windowed) for b in range(32))
    assert vision.merger == 2 * (n // 4) * (4 * dv) ** 2 + 2 * (n // 4) * 4 * dv * d
    assert vision.deepstack == ()
    # Qwen3-VL-8B: fc1/fc2 MLP, every block over the whole frame, three DeepStack mergers of the merger's shape
    config = load_config("qwen3-vl-8b")
    dv, f, d = 1152, 4304, 4096
    video = (4, 20, 36)  # 8 frames of 320 x 576 px
    n, frame = 4 * 20 * 36, 20 * 36
    vision = qwen_vision_flops(config, [video])
    assert vision.patch_embed == 2 * n * (3 * 2 * 16 * 16) * dv
    assert set(vision.blocks) == {2 * n * dv * 4 * dv + 2 * 2 * n * dv * f + 4 * 4 * frame ** 2 * dv}
    assert vision.merger == 2 * (n // 4) * (4 * dv) ** 2 + 2 * (n // 4) * 4 * dv * d
    assert vision.deepstack == (vision.merger,) * 3
    assert grid_of_resolution(config, 320, 576, frames=8) == video


def test_grid_of_resolution_is_the_processors():
    from PIL import Image
    from transformers import Qwen2VLImageProcessor

    config = load_config("qwen2.5-vl-7b")
    processor = Qwen2VLImageProcessor()  # HF's defaults: patch 14, merge 2, 56*56 .. 28*28*1280 pixels
    for height, width in ((480, 640), (1080, 1920), (50, 700)):
        image = Image.new("RGB", (width, height))
        thw = processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
        assert grid_of_resolution(config, height, width) == tuple(thw)


# ----------------------------------------------------------------------------- the operators on Qwen token counts

def test_operators_by_hand_on_qwen25_vl_7b():
    config = load_config("qwen2.5-vl-7b")
    d, h, kv, hd, f, layers = 3584, 28, 4, 128, 18944, 28
    k, t = 20, 44  # text before the vision, after it
    tokens = PrefillTokens.from_qwen_counts(config, [(1, 36, 54)], [(4, 24, 42)], k + t, k)
    v = 36 * 54 // 4 + 4 * 24 * 42 // 4
    n = k + v + t
    assert int(tokens.vision.sum()) == v and tokens.seq_len == n
    proj = 2 * d * h * hd * 2 + 2 * d * kv * hd * 2  # q, o; k, v per row
    ffn = 3 * 2 * d * f
    pair = 2 * 2 * h * hd  # scores + weighted sum per (query, key)
    base_layer = n * (proj + ffn) + n * n * pair
    base = count_flops(config, tokens)
    assert base.total == layers * base_layer
    assert base.theoretical == layers * (n * (proj + ffn) + n * (n + 1) // 2 * pair)
    # skip_ffn from layer 14: the FFN runs on the k + t text rows only
    report = count_flops(config, tokens, "skip_ffn", start_layer=14)
    assert report.total == layers * base_layer - 14 * v * ffn
    # skip_attn: q / o and the scores of the vision rows are skipped; k / v still run on every row
    report = count_flops(config, tokens, "skip_attn", start_layer=14)
    q_o = 2 * 2 * d * h * hd
    assert report.total == layers * base_layer - 14 * v * (q_o + n * pair)
    # mask_v2v executes the baseline; its theoretical attention drops vision -> earlier-vision pairs
    report = count_flops(config, tokens, "mask_v2v", start_layer=14)
    assert report.total == base.total
    vision_pairs = v * (k + 1)  # each vision query: the text before it and itself
    text_pairs = k * (k + 1) // 2 + sum(k + v + i + 1 for i in range(t))
    assert report.per_layer[20].theoretical_total == n * (proj + ffn) + (vision_pairs + text_pairs) * pair
    assert report.lm_head == 2 * n * d * 152064


def test_visionzip_refuses_qwen_configs_and_proxyv_counts_by_hand():
    """FastV and PyramidDrop are counted on these configs (tests/test_flops_reduction_qwen.py); VisionZip (no CLS token
    to rank with) is not. ProxyV from token counts: one 16 x 16-patch image (8 x 8 merged tokens, f = 4: 2 x 2
    proxies) -- from layer 8 the FFN and the projections run on the 4 proxies and the 10 text rows, not the 64 cells."""
    config = load_config("qwen3-vl-8b")
    tokens = PrefillTokens.from_qwen_counts(config, [(1, 16, 16)], (), 10)
    with pytest.raises(NotImplementedError, match="not modelled yet"):
        count_flops(config, tokens, "visionzip")
    report = count_flops(config, tokens, "proxyv", start_layer=8)
    d, f = config.text_config.hidden_size, config.text_config.intermediate_size
    assert report.per_layer[9].executed["gate_proj"] == {"vision": 2 * 4 * d * f, "text": 2 * 10 * d * f, "padding": 0}
    assert report.per_layer[7].executed["gate_proj"] == {"vision": 2 * 64 * d * f, "text": 2 * 10 * d * f, "padding": 0}
    with pytest.raises(ValueError, match="learned ProxyV on Qwen-VL needs its proxies per block"):
        count_flops(config, tokens, "proxyv", start_layer=8, init="learned")
    learned = count_flops(config, tokens, "proxyv", start_layer=8, init="learned", learned_proxies=6)
    assert learned.per_layer[9].executed["gate_proj"]["vision"] == 2 * 6 * d * f


# ----------------------------------------------------------------------------- shipped configs

def _matrix_params(module) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if p.dim() >= 2 and "pos_embed" not in name)


@pytest.mark.parametrize("name, cls, layers_params, text_total", [
    # decoder layers' matrices: L·(2·D² + 2·D·Hkv·hd + 3·D·F); text total = those + biases, norms, embeddings
    ("qwen2.5-vl-3b", Qwen2_5_VLConfig, 36 * (2 * 2048 ** 2 + 2 * 2048 * 256 + 3 * 2048 * 11008), 3.09e9),
    ("qwen2.5-vl-7b", Qwen2_5_VLConfig, 28 * (2 * 3584 ** 2 + 2 * 3584 * 512 + 3 * 3584 * 18944), 7.07e9),
    ("qwen3-vl-8b", Qwen3VLConfig, 36 * (2 * 4096 ** 2 + 2 * 4096 * 1024 + 3 * 4096 * 12288), 7.57e9),
])
def test_shipped_configs_against_parameter_counts(name, cls, layers_params, text_total):
    """Baseline = 2 · (matrix parameters) · tokens + attention; vision = 2 · (matrix parameters) · patches + attention
    + mergers, with parameters counted on a meta-device model of the HF classes."""
    from transformers import AutoModelForImageTextToText

    config = load_config(name)
    assert type(config) is cls
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    text, visual = model.model.language_model, model.model.visual
    assert _matrix_params(text.layers) == layers_params
    assert sum(p.numel() for p in text.parameters()) == pytest.approx(text_total, rel=0.01)
    grid = (1, 32, 48)
    tokens = PrefillTokens.from_qwen_counts(config, [grid], (), 64, 20)
    t = tokens.seq_len
    report = count_flops(config, tokens)
    dims = TextDims.from_config(config)
    assert report.baseline == 2 * layers_params * t + dims.layers * 4 * dims.heads * dims.head_dim * t * t
    assert report.lm_head == 2 * t * dims.hidden * dims.vocab  # also with tied embeddings (3B)
    n = grid[0] * grid[1] * grid[2]
    vdims = QwenVisionDims.from_config(config)
    attention = sum(vdims.block_attention_flops(grid, b) for b in range(vdims.depth))
    assert report.vision_parts["tower"] == 2 * (_matrix_params(visual.patch_embed) + _matrix_params(visual.blocks)) * n \
        + attention
    mergers = 2 * _matrix_params(visual.merger) * (n // 4)
    assert report.vision_parts["merger"] == mergers
    deepstack = _matrix_params(getattr(visual, "deepstack_merger_list", torch.nn.ModuleList()))
    assert report.vision_parts["deepstack"] == 2 * deepstack * (n // 4)
    assert report.vision == sum(report.vision_parts.values())


def test_qwen25_vl_7b_prefill_figures():
    # a 448 x 672 image (1536 patches, 384 tokens) + 64 text tokens
    config = load_config("qwen2.5-vl-7b")
    report = count_flops(config, PrefillTokens.from_qwen_counts(config, [(1, 32, 48)], (), 64))
    assert 5.8e12 < report.baseline < 6.1e12  # 2 · 6.53e9 · 448 = 5.85e12, + 28 · 4 · 3584 · 448² = 0.08e12
    assert 1.9e12 < report.vision < 2.2e12  # 2 · 0.67e9 · 1536 patches (tower, merger at 1/4) + attention


# ----------------------------------------------------------------------------- CLI

def test_cli_json_with_an_image_and_a_video():
    cmd = [sys.executable, "-m", "analysis.flops", "--config", "qwen2.5-vl-7b", "--image-grid", "1,36,54",
           "--video-grid", "8,24,42", "--text-tokens", "64", "--text-before-image", "20", "--op", "skip_ffn",
           "--start-layer", "14", "--json"]
    result = json.loads(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    config = load_config("qwen2.5-vl-7b")
    tokens = PrefillTokens.from_qwen_counts(config, [(1, 36, 54)], [(8, 24, 42)], 64, 20)
    expected = count_flops(config, tokens, "skip_ffn", start_layer=14)
    assert result["vision_tokens"] == 486 + 2016 and result["seq_len"] == 486 + 2016 + 64
    assert result["image_grids"] == [[1, 36, 54]] and result["video_grids"] == [[8, 24, 42]]
    assert result["total_flops"] == expected.total and result["baseline_flops"] == expected.baseline
    assert result["vision_parts"] == expected.vision_parts and result["vision_flops"] == expected.vision
    assert [layer["ablated"] for layer in result["per_layer"]] == [i >= 14 for i in range(28)]


def test_cli_table_with_sizes_and_deepstack(capsys):
    assert main(["--config", "qwen3-vl-8b", "--image-size", "504x756", "--video-size", "16x336x588",
                 "--text-tokens", "64", "--op", "skip_attn", "--start-layer", "18"]) == 0
    out = capsys.readouterr().out
    assert "image 1x32x48" in out and "video 8x20x36" in out  # patch 16: sides rounded to multiples of 32 px
    assert "merger" in out and "deepstack mergers" in out


@pytest.mark.parametrize("args, message", [
    (["--config", "qwen2.5-vl-7b", "--image-grid", "1,36"], "a grid is T,H,W in patches"),
    (["--config", "qwen2.5-vl-7b", "--image-grid", "1,35,54"], "multiples of spatial_merge_size=2"),
    (["--config", "qwen2.5-vl-7b", "--image-grid", "2,36,54"], "an image grid has T = 1"),
    (["--config", "qwen2.5-vl-7b", "--image-size", "504"], "--image-size takes HxW"),
    (["--config", "qwen2.5-vl-7b", "--vision-tokens", "576"], "--vision-tokens does not apply to Qwen-VL"),
    (["--config", "qwen2.5-vl-7b", "--image-grid", "1,36,54", "--op", "visionzip"], "not modelled yet"),
    (["--config", "qwen2.5-vl-7b", "--image-grid", "1,36,54", "--op", "proxyv", "--proxy-init", "learned"],
     "learned ProxyV on Qwen-VL needs its proxies per block"),
    (["--config", "llava-1.5-7b", "--image-grid", "1,36,54"], "--image-grid applies to Qwen-VL configs"),
])
def test_cli_bad_input_is_one_line(capsys, args, message):
    assert main([*args, "--text-tokens", "64"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
