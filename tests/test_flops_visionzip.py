"""FLOPs of VisionZip (analysis.flops.visionzip): analytic == torch's counter on the real forward of tiny LLaVA
models under ablate(model, "visionzip", ...), the decoder == the baseline on an independently shortened batch,
hand-computed vision extras, the runner's per-sample path and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MULTI, PAIR, make_batch, model_for

from analysis.ablation import ablate
from analysis.flops import (
    PrefillTokens,
    count_flops,
    load_config,
    main,
    mean_flops,
    vision_flops,
)
from analysis.flops.measure import _module_names, _split, torch_flop_counter
from analysis.flops.variants import reduction_flops
from analysis.flops.visionzip import ZIP_COMPONENTS, VisionZipFlops
from analysis.variant import resolve_variant

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = ((4, 3), (1, 0), (6, 1), (2, 14))  # tiny towers: 16 patches + CLS, 16 placeholders per image


def measured(model, batch, dominant, contextual):
    """FlopCounterMode on ``model(**batch)`` under VisionZip: the block's state, logits, per-module counts, split."""
    counter = torch_flop_counter()
    with torch.no_grad(), ablate(model, "visionzip", dominant=dominant, contextual=contextual) as state, counter:
        logits = model(**batch).logits
    counts = {name: sum(by_op.values()) for name, by_op in counter.get_flop_counts().items()}
    names = _module_names(model, f"{type(model).__name__}.")
    return state, logits, counts, _split(counts, names, counter.get_total_flops(), "flops")


def feature_layer_projections(model, counts) -> int:
    """torch's count of the feature layer's q_proj + k_proj modules (the tower's own calls and VisionZip's)."""
    prefix = f"{type(model).__name__}."
    name_of = {id(m): prefix + n for n, m in model.named_modules()}
    tower = model.model.vision_tower
    layers = tower.vision_model.encoder.layers if hasattr(tower, "vision_model") else tower.encoder.layers
    attn = layers[model.config.vision_feature_layer % (len(layers) + 1) - 1].self_attn
    return counts.get(name_of[id(attn.q_proj)], 0) + counts.get(name_of[id(attn.k_proj)], 0)


