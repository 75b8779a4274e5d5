"""ablate(): every operator equals an independent reference, on every tiny model class and backend."""

from __future__ import annotations

import pytest
import torch

from analysis import OPERATORS, ablate
from conftest import MODEL_SPECS, MULTI, PAIR, make_batch, model_for
from reference import reference_logits

LAYER_RANGES = {"all": range(0, 4), "late": range(2, 4), "middle": [1, 2], "one": [3]}


def assert_matches_reference(model, batch, op, layers, newline_tokens="vision"):
    expected = reference_logits(model, batch, op, layers, newline_tokens)
    with torch.no_grad(), ablate(model, op, layers=layers, newline_tokens=newline_tokens):
        logits = model(**batch).logits
    valid = batch["attention_mask"].bool()
    for b, ref in enumerate(expected):
        torch.testing.assert_close(logits[b][valid[b]], ref, atol=1e-5, rtol=0)  # fp32; logits are O(1)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("op", sorted(OPERATORS))
def test_every_op_matches_reference(spec, attn, op):
    model = model_for(spec, attn)
    batch = make_batch(MODEL_SPECS[spec][0])
    for layers in LAYER_RANGES.values():
        assert_matches_reference(model, batch, op, layers)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("op", sorted(OPERATORS))
def test_sliding_window_backbone(attn, op):
    model = model_for("next-mistral-window", attn)
    batch = make_batch("llava_next")
    assert batch["input_ids"].shape[1] > 2 * model.config.text_config.sliding_window
    assert_matches_reference(model, batch, op, range(1, 4))


@pytest.mark.parametrize("op", ["mask_v2v", "skip_attn_ffn", "drop_v2t"])
def test_several_images_and_a_text_only_sample(spec, op):
    model = model_for(spec)
    batch = make_batch(MODEL_SPECS[spec][0], MULTI)
    assert_matches_reference(model, batch, op, range(1, 4))


@pytest.mark.parametrize("op", ["skip_attn", "drop_v2t"])
def test_right_padding(op):
    model = model_for("llava-qwen2-gqa")
    batch = make_batch("llava", PAIR, padding_side="right")
    assert_matches_reference(model, batch, op, range(0, 4))


@pytest.mark.parametrize("newline_tokens", ["vision", "text"])
@pytest.mark.parametrize("op", ["skip_attn_ffn", "mask_v2v"])
def test_llava_next_newline_tokens_option(newline_tokens, op):
    model = model_for("next-llama")
    batch = make_batch("llava_next")
    assert_matches_reference(model, batch, op, range(1, 4), newline_tokens)


def test_newline_option_changes_the_result():
    model = model_for("next-llama")
    batch = make_batch("llava_next")
    outputs = []
    for newline_tokens in ("vision", "text"):
        with torch.no_grad(), ablate(model, "skip_attn_ffn", start_layer=1, newline_tokens=newline_tokens):
            outputs.append(model(**batch).logits)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3


def test_none_is_bit_identical_and_model_is_restored(spec):
    model = model_for(spec)
    batch = make_batch(MODEL_SPECS[spec][0])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        vanilla = model(**batch).logits
        with ablate(model, "none", layers=range(4)):
            inside = model(**batch).logits
        for op in sorted(OPERATORS):
            with ablate(model, op, start_layer=1):
                model(**batch)
        after = model(**batch).logits
    assert torch.equal(vanilla, inside)
    assert torch.equal(vanilla, after)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all("forward" not in vars(layer) for layer in model.model.language_model.layers)
    assert not model.model._forward_pre_hooks
    assert "get_image_features" not in vars(model.model)


def test_ops_really_change_the_output():
    model = model_for("llava-llama")
    batch = make_batch("llava")
    with torch.no_grad():
        vanilla = model(**batch).logits
        for op in sorted(set(OPERATORS) - {"none"}):
            with ablate(model, op, start_layer=0):
                assert (model(**batch).logits - vanilla).abs().max() > 1e-3, op


def test_model_is_restored_after_an_exception():
    model = model_for("llava-llama")
    with pytest.raises(KeyError), ablate(model, "skip_ffn", start_layer=1):
        raise KeyError("boom")
    assert all("forward" not in vars(layer) for layer in model.model.language_model.layers)
    assert not model.model._forward_pre_hooks


def test_restores_an_existing_image_encoder_wrapper():
    """A model that already wraps get_image_features on its instance (ProxyV does) keeps its wrapper."""
    from analysis import tiny

    model = tiny.build_model("llava", "llama")
    sentinel = model.model.get_image_features
    model.model.get_image_features = sentinel  # an instance attribute, as ProxyV's recorder is
    with ablate(model, "skip_ffn"):
        assert model.model.get_image_features is not sentinel
    assert vars(model.model)["get_image_features"] is sentinel
