"""analysis.flops: the analytic model equals what executes (torch's counter, fvcore), and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MULTI, PAIR, make_batch, model_for
from reference import op_mask
from torch.utils.flop_counter import FlopCounterMode

from analysis import OPERATORS
from analysis.flops import (
    COMPONENTS,
    PrefillTokens,
    TextDims,
    allowed_pair_counts,
    count_flops,
    load_config,
    main,
    shipped_configs,
)
from analysis.flops.measure import measure_fvcore, measure_torch
from analysis.variant import resolve_variant

ROOT = Path(__file__).resolve().parents[1]
ONE = (("USER: <image>\nWhat is written here? ASSISTANT:", [(0, 32, 48)]),)
BATCHES = {1: ONE, 2: PAIR}  # PAIR: different prompt lengths -> padding and unequal non-vision counts
LAYER_RANGES = (range(4), [1, 2], [3])


def analytic(model, batch, op, layers, newline_tokens="vision"):
    layout = PrefillTokens.from_batch(batch, model.config, newline_tokens)
    return count_flops(model.config, layout, op, layers)


def assert_exact(report, measured):
    assert measured.decoder_outside_layers == 0  # rotary embedding etc. execute no matmul
    assert [layer.total for layer in report.per_layer] == list(measured.per_layer)
    for layer, components in zip(report.per_layer, measured.components):
        executed = {name: sum(groups.values()) for name, groups in layer.executed.items()}
        attention = executed.pop("attn_scores") + executed.pop("attn_values")
        assert {**executed, "attention": attention} == components, f"layer {layer.layer}"
    assert report.total == measured.decoder
    assert report.lm_head == measured.lm_head
    assert report.vision == measured.vision


# ----------------------------------------------------------------------------- analytic == torch counter

@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("spec", ["llava-llama", "llava-qwen2-gqa"])
def test_analytic_equals_torch_counter_for_every_op(spec, attn, batch_size):
    model = model_for(spec, attn)
    batch = make_batch("llava", BATCHES[batch_size])
    for i, op in enumerate(sorted(OPERATORS)):
        layers = LAYER_RANGES[(i + batch_size) % len(LAYER_RANGES)]  # every op meets two ranges
        assert_exact(analytic(model, batch, op, layers), measure_torch(model, batch, op, layers))


@pytest.mark.parametrize("newline_tokens", ["vision", "text"])
@pytest.mark.parametrize("op", ["skip_attn_ffn", "skip_attn", "mask_v2v"])
def test_llava_next_mistral_gqa_with_newline_tokens(op, newline_tokens):
    model = model_for("next-mistral-gqa", "sdpa")
    batch = make_batch("llava_next")
    report = analytic(model, batch, op, [1, 3], newline_tokens)
    assert_exact(report, measure_torch(model, batch, op, [1, 3], newline_tokens))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_several_images_and_a_text_only_sample(attn):
    # the text-only sample keeps all its rows, so skip ops gather the whole sequence (no saving)
    model = model_for("llava-qwen2-gqa", attn)
    batch = make_batch("llava", MULTI)
    for op in ("skip_attn", "skip_ffn", "drop_v2t"):
        report = analytic(model, batch, op, [0, 2])
        assert_exact(report, measure_torch(model, batch, op, [0, 2]))
        if OPERATORS[op].skip_ffn or OPERATORS[op].skip_attention:
            assert report.total == report.baseline


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_sliding_window_backbone(attn):
    # the window masks scores but the kernels still compute the rectangle; only the theoretical figure shrinks
    model = model_for("next-mistral-window", attn)
    batch = make_batch("llava_next")
    window = model.config.text_config.sliding_window
    assert batch["input_ids"].shape[1] > 2 * window
    for op in ("none", "skip_attn"):
        report = analytic(model, batch, op, [1, 2])
        assert_exact(report, measure_torch(model, batch, op, [1, 2]))
    layout = PrefillTokens.from_batch(batch, model.config)
    windowed = sum(layout.allowed_pairs(None, window, False).values())
    assert windowed < sum(layout.allowed_pairs(None, None, False).values())
    dims = TextDims.from_config(model.config)
    assert sum(report.per_layer[0].theoretical["attn_scores"].values()) == 2 * dims.heads * dims.head_dim * windowed


def test_sdpa_attention_is_counted_as_on_eager():
    batch = make_batch("llava", PAIR)
    eager = measure_torch(model_for("llava-qwen2-gqa", "eager"), batch, "skip_attn", [1, 2])
    sdpa = measure_torch(model_for("llava-qwen2-gqa", "sdpa"), batch, "skip_attn", [1, 2])
    assert all(c["attention"] > 0 for c in sdpa.components)
    assert sdpa.components == eager.components
    # without our formula for the CPU kernel torch's counter sees no attention at all on sdpa
    model = model_for("llava-qwen2-gqa", "sdpa")
    ours = measure_torch(model, batch)
    counter = FlopCounterMode(display=False, depth=None)
    with torch.no_grad(), counter:
        model(**batch)
    counted = counter.get_flop_counts()["LlavaForConditionalGeneration.model.language_model"]
    assert sum(counted.values()) == ours.decoder - sum(c["attention"] for c in ours.components)


# ----------------------------------------------------------------------------- fvcore

@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("spec, attn", [("llava-llama", "eager"), ("llava-qwen2-gqa", "sdpa")])
def test_fvcore_counts_half_on_the_decoder_and_lm_head(spec, attn):
    model = model_for(spec, attn)
    batch = make_batch("llava", PAIR)
    for op, layers in (("none", None), ("skip_attn_ffn", [1, 2])):
        report = analytic(model, batch, op, layers)
        fv = measure_fvcore(model, batch, op, layers)
        assert fv.unit == "multiply-adds"
        assert [2 * n for n in fv.per_layer] == [layer.total for layer in report.per_layer]
        assert 2 * fv.decoder == report.total
        assert 2 * fv.lm_head == report.lm_head
        # fvcore also counts 5 per element entering a LayerNorm: CLIP's pre-norm and 2 per layer
        vision = model.config.vision_config
        seq = (vision.image_size // vision.patch_size) ** 2 + 1
        norms = report_crops(batch, model) * (2 * vision.num_hidden_layers + 1) * seq * vision.hidden_size * 5
        assert 2 * fv.vision == report.vision + 2 * norms


def report_crops(batch, model):
    return PrefillTokens.from_batch(batch, model.config).crops


# ----------------------------------------------------------------------------- executed vs theoretical

def test_skip_ops_execute_less_and_mask_ops_only_lower_the_theoretical_figure():
    config = load_config("llava-1.5-7b")
    layout = PrefillTokens.from_counts(576, 64, 576, text_before_image=35)
    base = count_flops(config, layout, "none")
    assert base.total == base.baseline and base.theoretical == base.theoretical_baseline
    assert base.theoretical < base.total  # causal half
    for op in sorted(OPERATORS):
        report = count_flops(config, layout, op, start_layer=8)
        assert report.baseline == base.total
        if op == "none":
            continue
        if OPERATORS[op].skip_attention or OPERATORS[op].skip_ffn:
            assert report.total < report.baseline and report.reduction > 0
        else:
            assert report.total == report.baseline and report.reduction == 0
        assert report.theoretical < report.theoretical_baseline


def test_theoretical_pairs_in_closed_form():
    k, v, t = 5, 12, 7  # text before the image, vision tokens, text after
    vision = PrefillTokens.from_counts(v, k + t, v, text_before_image=k).vision[0]
    n = k + v + t
    before = k * (k + 1) // 2
    after_full = sum(k + v + i + 1 for i in range(t))
    vision_causal = sum(k + j + 1 for j in range(v))
    expected = {
        "none": {"vision": vision_causal, "text": before + after_full},
        "mask_v2v": {"vision": v * (k + 1), "text": before + after_full},
        "drop_v2t": {"vision": vision_causal, "text": before + sum(k + i + 1 for i in range(t))},
        "skip_attn": {"vision": 0, "text": before + after_full},
    }
    for op, counts in expected.items():
        got = allowed_pair_counts(vision, OPERATORS[op](), None, OPERATORS[op].skip_attention, block=4)
        assert got == counts, op
    assert sum(expected["none"].values()) == n * (n + 1) // 2
    window = 6
    got = allowed_pair_counts(vision, None, window, False)
    assert sum(got.values()) == sum(min(q + 1, window) for q in range(n))


@pytest.mark.parametrize("op", ["mask_v2v", "drop_v2t", "skip_attn", "skip_attn_ffn"])
def test_theoretical_attention_matches_reference_masks_on_a_padded_batch(op):
    # independent of analysis.ops: the plain (N, N) masks of tests/reference.py, per sample
    model = model_for("next-llama", "sdpa")
    batch = make_batch("llava_next", PAIR)
    report = analytic(model, batch, op, [2])
    layout = PrefillTokens.from_batch(batch, model.config)
    dims = TextDims.from_config(model.config)
    pairs = 0
    for b in range(layout.batch):
        vision = layout.vision[b][layout.valid[b]]
        n = vision.shape[0]
        allowed = (torch.ones(n, n).tril().bool() & op_mask(op, vision)) | torch.eye(n, dtype=torch.bool)
        if OPERATORS[op].skip_attention:
            allowed = allowed[~vision]
        pairs += int(allowed.sum())
    layer = report.per_layer[2].theoretical
    assert sum(layer["attn_scores"].values()) == 2 * dims.heads * dims.head_dim * pairs


def test_groups_and_components_add_up():
    model = model_for("llava-llama", "sdpa")
    report = analytic(model, make_batch("llava", PAIR), "skip_ffn", [1, 2])
    assert sum(report.groups().values()) == report.total == sum(report.components().values())
    assert set(report.components()) == set(COMPONENTS)
    ablated = report.per_layer[1]
    ffn = ablated.executed["gate_proj"]
    assert ffn["vision"] == 0 and ffn["padding"] > 0  # filler slots of the shorter sample's block
    assert report.per_layer[0].executed["gate_proj"]["vision"] > 0


# ----------------------------------------------------------------------------- shipped configs

def _matrix_params(module) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if p.dim() >= 2 and "position" not in name)


@pytest.mark.parametrize("name", [n for n in shipped_configs() if not n.startswith("qwen")])  # Qwen-VL: test_flops_qwen
def test_shipped_configs_against_parameter_counts(name):
    """Baseline = 2 · (matrix parameters) · tokens + attention, with parameters counted on a meta model."""
    from transformers import AutoModel

    config = load_config(name)
    per_crop = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    text_tokens = 64
    report = count_flops(config, PrefillTokens.from_counts(per_crop, text_tokens, per_crop), "none")
    with torch.device("meta"):
        lm = AutoModel.from_config(config.text_config)
        tower = AutoModel.from_config(config.vision_config)
    t = per_crop + text_tokens
    dims = TextDims.from_config(config)
    attention = dims.layers * 4 * dims.heads * dims.head_dim * t * t
    assert report.baseline == 2 * _matrix_params(lm.layers) * t + attention
    assert report.lm_head == 2 * t * dims.hidden * dims.vocab
    vision = config.vision_config
    seq = per_crop + (vision.model_type == "clip_vision_model")
    rows = seq - 1 if config.vision_feature_select_strategy == "default" else seq
    body = getattr(tower, "vision_model", tower)  # CLIPVisionModel holds its layers directly in transformers 5
    layers = body.encoder.layers
    d = config.text_config.hidden_size
    expected_vision = (2 * _matrix_params(layers) * seq + len(layers) * 4 * seq * seq * vision.hidden_size
                       + 2 * _matrix_params(body.embeddings) * per_crop
                       + 2 * rows * (vision.hidden_size * d + d * d))
    assert report.vision == expected_vision


def test_llava_15_7b_prefill_is_about_8_5_tflops():
    report = count_flops(load_config("llava-1.5-7b"), PrefillTokens.from_counts(576, 64, 576), "none")
    assert 8.0e12 < report.baseline < 9.0e12
    assert 0.3e12 < report.vision < 0.5e12


@pytest.mark.parametrize("op", ["skip_attn_ffn", "mask_v2v", "none"])
def test_a_variant_counts_as_its_name(op):
    config = load_config("llava-v1.6-vicuna-7b")
    tokens = PrefillTokens.from_counts(2880, 64, 576, newline_tokens=48, text_before_image=35)
    variant = resolve_variant(op, 32, start_layer=12)
    by_name = count_flops(config, tokens, op, start_layer=12)
    assert count_flops(config, tokens, variant).to_dict() == by_name.to_dict()
    assert by_name.layers == variant.layers
    with pytest.raises(ValueError, match="carries its layers"):
        count_flops(config, tokens, variant, start_layer=12)
    with pytest.raises(ValueError, match="out of range"):  # a variant resolved for a deeper model
        count_flops(config, tokens, resolve_variant("skip_ffn", 40, start_layer=30))


def test_bare_text_config(tmp_path):
    path = tmp_path / "config.json"
    text = json.loads((ROOT / "analysis/configs/llava-1.5-7b.json").read_text())["text_config"]
    path.write_text(json.dumps(text))
    report = count_flops(load_config(path), PrefillTokens.from_counts(576, 64, 576), "none")
    assert report.vision is None
    assert report.baseline == count_flops(load_config("llava-1.5-7b"), PrefillTokens.from_counts(576, 64, 576)).baseline


# ----------------------------------------------------------------------------- CLI

def test_cli_json():
    cmd = [sys.executable, "-m", "analysis.flops", "--config", str(ROOT / "analysis/configs/llava-v1.6-vicuna-7b.json"),
           "--vision-tokens", "2880", "--tokens-per-crop", "576", "--newline-tokens", "5", "--text-tokens", "64",
           "--op", "skip_ffn", "--start-layer", "12", "--json"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    assert result["reduction"] == pytest.approx((result["baseline_flops"] - result["total_flops"]) / result["baseline_flops"])
    assert len(result["per_layer"]) == 32
    assert sum(layer["flops"] for layer in result["per_layer"]) == result["total_flops"]
    assert result["total_flops"] < result["baseline_flops"]
    assert result["theoretical_flops"] < result["total_flops"]
    assert result["vision_flops"] > 0 and result["lm_head_flops"] > 0
    assert result["seq_len"] == 2880 + 5 + 64
    assert [layer["ablated"] for layer in result["per_layer"]] == [i >= 12 for i in range(32)]


def test_cli_table(capsys):
    assert main(["--config", "llava-1.5-7b", "--vision-tokens", "576", "--text-tokens", "64", "--op", "skip_attn",
                 "--start-layer", "2", "--end-layer", "4"]) == 0
    out = capsys.readouterr().out
    assert "decoder executed" in out and "vision tower" in out


@pytest.mark.parametrize("args, message", [
    (["--start-layer", "32"], "start_layer=32 is out of range"),
    (["--op", "skip_everything"], "unknown op 'skip_everything'; known ops: drop_v2t, fastv, mask_v2v, none, pdrop"),
    (["--vision-tokens", "2881", "--tokens-per-crop", "576"], "not a whole number of crops"),
    (["--config", "llava-9000"], "shipped: llava-1.5-13b"),
    (["--start-layer", "4", "--end-layer", "4"], "end_layer=4 must be in 5..32"),
])
def test_cli_bad_input_is_one_line(capsys, args, message):
    base = {"--config": "llava-1.5-7b", "--vision-tokens": "576", "--text-tokens": "64"}
    for key, value in zip(args[::2], args[1::2]):
        base[key] = value
    assert main([item for pair in base.items() for item in pair]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_from_counts_places_newline_tokens_after_high_res_rows():
    layout = PrefillTokens.from_counts(3 * 4, 2, 4, newline_tokens=2, text_before_image=1, newline_as="text")
    # text, base crop (4), high-res 4 + newline, 4 + newline, text
    assert layout.vision[0].int().tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 0]
    assert layout.crops == 3 and layout.crop_shapes == (((2, 2),) * 3,)
