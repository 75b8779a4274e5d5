"""FLOPs of ProxyV (analysis.flops.proxyv): analytic == torch's counter on the real forward, and the CLI."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MODEL_SPECS, MULTI, PAIR, image

from analysis import tiny
from analysis.flops import PrefillTokens, count_flops, known_variants, load_config, main
from analysis.flops.measure import _module_names, _split, torch_flop_counter
from analysis.flops.proxyv import derive_shapes
from analysis.proxyv import apply_proxyv, proxyv_shapes
from analysis.variant import resolve_variant

ROOT = Path(__file__).resolve().parents[1]
GRID = {"image_size": 32, "patch_size": 4}  # 8x8 cells per crop
ONE = (PAIR[0],)
BATCHES = {1: ONE, 2: PAIR}  # PAIR: padded, unequal prompts and (LLaVA-NeXT) unequal, unpadded crops
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LIGHT = {"light_input_proj": "input_proj", "light_context_proj": "context_proj", "light_fuse": "fuse",
         "light_out_proj": "out_proj"}


def build(spec: str, attn: str, **proxyv):
    kind, backbone, extra = MODEL_SPECS[spec]
    model = tiny.build_model(kind, backbone, attn_implementation=attn, seed=1, **GRID, **extra)
    return apply_proxyv(model, seed=0, **proxyv)


@functools.cache
def processor(kind: str):
    proc = tiny.build_processor(kind, **GRID)
    proc.tokenizer.padding_side = "left"
    return proc


def batch_of(kind: str, samples):
    images = [image(*spec) for _, specs in samples for spec in specs]
    return processor(kind)(images=images or None, text=[t for t, _ in samples], return_tensors="pt", padding=True)


def settings(model) -> dict:
    return dict(model.config.proxyv)


def analytic(model, batch, exact: bool = True):
    """``count_flops`` of a ProxyV model's batch: with ``shapes=`` of the batch, or derived from the layout."""
    s = settings(model)
    layout = PrefillTokens.from_batch(batch, model.config, newline_tokens="text")
    options = {"reduce_factor": s["reduce_factor"], "init": s["init"], "light_width": s["light_width"]}
    if exact:
        options["shapes"] = proxyv_shapes(model.config, batch["input_ids"], batch["attention_mask"],
                                          batch.get("image_sizes"))
    return count_flops(model.config, layout, "proxyv", start_layer=s["start_layer"], **options)


def measured(model, batch):
    """FlopCounterMode on ``model(**batch)`` (counting the CPU SDPA kernel): per-module counts and the split."""
    counter = torch_flop_counter()
    with torch.no_grad(), counter:
        model(**batch)
    counts = {name: sum(by_op.values()) for name, by_op in counter.get_flop_counts().items()}
    return counts, _split(counts, _module_names(model, f"{type(model).__name__}."), counter.get_total_flops(), "flops")


def assert_exact(model, batch, report):
    counts, split = measured(model, batch)
    assert split.decoder_outside_layers == 0
    assert [layer.total for layer in report.per_layer] == list(split.per_layer)
    assert report.total == split.decoder and report.lm_head == split.lm_head and report.vision == split.vision
    prefix = f"{type(model).__name__}.model.proxyv"
    start = settings(model)["start_layer"]
    for layer, linear in zip(report.per_layer, split.components):
        got = {name: sum(groups.values()) for name, groups in layer.executed.items()}
        assert {name: got[name] for name in LINEARS} == {name: linear[name] for name in LINEARS}, layer.layer
        if not layer.ablated:  # below the start layer, or no vision cells in the batch: HF's own layer
            assert set(got) == {*LINEARS, "attn_scores", "attn_values"}
            continue
        assert layer.layer >= start
        rest = linear["attention"]  # everything in the layer beyond its own linear layers
        for name, module in LIGHT.items():
            if name not in got:  # init "none": the context-free light MLP has no such product, nor module
                assert settings(model)["init"] == "none" and not hasattr(model.model.proxyv.layers[str(layer.layer)],
                                                                         module)
                continue
            assert got[name] == counts[f"{prefix}.layers.{layer.layer}.{module}"], (layer.layer, name)
            rest -= got[name]
        if layer.layer == start and "init_key_proj" in got:
            init = counts[f"{prefix}.initializer"]
            assert got["init_key_proj"] == counts[f"{prefix}.initializer.key_proj"]
            assert got["init_logits"] + got["init_pooling"] == init - got["init_key_proj"]
            rest -= init
        # what is left: the attention kernel (and the learned splat)
        assert got["attn_scores"] + got["attn_values"] + got.get("splat", 0) == rest, layer.layer


