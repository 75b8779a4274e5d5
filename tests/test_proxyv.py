"""ProxyV: equals an independent reference, generate() == recomputation, batch == alone, save/load, errors."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from conftest import MODEL_SPECS, MULTI, PAIR, greedy_recomputation, image, position_ids
from proxyv_reference import proxyv_reference_logits

from analysis import tiny
from analysis.proxyv import apply_proxyv, load_proxyv, proxyv_parameters, proxyv_shapes

# 8x8 patch grid per crop, so reduce factors 2 and 4 both divide it.
GRID = {"image_size": 32, "patch_size": 4}
INITS = ["spatial", "learned", "none"]  # "none": no proxies, the context-free light MLP (paper Table 2)
STEPS = 4


def build(spec: str, attn: str = "sdpa", **proxyv):
    """A fresh tiny model of ``spec`` with ProxyV, its new parameters randomised so that every one matters."""
    kind, backbone, extra = MODEL_SPECS[spec]
    model = tiny.build_model(kind, backbone, attn_implementation=attn, seed=1, **GRID, **extra)
    apply_proxyv(model, seed=0, **proxyv)
    with torch.no_grad():
        for name, p in model.model.proxyv.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else torch.randn_like(p) * 0.3)
    return model


@functools.cache
def processor(kind: str):
    proc = tiny.build_processor(kind, **GRID)
    proc.tokenizer.padding_side = "left"
    return proc


def batch_of(kind: str, samples=PAIR):
    images = [image(*spec) for _, specs in samples for spec in specs]
    return processor(kind)(images=images or None, text=[t for t, _ in samples], return_tensors="pt", padding=True)


def assert_matches_reference(model, batch):
    positions = position_ids(batch["attention_mask"])  # as generate() makes them for left padding
    with torch.no_grad():
        logits = model(**batch, position_ids=positions).logits
    for b, want in enumerate(proxyv_reference_logits(model, batch, position_ids=positions)):
        got = logits[b][batch["attention_mask"][b].bool()]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("start_layer,reduce_factor,attn", [(1, 2, "sdpa"), (3, 4, "eager")])
def test_matches_reference(spec, init, attn, start_layer, reduce_factor):
    model = build(spec, attn, start_layer=start_layer, reduce_factor=reduce_factor, init=init)
    assert_matches_reference(model, batch_of(MODEL_SPECS[spec][0]))


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("kind_spec", ["llava-llama", "next-llama"])
def test_several_images_and_a_text_only_sample(kind_spec, init):
    model = build(kind_spec, start_layer=0, reduce_factor=2, init=init)
    assert_matches_reference(model, batch_of(MODEL_SPECS[kind_spec][0], MULTI))


@pytest.mark.parametrize("init, counts", [("spatial", (16, 12, 12, 12, 12)), ("none", (0, 0, 0, 0, 0))])
def test_unpadded_crops_have_missing_and_partial_proxies(init, counts):
    """(64, 40) in AnyRes drops 3 of 8 columns of each high-res crop: f=2 loses a block column (spatial);
    without proxies (none) the kept cells are exactly the vision rows."""
    model = build("next-llama", start_layer=1, reduce_factor=2, init=init)
    batch = batch_of("llava_next", (PAIR[1],))
    shapes = proxyv_shapes(model.config, batch["input_ids"], batch["attention_mask"], batch["image_sizes"])
    assert shapes.counts == ((counts,),)
    assert shapes.proxies == sum(counts) and shapes.vision_rows == 64 + 4 * 40
    assert shapes.init == init
    assert_matches_reference(model, batch)


@pytest.mark.parametrize("attn,init", [("sdpa", "spatial"), ("eager", "learned"), ("sdpa", "none"), ("eager", "none")])
def test_generate_with_cache_equals_full_recomputation(spec, attn, init):
    model = build(spec, attn, start_layer=2, reduce_factor=2, init=init)
    batch = batch_of(MODEL_SPECS[spec][0])
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True,
                             suppress_tokens=[model.config.image_token_id])
    # Proxies never enter the cache: it holds exactly the sequence.
    assert out.past_key_values.get_seq_length() == out.sequences.shape[1] - 1
    expected_ids, expected_logits = greedy_recomputation(model, batch, STEPS)
    assert torch.equal(out.sequences, expected_ids)
    for got, want in zip(out.logits, expected_logits):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", INITS)
def test_batch_equals_each_sample_alone(spec, init):
    kind = MODEL_SPECS[spec][0]
    model = build(spec, start_layer=1, reduce_factor=4, init=init)
    batch = batch_of(kind)
    with torch.no_grad():
        batched = model(**batch, position_ids=position_ids(batch["attention_mask"])).logits
        for b, sample in enumerate(PAIR):
            alone = model(**batch_of(kind, (sample,))).logits[0]
            torch.testing.assert_close(batched[b][batch["attention_mask"][b].bool()], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["spatial", "none"])
def test_text_only_input_runs_the_vanilla_model(init):
    kind, backbone, extra = MODEL_SPECS["next-llama"]
    vanilla = tiny.build_model(kind, backbone, seed=1, **GRID, **extra)
    model = build("next-llama", start_layer=1, reduce_factor=2, init=init)
    batch = processor(kind)(text=["USER: only text here ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, vanilla(**batch).logits)


@pytest.mark.parametrize("init", INITS)
def test_proxyv_parameters_receive_gradients(init):
    model = build("llava-llama", start_layer=1, reduce_factor=2, init=init)
    batch = batch_of("llava")
    model(**batch).logits.square().mean().backward()
    params = dict(model.model.proxyv.named_parameters())
    assert {id(p) for p in proxyv_parameters(model)} == {id(p) for p in params.values()}
    for name, p in params.items():
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("spec,init", [("llava-qwen2-gqa", "learned"), ("next-llama", "spatial"), ("next-llama", "none")])
def test_save_and_load_give_identical_logits(tmp_path, spec, init):
    model = build(spec, start_layer=2, reduce_factor=4, init=init)
    batch = batch_of(MODEL_SPECS[spec][0])
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the ProxyV keys are expected
        loaded = load_proxyv(tmp_path, attn_implementation="sdpa")
    assert loaded.config.proxyv == model.config.proxyv
    assert loaded.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_loading_a_plain_checkpoint_is_an_error(tmp_path):
    tiny.build_model("llava", **GRID).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a ProxyV checkpoint"):
        load_proxyv(tmp_path)


def test_bad_input_gives_one_clear_error():
    fresh = functools.partial(tiny.build_model, "llava", "llama", **GRID)  # 4 layers, 8x8 crops
    with pytest.raises(ValueError, match=r"start_layer=4 is out of range.*valid 0\.\.3"):
        apply_proxyv(fresh(), start_layer=4)
    with pytest.raises(ValueError, match=r"reduce_factor=3 does not divide the 8x8 crop grid.*\[1, 2, 4, 8\]"):
        apply_proxyv(fresh(), start_layer=1, reduce_factor=3)
    apply_proxyv(fresh(), start_layer=1, reduce_factor=3, init="learned")  # any factor: 64 // 9 = 7 proxies
    with pytest.raises(ValueError, match="init must be one of spatial, learned, none, got 'bilinear'"):
        apply_proxyv(fresh(), start_layer=1, init="bilinear")
    apply_proxyv(fresh(), start_layer=1, reduce_factor=3, init="none")  # no proxies: the factor is unused
    from analysis.families import PROXYV_INITS
    from analysis.proxyv.apply import INITS as APPLY_INITS
    assert PROXYV_INITS == APPLY_INITS == tuple(INITS)  # the runner's variant check knows every init
    with pytest.raises(TypeError, match="unsupported model class LlamaForCausalLM; supported: Llava"):
        from transformers import LlamaForCausalLM
        apply_proxyv(LlamaForCausalLM(tiny.text_config(vocab_size=32)), start_layer=1)
    flash = fresh()
    flash.config.text_config._attn_implementation = "flash_attention_2"  # as loading with it sets
    with pytest.raises(NotImplementedError, match="supported backends: eager, sdpa"):
        apply_proxyv(flash, start_layer=1)
    model = apply_proxyv(fresh(), start_layer=1)
    with pytest.raises(ValueError, match="already has ProxyV"):
        apply_proxyv(model, start_layer=2)


@pytest.mark.parametrize("init", INITS)
def test_flops_formula_equals_torch_counter(init):
    """analysis.flops.proxyv describes exactly the matrix products a ProxyV layer executes."""
    from torch.utils.flop_counter import FlopCounterMode

    from analysis.flops.proxyv import proxyv_layer_flops

    model = build("next-mistral-gqa", "eager", start_layer=2, reduce_factor=2, init=init)
    batch = batch_of("llava_next")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**batch)
    counts = counter.get_flop_counts()
    shapes = proxyv_shapes(model.config, batch["input_ids"], batch["attention_mask"], batch["image_sizes"])
    for i in (2, 3):
        measured = sum(counts[f"{type(model).__name__}.model.language_model.layers.{i}"].values())
        assert measured == sum(proxyv_layer_flops(model.config, shapes, first=i == 2).values())


def test_ablate_on_a_proxyv_model_is_a_clear_error():
    from analysis import ablate

    model = build("llava-llama", start_layer=1, reduce_factor=2)
    batch = batch_of("llava")
    with torch.no_grad():
        before = model(**batch).logits
    with pytest.raises(TypeError, match=r"ablate\(\) on a ProxyV model is not supported"), \
            ablate(model, "skip_ffn", layers=[2]):
        pass
    with torch.no_grad():  # refused before touching anything: still ProxyV
        assert torch.equal(model(**batch).logits, before)