def assert_exact(model, batch, dominant, contextual):
    tokens = PrefillTokens.from_batch(batch, model.config)  # the ORIGINAL prompt: the count shortens it
    report = count_flops(model.config, tokens, "visionzip", dominant=dominant, contextual=contextual)
    state, logits, counts, split = measured(model, batch, dominant, contextual)
    # the decoder, layer by layer and in total, and the LM head over the shortened forward's rows
    assert split.decoder_outside_layers == 0
    assert [layer.total for layer in report.per_layer] == list(split.per_layer)
    for layer, components in zip(report.per_layer, split.components):
        got = {name: sum(groups.values()) for name, groups in layer.executed.items()}
        assert {**{k: got[k] for k in components if k != "attention"},
                "attention": got["attn_scores"] + got["attn_values"]} == components, layer.layer
    assert report.total == split.decoder and report.lm_head == split.lm_head
    # the vision side: the tower and the projector modules; VisionZip's own q / k projections run the feature
    # layer's modules directly, its score row, cosine and merge matmuls run outside any module
    parts = report.vision_parts
    assert parts["tower"] + parts["projector"] == split.vision
    vision = model.config.vision_config
    rows = (vision.image_size // vision.patch_size) ** 2 + 1  # CLS + patches of a crop
    tower_qk = 2 * 2 * rows * vision.hidden_size ** 2 * tokens.crops  # the tower's own q_proj and k_proj calls
    assert feature_layer_projections(model, counts) == tower_qk + parts["zip_q_proj"] + parts["zip_k_proj"]
    outside = split.total - split.decoder - split.lm_head - split.vision
    assert outside == parts["visionzip"] == sum(parts[name] for name in ZIP_COMPONENTS)
    assert report.vision == split.total - split.decoder - split.lm_head
    # the shortened (B, T') batch is the execution's
    short = reduction_flops(resolve_variant("visionzip", 4, params={"dominant": dominant, "contextual": contextual})) \
        .with_config(model.config).shortened(tokens)
    assert logits.shape[:2] == (short.batch, short.seq_len)
    if state.kept_positions is not None:
        executed = independently_shortened(batch, state.kept_positions, model.config)
        assert torch.equal(short.valid, executed.valid) and torch.equal(short.vision, executed.vision)
    return report, state


def independently_shortened(batch, kept_positions, config) -> PrefillTokens:
    """The decoder's prefill rebuilt from the execution's own kept slots (``z.kept_positions``, -1: filler)."""
    tokens = PrefillTokens.from_batch(batch, config)
    slot = kept_positions.clamp(min=0)
    real = kept_positions >= 0
    vision = torch.gather(tokens.vision, 1, slot) & real
    valid = torch.gather(tokens.valid, 1, slot) & real
    return PrefillTokens(vision, valid, tokens.crop_shapes)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("spec", ["llava-llama", "llava-qwen2-gqa"])
@pytest.mark.parametrize("samples", [PAIR, MULTI], ids=["padded-pair", "two-images-and-text-only"])
def test_analytic_equals_torch_counter(spec, attn, samples):
    model = model_for(spec, attn)
    batch = make_batch("llava", samples)
    for dominant, contextual in BUDGETS:
        report, state = assert_exact(model, batch, dominant, contextual)
        if dominant + contextual < 16:  # (MULTI: the text-only sample is the longest, T' = T, executed unchanged)
            assert report.total <= report.baseline and report.theoretical < report.theoretical_baseline
            assert (report.total < report.baseline) == (samples is PAIR)
        else:  # every placeholder kept: the decoder runs the original sequence
            assert report.total == report.baseline and report.theoretical == report.theoretical_baseline
        crops, d = batch["pixel_values"].shape[0], model.config.text_config.hidden_size
        dv = model.config.vision_config.hidden_size
        assert report.vision_parts["projector"] == crops * (dominant + contextual) * (2 * dv * d + 2 * d * d)
        assert len(state.selected) == sum(len(images) for _, images in samples)
        if contextual == 0:
            assert report.vision_parts["zip_similarity"] == report.vision_parts["zip_merge"] == 0
        if samples is MULTI:  # sample 0 loses 2·(16 - D - C) placeholders, the text-only one none: fillers
            assert report.groups()["padding"] > 0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_text_only_batch_runs_the_baseline():
    model = model_for("llava-llama", "sdpa")
    batch = make_batch("llava", (MULTI[1], ("USER: Hi ASSISTANT:", [])))
    report, state = assert_exact(model, batch, 4, 3)
    assert report.total == report.baseline and report.vision == 0 and state.kept_positions is None


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_decoder_is_the_baseline_on_an_independently_shortened_batch(attn, padding_side):
    model = model_for("llava-qwen2-gqa", attn)
    for samples in (PAIR, MULTI):
        batch = make_batch("llava", samples, padding_side=padding_side)
        tokens = PrefillTokens.from_batch(batch, model.config)
        with torch.no_grad(), ablate(model, "visionzip", dominant=4, contextual=3) as state:
            model(**batch)
        short = independently_shortened(batch, state.kept_positions, model.config)
        zipped = count_flops(model.config, tokens, "visionzip", dominant=4, contextual=3)
        plain = count_flops(model.config, short, "none")
        assert zipped.per_layer == plain.per_layer  # executed and theoretical, by component and group
        assert zipped.lm_head == plain.lm_head and zipped.baseline == count_flops(model.config, tokens).baseline
        assert int((short.vision & short.valid).sum()) == 7 * tokens.crops  # D + C per image


def test_published_config_by_hand():
    """LLaVA-1.5-7B, 576 vision + 64 text, D = 54, C = 10: the decoder is the baseline of 64 vision + 64 text;
    the extras and the projector by hand."""
    config = load_config("llava-1.5-7b")
    tokens = PrefillTokens.from_counts(576, 64, 576)
    report = count_flops(config, tokens, "visionzip", dominant=54, contextual=10)
    short = count_flops(config, PrefillTokens.from_counts(64, 64, 64), "none")
    assert report.per_layer == short.per_layer and report.lm_head == short.lm_head
    assert report.baseline == count_flops(config, tokens).baseline
    assert report.total / report.baseline == pytest.approx(0.1960, abs=1e-4)
    assert report.theoretical / report.theoretical_baseline == pytest.approx(0.1980, abs=1e-4)
    dv, heads, n1, d = 1024, 16, 577, 4096
    others = n1 - 54 - 10
    assert report.vision_parts == {
        "tower": vision_flops(config, 1) - (2 * 576 * dv * d + 2 * 576 * d * d),
        "projector": 2 * 64 * dv * d + 2 * 64 * d * d,
        "zip_q_proj": 2 * dv * dv, "zip_k_proj": 2 * n1 * dv * dv, "zip_cls_scores": 2 * heads * n1 * (dv // heads),
        "zip_similarity": 2 * others * (dv // heads) * 10, "zip_merge": 2 * 10 * others * dv,
        "visionzip": 2 * dv * dv + 2 * n1 * dv * dv + 2 * n1 * dv + 2 * others * 64 * 10 + 2 * 10 * others * dv,
    }
    assert report.vision == sum(report.vision_parts[k] for k in ("tower", "visionzip", "projector"))
    assert report.to_dict()["vision_parts"] == report.vision_parts
    assert "vision_parts" not in count_flops(config, tokens, "fastv", start_layer=3).to_dict()


def test_errors():
    config = load_config("llava-1.5-7b")
    tokens = PrefillTokens.from_counts(576, 64, 576)
    with pytest.raises(ValueError, match="exceeds the 576 image tokens per image"):
        count_flops(config, tokens, "visionzip", dominant=570, contextual=7)
    with pytest.raises(ValueError, match="exceeds the 576 patches"):
        count_flops(config, tokens, "visionzip", dominant=570, contextual=8)
    with pytest.raises(ValueError, match="dominant must be an integer >= 1"):
        count_flops(config, tokens, "visionzip", dominant=0, contextual=8)
    with pytest.raises(ValueError, match="vision tower"):
        count_flops(config.text_config, tokens, "visionzip")
    with pytest.raises(ValueError, match="takes no layers"):
        count_flops(config, tokens, "visionzip", start_layer=2)
    with pytest.raises(ValueError, match="not whole images of 576 placeholders"):
        count_flops(config, PrefillTokens.from_counts(576, 64, 288), "visionzip")  # two "crops" of one image
    with pytest.raises(ValueError, match="model config"):
        VisionZipFlops(4, 3).shortened(tokens)


def test_the_runner_per_sample_path():
    """mean_flops (what the runner records): each sample's recorded mask, unpadded, batch 1, logits at the last."""
    model = model_for("llava-llama", "sdpa")
    variant = resolve_variant("visionzip", 4, params={"dominant": 6, "contextual": 2})
    batch = make_batch("llava", MULTI)
    tokens = PrefillTokens.from_batch(batch, model.config)
    prompts = [{"mask": "".join("v" if v else "t" for v in tokens.vision[b][tokens.valid[b]].tolist()),
                "crop_shapes": tokens.crop_shapes[b]} for b in range(2)]
    flops = mean_flops(model.config, prompts, variant)
    alone = [count_flops(model.config, PrefillTokens.from_batch(make_batch("llava", (s,)), model.config), variant,
                         lm_head="last") for s in MULTI]
    assert flops["total"] == sum(r.total for r in alone) / 2 and flops["vision"] == sum(r.vision for r in alone) / 2
    assert flops["baseline"] == sum(r.baseline for r in alone) / 2 and 0 < flops["reduction"] < 1
    # sample 0 alone == what executes on it alone
    report, _ = assert_exact(model, make_batch("llava", MULTI[:1]), 6, 2)
    assert report.total == alone[0].total and report.vision == alone[0].vision


# ----------------------------------------------------------------------------- CLI

def run_cli(*args: str) -> dict:
    cmd = [sys.executable, "-m", "analysis.flops", "--config", "llava-1.5-7b", "--vision-tokens", "576",
           "--text-tokens", "64", *args, "--json"]
    return json.loads(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout)


def test_cli_json_and_table(capsys):
    out = run_cli("--op", "visionzip", "--dominant", "54", "--contextual", "10")
    config = load_config("llava-1.5-7b")
    report = count_flops(config, PrefillTokens.from_counts(576, 64, 576), "visionzip", dominant=54, contextual=10)
    assert out["op"] == "visionzip" and out["layers"] == [] and (out["dominant"], out["contextual"]) == (54, 10)
    assert out["total_flops"] == report.total and out["baseline_flops"] == report.baseline
    assert out["reduction"] == pytest.approx(0.8040, abs=1e-4)
    assert out["shortened"] == {"seq_len": 128, "vision": 64, "text": 64}
    assert out["vision_flops"] == report.vision and out["vision_parts"] == report.vision_parts
    assert out["baseline_vision_flops"] == vision_flops(config, 1) > out["vision_flops"]
    assert out["lm_head_flops"] == 2 * 128 * 4096 * 32064
    assert run_cli("--op", "visionzip")["total_flops"] == out["total_flops"]  # defaults 54, 10
    assert main(["--config", "llava-1.5-7b", "--text-tokens", "64", "--op", "visionzip", "--dominant", "54",
                 "--contextual", "10"]) == 0
    table = capsys.readouterr().out
    assert "op visionzip, dominant 54, contextual 10 before the LLM, 640 tokens" in table
    assert "decoder sequence:     128 tokens (64 vision, 64 text) instead of 640" in table
    assert "visionzip selection + merge 0.0012" in table


@pytest.mark.parametrize("args, message", [
    (["--op", "visionzip", "--dominant", "0"], "visionzip: dominant must be an integer >= 1, got 0"),
    (["--op", "visionzip", "--contextual", "-1"], "visionzip: contextual must be an integer >= 0, got -1"),
    (["--op", "visionzip", "--dominant", "570", "--contextual", "7"], "exceeds the 576 image tokens per image"),
    (["--op", "visionzip", "--dominant", "570", "--contextual", "8"], "exceeds the 576 patches + CLS"),
    (["--dominant", "54"], "--dominant applies to --op visionzip only, not --op none"),
    (["--op", "fastv", "--start-layer", "3", "--dominant", "5", "--contextual", "1"],
     "--dominant and --contextual apply to --op visionzip only, not --op fastv"),
    (["--op", "visionzip", "--start-layer", "2"], "it takes no --start-layer / --end-layer"),
    (["--op", "visionzip", "--end-layer", "20"], "it takes no --start-layer / --end-layer"),
    (["--op", "visionzip", "--layers", "8"], "--layers applies to --op fastv / pdrop only, not --op visionzip"),
    (["--op", "visionzip", "--keep", "0.5"], "--keep applies to --op fastv / pdrop only, not --op visionzip"),
    (["--op", "visionzip", "--newline-as", "text"], "drop --newline-as text"),
])
def test_cli_bad_input_is_one_line(capsys, args, message):
    assert main(["--config", "llava-1.5-7b", "--text-tokens", "64", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


# ----------------------------------------------------------------------------- LLaVA-NeXT: every crop zipped

@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("spec", ["next-llama", "next-mistral-gqa"])
@pytest.mark.parametrize("samples", [PAIR, MULTI], ids=["padded-pair", "two-images-and-text-only"])
def test_next_analytic_equals_torch_counter(spec, attn, samples):
    """Per image: the tower on every crop, the extras per crop, the projector on crops·(D + C) rows, the decoder
    on crops·(D + C) vision tokens (no newline token); several images of one sample told apart by their sizes."""
    model = model_for(spec, attn)
    batch = make_batch("llava_next", samples)
    tokens = PrefillTokens.from_batch(batch, model.config)
    for dominant, contextual in ((4, 3), (1, 0), (2, 3)):
        report, state = assert_exact(model, batch, dominant, contextual)
        assert state.crops == [len(c) for c in tokens.crop_shapes if c] or samples is MULTI  # one image a sample
        assert sum(state.crops) == tokens.crops
        assert len(state.selected) == tokens.crops  # every crop zipped
        short = independently_shortened(batch, state.kept_positions, model.config)
        assert int((short.vision & short.valid).sum()) == tokens.crops * (dominant + contextual)
        assert report.per_layer == count_flops(model.config, short, "none").per_layer
        assert report.theoretical < report.theoretical_baseline


def test_next_published_config():
    """llava-v1.6-vicuna-7b, 5 crops (2880 crop + 48 newline tokens) + 64 text: 5·64 vision tokens remain."""
    config = load_config("llava-v1.6-vicuna-7b")
    tokens = PrefillTokens.from_counts(2880, 64, 576, newline_tokens=48)
    report = count_flops(config, tokens, "visionzip", dominant=54, contextual=10)
    assert report.per_layer == count_flops(config, PrefillTokens.from_counts(320, 64, 64), "none").per_layer
    assert report.vision_parts["projector"] == 5 * (2 * 64 * 1024 * 4096 + 2 * 64 * 4096 * 4096)
    assert report.vision_parts["tower"] == vision_flops(config, 5) - 5 * (2 * 576 * 1024 * 4096 + 2 * 576 * 4096 ** 2)
    with pytest.raises(ValueError, match="exceeds the 576 patches \\+ CLS"):
        count_flops(config, tokens, "visionzip", dominant=570, contextual=8)
