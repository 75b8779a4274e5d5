"""Token reduction on a ProxyV model (learned proxies): equals an independent reference, batched, cached."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_SPECS, MULTI, PAIR, position_ids
from proxyv_reduction_reference import reference_batch, reference_greedy
from test_proxyv import batch_of, build

from analysis import ablate

L = 3  # ProxyV's start layer; the tiny backbones have 4 layers
# name -> (op, ablate() keywords, (method, layers, keep, positions) for the reference); every drop <= L
VARIANTS = {
    "fastv": ("fastv", {"start_layer": 2, "keep": 0.5}, ("fastv", [2], 0.5, "original")),
    "fastv-at-L": ("fastv", {"start_layer": L, "keep": 0.3}, ("fastv", [L], 0.3, "original")),
    "pdrop-renumber": ("pdrop", {"layers": [1, L], "keep": 0.5}, ("pdrop", [1, L], 0.5, "renumber")),
    "pdrop-original": ("pdrop", {"layers": [1, 2], "keep": 0.6, "positions": "original"},
                       ("pdrop", [1, 2], 0.6, "original")),
}
STEPS = 3


def model_of(spec: str, attn: str = "sdpa"):
    return build(spec, attn, start_layer=L, reduce_factor=2, init="learned")


def reduced(model, name):
    op, kwargs, _ = VARIANTS[name]
    return ablate(model, op, **kwargs)


def assert_matches_reference(model, batch, name):
    forward = {"position_ids": position_ids(batch["attention_mask"])}
    expected = reference_batch(model, batch, *VARIANTS[name][2], **forward)
    with torch.no_grad(), reduced(model, name) as state:
        logits = model(**batch, **forward).logits
    assert logits.shape[1] == max(len(alive) for _, alive in expected)
    for b, (ref, alive) in enumerate(expected):
        torch.testing.assert_close(logits[b, -len(alive):], ref, atol=1e-5, rtol=0)
        if state.kept_vision:
            assert set(state.kept_vision[-1][b].tolist()) <= set(alive.tolist())
    return logits


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_matches_reference(spec, attn, name):
    model = model_of(spec, attn)
    assert_matches_reference(model, batch_of(MODEL_SPECS[spec][0]), name)


@pytest.mark.parametrize("kind_spec", ["llava-llama", "next-llama"])
def test_several_images_and_a_text_only_sample(kind_spec):
    model = model_of(kind_spec)
    batch = batch_of(MODEL_SPECS[kind_spec][0], MULTI)
    for name in ("fastv", "pdrop-renumber"):
        logits = assert_matches_reference(model, batch, name)
        with torch.no_grad():
            alone = model(**batch_of(MODEL_SPECS[kind_spec][0], MULTI[1:])).logits[0]  # text only: vanilla
        torch.testing.assert_close(logits[1, -len(alone):], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["fastv", "pdrop-renumber"])
@pytest.mark.parametrize("spec_name", ["llava-qwen2-gqa", "next-llama"])
def test_padded_batch_equals_each_sample_alone(spec_name, name):
    kind = MODEL_SPECS[spec_name][0]
    model = model_of(spec_name)
    batch = batch_of(kind, PAIR)
    with torch.no_grad(), reduced(model, name):
        batched = model(**batch, position_ids=position_ids(batch["attention_mask"])).logits
        for b, sample in enumerate(PAIR):
            alone = model(**batch_of(kind, (sample,))).logits[0]
            torch.testing.assert_close(batched[b, -len(alone):], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["fastv", "pdrop-renumber"])
@pytest.mark.parametrize("spec_name,attn", [("llava-qwen2-gqa", "eager"), ("next-llama", "sdpa")])
def test_generate_with_cache_equals_stepwise_recomputation(spec_name, attn, name):
    """generate() with a KV cache equals recomputing prompt + generated tokens each step (ranking fixed at
    the prompt's last token); proxies never enter the cache."""
    model = model_of(spec_name, attn)
    batch = batch_of(MODEL_SPECS[spec_name][0])
    image_id = model.config.image_token_id
    with torch.no_grad(), reduced(model, name):
        out = model.generate(**batch, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, suppress_tokens=[image_id])
    ids, logits = reference_greedy(model, batch, *VARIANTS[name][2], STEPS,
                                   suppressed=[image_id, model.generation_config.eos_token_id])
    assert torch.equal(out.sequences, ids)
    for got, want in zip(out.logits, logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_proxyv_is_intact_after_exit():
    model = model_of("next-llama")
    batch = batch_of("llava_next")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    forwards = {i: vars(layer).get("forward") for i, layer in enumerate(model.model.language_model.layers)}
    with torch.no_grad():
        before = model(**batch).logits
        for name in VARIANTS:
            with reduced(model, name):
                reduced_logits = model(**batch).logits
        with pytest.raises(KeyError), reduced(model, "fastv"):
            raise KeyError("boom")
        after = model(**batch).logits
    assert reduced_logits.shape[1] < before.shape[1]
    assert torch.equal(before, after)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {i: vars(layer).get("forward") for i, layer in enumerate(model.model.language_model.layers)} == forwards
    assert model.model.proxyv.host is None


def test_unsupported_combinations_are_one_clear_error():
    spatial = build("llava-llama", start_layer=L, reduce_factor=2, init="spatial")
    with pytest.raises(ValueError, match="spatial proxies: token reduction breaks the crop grid"), \
            ablate(spatial, "fastv", start_layer=2, keep=0.5):
        pass
    proxy_free = build("llava-llama", start_layer=L, init="none")
    with pytest.raises(ValueError, match=r"fastv on a ProxyV model without proxies \(init='none'\): not supported"), \
            ablate(proxy_free, "fastv", start_layer=2, keep=0.5):
        pass
    early = build("llava-llama", start_layer=1, reduce_factor=2, init="learned")
    with pytest.raises(ValueError, match=r"fastv drops vision tokens before layer 2, after ProxyV's start layer 1: "
                                         r"every drop must come at or before layer 1"), \
            ablate(early, "fastv", start_layer=2, keep=0.5):
        pass
    with pytest.raises(ValueError, match=r"pdrop drops vision tokens before layer 3, after ProxyV's start layer 1"), \
            ablate(early, "pdrop", layers=[1, 3], keep=0.5):
        pass
    with pytest.raises(TypeError, match=r"ablate\(\) on a ProxyV model is not supported"), \
            ablate(early, "skip_ffn", layers=[2]):
        pass


def test_a_variant_naming_a_proxyv_checkpoint_checks_the_model():
    plain = build("llava-llama", start_layer=L, reduce_factor=2, init="learned")
    with torch.no_grad(), ablate(plain, "fastv", start_layer=2, keep=0.5, proxyv=L):  # the model it names
        plain(**batch_of("llava"))
    with pytest.raises(ValueError, match="this model's ProxyV starts at layer 3"), \
            ablate(plain, "fastv", start_layer=2, keep=0.5, proxyv=2):
        pass
    from conftest import model_for

    with pytest.raises(TypeError, match="this model has no ProxyV"), \
            ablate(model_for("llava-llama"), "fastv", start_layer=2, keep=0.5, proxyv=L):
        pass


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind_spec", ["llava-qwen2-gqa", "next-llama"])
@pytest.mark.parametrize("samples", [PAIR, MULTI], ids=["padded", "multi-and-text-only"])
def test_visionzip_matches_reference(kind_spec, attn, samples):
    from proxyv_reduction_reference import visionzip_reference_batch

    model = model_of(kind_spec, attn)
    batch = batch_of(MODEL_SPECS[kind_spec][0], samples)
    expected = visionzip_reference_batch(model, batch, 10, 4)
    with torch.no_grad(), ablate(model, "visionzip", dominant=10, contextual=4) as z:
        logits = model(**batch, position_ids=position_ids(batch["attention_mask"])).logits
    for b, (ref, where) in enumerate(expected):
        assert z.kept_positions[b][-len(where):].tolist() == where
        torch.testing.assert_close(logits[b, -len(where):], ref, atol=1e-5, rtol=0)
    assert model.model.proxyv.host is None


def test_visionzip_generate_with_cache_on_proxyv():
    """generate() under VisionZip on a ProxyV model equals greedy recomputation of the shortened prompt."""
    model = model_of("next-llama")
    batch = batch_of("llava_next")
    image_id = model.config.image_token_id
    with torch.no_grad(), ablate(model, "visionzip", dominant=10, contextual=4):
        out = model.generate(**batch, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, suppress_tokens=[image_id])
        steps = []
        ids, mask = batch["input_ids"], batch["attention_mask"]
        for step in range(STEPS):  # recompute the whole (shortened inside the block) sequence each step
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"],
                           image_sizes=batch["image_sizes"], position_ids=position_ids(mask), use_cache=False).logits
            steps.append(logits[:, -1])
            ids = torch.cat([ids, out.sequences[:, ids.shape[1]:ids.shape[1] + 1]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    for got, want in zip(out.logits, steps, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_visionzip_on_spatial_proxyv_is_refused():
    spatial = build("llava-llama", start_layer=L, reduce_factor=2, init="spatial")
    with pytest.raises(ValueError, match="visionzip on a ProxyV model with spatial proxies"), \
            ablate(spatial, "visionzip", dominant=10, contextual=4):
        pass
    proxy_free = build("llava-llama", start_layer=L, init="none")
    with pytest.raises(ValueError, match=r"visionzip on a ProxyV model without proxies \(init='none'\)"), \
            ablate(proxy_free, "visionzip", dominant=10, contextual=4):
        pass