# ----------------------------------------------------------------------------- analytic == torch counter

@pytest.mark.parametrize("start_layer, factors", [(1, {"spatial": 2, "learned": 3, "none": 3}),
                                                  (3, {"spatial": 4, "learned": 4, "none": 4})])
@pytest.mark.parametrize("init", ["spatial", "learned", "none"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("spec", ["llava-qwen2-gqa", "next-mistral-gqa"])  # LLaVA-1.5 / LLaVA-NeXT, GQA, q/k/v bias
def test_analytic_equals_torch_counter(spec, attn, init, start_layer, factors):
    model = build(spec, attn, start_layer=start_layer, reduce_factor=factors[init], init=init)
    for size, samples in BATCHES.items():
        batch = batch_of(MODEL_SPECS[spec][0], samples)
        report = analytic(model, batch)
        assert report.variant == "proxyv" and report.layers == tuple(range(start_layer, 4))
        assert [layer.ablated for layer in report.per_layer] == [i >= start_layer for i in range(4)]
        assert_exact(model, batch, report)
        assert report.total < report.baseline and report.theoretical < report.theoretical_baseline, size
        if size == 2:
            assert report.groups()["padding"] > 0  # left padding and filler slots are executed


def test_several_images_and_a_text_only_sample():
    model = build("next-llama", "sdpa", start_layer=1, reduce_factor=2, init="spatial")
    batch = batch_of("llava_next", MULTI)
    assert_exact(model, batch, analytic(model, batch))
    text_only = batch_of("llava_next", (MULTI[1],))
    report = analytic(model, text_only)  # no vision cells: ProxyV runs HF's own layers
    assert report.total == report.baseline and not any(layer.ablated for layer in report.per_layer)
    assert_exact(model, text_only, report)


@pytest.mark.parametrize("init, factor", [("spatial", 2), ("learned", 3), ("none", 3)])
def test_shapes_derived_from_a_llava15_layout_are_exact(init, factor):
    """From a layout alone (what the runner records): exact for LLaVA-1.5 single-image samples."""
    model = build("llava-llama", "eager", start_layer=2, reduce_factor=factor, init=init)
    for samples in BATCHES.values():
        batch = batch_of("llava", samples)
        layout = PrefillTokens.from_batch(batch, model.config)  # LLaVA-1.5: vision tokens are the cells
        width = settings(model)["light_width"]
        assert derive_shapes(layout, factor, init == "learned", width, proxies=init != "none") == proxyv_shapes(
            model.config, batch["input_ids"], batch["attention_mask"])
        report = analytic(model, batch, exact=False)
        assert report.to_dict() == analytic(model, batch).to_dict()
        assert_exact(model, batch, report)
    if init == "learned":  # a checkpoint's own learned count (learned_proxies) reaches the count from tokens
        counted = build("llava-llama", "eager", start_layer=2, reduce_factor=factor, init=init, learned_proxies=3)
        batch = batch_of("llava", BATCHES[2])
        report = analytic(counted, batch, exact=False)
        assert report.to_dict() == analytic(counted, batch).to_dict()
        assert_exact(counted, batch, report)
    # several images in a sample: the executed figure is still exact; the theoretical one needs shapes=
    batch = batch_of("llava", MULTI)
    derived, exact = analytic(model, batch, exact=False), analytic(model, batch)
    assert derived.total == exact.total and derived.theoretical <= exact.theoretical


def test_groups_and_theoretical_pairs():
    config = load_config("llava-1.5-7b")
    k, t = 5, 40  # text before and after one 24x24 crop; 36 proxies
    layout = PrefillTokens.from_counts(576, k + t, 576, text_before_image=k)
    report = count_flops(config, layout, "proxyv", start_layer=16, reduce_factor=4)
    layer = report.per_layer[16]
    per_pair = 2 * 32 * 128
    text_pairs = sum(range(1, k + 1)) + sum(range(k + 576 + 1, k + 576 + t + 1))
    proxy_pairs = 36 * k + 36 * 37 // 2  # the text before the image, and the proxies up to themselves
    assert layer.theoretical["attn_scores"] == {"vision": per_pair * proxy_pairs, "text": per_pair * text_pairs}
    assert layer.executed["attn_scores"] == {"vision": per_pair * 36 * (621 + 36), "text": per_pair * 45 * (621 + 36),
                                             "padding": 0}
    assert layer.executed["q_proj"]["vision"] * 45 == layer.executed["q_proj"]["text"] * 36
    assert set(report.components()) >= {"light_input_proj", "light_context_proj", "light_fuse", "light_out_proj"}
    learned = count_flops(config, layout, "proxyv", start_layer=16, reduce_factor=4, init="learned")
    assert {"splat", "init_key_proj", "init_logits", "init_pooling"} <= set(learned.per_layer[16].executed)
    assert "init_key_proj" not in learned.per_layer[17].executed and "splat" in learned.per_layer[17].executed
    assert sum(report.groups().values()) == report.total


def test_no_proxies_counts_the_text_rows_and_the_light_mlp():
    """init "none" (paper Table 2): queries are the 45 text rows over the 621 tokens; each vision token costs
    only W_in and W_out of the light MLP."""
    config = load_config("llava-1.5-7b")
    k, t = 5, 40
    layout = PrefillTokens.from_counts(576, k + t, 576, text_before_image=k)
    report = count_flops(config, layout, "proxyv", start_layer=16, init="none")
    layer = report.per_layer[16]
    per_pair, D, I = 2 * 32 * 128, 4096, 1024
    text_pairs = sum(range(1, k + 1)) + sum(range(k + 576 + 1, k + 576 + t + 1))
    assert layer.theoretical["attn_scores"] == {"vision": 0, "text": per_pair * text_pairs}
    assert layer.executed["attn_scores"] == {"vision": 0, "text": per_pair * 45 * 621, "padding": 0}
    assert layer.executed["q_proj"] == {"vision": 0, "text": 2 * 45 * D * D, "padding": 0}
    assert layer.executed["k_proj"]["vision"] == 2 * 576 * D * D
    assert layer.executed["light_input_proj"]["vision"] == layer.executed["light_out_proj"]["vision"] == 2 * 576 * D * I
    assert set(layer.executed) == {"q_proj", "k_proj", "v_proj", "o_proj", "attn_scores", "attn_values", "gate_proj",
                                   "up_proj", "down_proj", "light_input_proj", "light_out_proj"}
    assert report.per_layer[17].executed == layer.executed  # no start-layer work (no proxies to make)
    spatial = count_flops(config, layout, "proxyv", start_layer=16, reduce_factor=4)
    assert report.total < spatial.total  # no proxy rows, no context / fuse products


@pytest.mark.parametrize("init", ["spatial", "learned", "none"])
def test_a_variant_counts_as_its_name(init):
    config = load_config("llava-1.5-7b")
    tokens = PrefillTokens.from_counts(576, 64, 576, text_before_image=5)
    variant = resolve_variant("proxyv", 32, start_layer=16, params={"reduce_factor": 4, "init": init})
    by_name = count_flops(config, tokens, "proxyv", start_layer=16, reduce_factor=4, init=init)
    assert count_flops(config, tokens, variant).to_dict() == by_name.to_dict()
    # a trained checkpoint's variant and the shapes its batch recorded
    model = build("next-llama", "sdpa", start_layer=1, reduce_factor=2, init=init)
    batch = batch_of("llava_next", PAIR)
    s = settings(model)
    variant = resolve_variant("proxyv", 4, start_layer=1, params={k: s[k] for k in ("reduce_factor", "init", "light_width")})
    shapes = proxyv_shapes(model.config, batch["input_ids"], batch["attention_mask"], batch["image_sizes"])
    tokens = PrefillTokens.from_batch(batch, model.config, newline_tokens="text")
    report = count_flops(model.config, tokens, variant, shapes=shapes)
    assert report.to_dict() == analytic(model, batch).to_dict()
    assert_exact(model, batch, report)


def test_bad_input_is_a_clear_error():
    config = load_config("llava-1.5-7b")
    layout = PrefillTokens.from_counts(576, 64, 576)
    with pytest.raises(ValueError, match="through the last layer; drop end_layer=20"):
        count_flops(config, layout, "proxyv", start_layer=16, end_layer=20)
    with pytest.raises(ValueError, match="init must be one of"):
        count_flops(config, layout, "proxyv", start_layer=16, init="random")
    with pytest.raises(ValueError, match="newline tokens as text"):  # newline tokens counted as vision
        count_flops(load_config("llava-v1.6-vicuna-7b"), PrefillTokens.from_counts(2880, 64, 576, 48), "proxyv",
                    start_layer=16)
    model = build("next-llama", "sdpa", start_layer=1, reduce_factor=2)
    batch = batch_of("llava_next", ONE)
    shapes = proxyv_shapes(model.config, batch["input_ids"], batch["attention_mask"], batch["image_sizes"])
    with pytest.raises(ValueError, match="newline_tokens='text'"):
        count_flops(model.config, PrefillTokens.from_batch(batch, model.config), "proxyv", start_layer=1, shapes=shapes)
    with pytest.raises(ValueError, match="reduce_factor=4 gives 4 proxies"):
        count_flops(model.config, PrefillTokens.from_batch(batch, model.config, "text"), "proxyv", start_layer=1,
                    shapes=shapes, reduce_factor=4)


# ----------------------------------------------------------------------------- CLI

def test_cli_json_llava15_7b():
    assert "proxyv" in known_variants()
    cmd = [sys.executable, "-m", "analysis.flops", "--config", "llava-1.5-7b", "--vision-tokens", "576",
           "--text-tokens", "64", "--op", "proxyv", "--proxy-reduce", "4", "--start-layer", "16", "--json"]
    result = json.loads(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    assert result["op"] == "proxyv" and result["proxy_reduce"] == 4 and result["proxy_init"] == "spatial"
    saved = result["baseline_flops"] - result["total_flops"]
    assert result["reduction"] == pytest.approx(saved / result["baseline_flops"])
    assert sum(layer["flops"] for layer in result["per_layer"]) == result["total_flops"]
    assert [layer["ablated"] for layer in result["per_layer"]] == [i >= 16 for i in range(32)]
    assert result["reduction"] > 0.3 and result["theoretical_reduction"] > 0.3  # ProxyV from the middle layer
    assert all(layer["flops"] < 0.4 * layer["baseline_flops"] for layer in result["per_layer"][16:])
    assert result["components"]["light_fuse"] > 0


def test_cli_learned_and_next_table(capsys):
    assert main(["--config", "llava-v1.6-vicuna-7b", "--vision-tokens", "2880", "--tokens-per-crop", "576",
                 "--newline-tokens", "48", "--text-tokens", "64", "--op", "proxyv", "--proxy-init", "learned",
                 "--start-layer", "16"]) == 0
    out = capsys.readouterr().out
    assert "op proxyv, reduce 4, init learned at layers 16..31" in out and "init_key_proj" in out


def test_cli_no_proxies():
    cmd = [sys.executable, "-m", "analysis.flops", "--config", "llava-1.5-7b", "--vision-tokens", "576",
           "--text-tokens", "64", "--op", "proxyv", "--proxy-init", "none", "--start-layer", "12", "--json"]
    result = json.loads(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    assert result["proxy_init"] == "none" and "light_fuse" not in result["components"]
    # 0.449 here (decoder, 576 vision + 64 text tokens); the paper reports about -50% at L12 on a 7B model
    assert result["components"]["light_input_proj"] > 0 and 0.4 < result["reduction"] < 0.5


@pytest.mark.parametrize("args, message", [
    (["--proxy-reduce", "5"], "reduce_factor=5 does not divide the 24x24 crop grid"),
    (["--proxy-reduce", "4", "--end-layer", "20"], "through the last layer; drop end_layer=20"),
    (["--newline-as", "vision"], "ProxyV computes newline tokens as text"),
    (["--op", "skip_ffn", "--proxy-reduce", "4"], "--proxy-reduce applies to --op proxyv only"),
])
def test_cli_bad_input_is_one_line(capsys, args, message):
    base = {"--config": "llava-1.5-7b", "--text-tokens": "64", "--op": "proxyv", "--start-layer": "16"}
    for key, value in zip(args[::2], args[1::2]):
        base[key] = value
    assert main([item for pair in base.items() for item in pair]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
