"""Bad input to ablate() gets one clear error naming the fix; text-only input is a warned no-op."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LlamaForCausalLM

from analysis import ablate, tiny
from conftest import make_batch, model_for


def enter(model, *args, **kwargs):
    with ablate(model, *args, **kwargs):
        pass


def test_unknown_op_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown op 'skip_everything'; known ops: .*drop_v2t.*skip_ffn"):
        enter(model_for("llava-llama"), "skip_everything")


@pytest.mark.parametrize("kwargs, message", [
    ({"layers": [2, 7]}, r"layer\(s\) \[7\] out of range: the model has 4 decoder layers \(valid 0..3\)"),
    ({"layers": []}, "layer range is empty"),
    ({"start_layer": 4}, r"start_layer=4 is out of range: the model has 4 decoder layers"),
    ({"start_layer": -1}, "start_layer=-1 is out of range"),
    ({"start_layer": 2, "end_layer": 2}, r"end_layer=2 must be in 3..4"),
    ({"start_layer": 1, "end_layer": 9}, r"end_layer=9 must be in 2..4"),
    ({"layers": [1], "start_layer": 1}, "either layers= or start_layer="),
])
def test_bad_layers(kwargs, message):
    with pytest.raises(ValueError, match=message):
        enter(model_for("llava-llama"), "skip_ffn", **kwargs)


def test_unsupported_model_class_names_supported_ones():
    text_only = LlamaForCausalLM(tiny.text_config("llama", vocab_size=101))
    with pytest.raises(TypeError, match="unsupported model class LlamaForCausalLM; supported: "
                                        "LlavaForConditionalGeneration, LlavaNextForConditionalGeneration"):
        enter(text_only, "skip_ffn")


def test_unsupported_attention_backend():
    model = tiny.build_model("llava", "llama")
    model.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(NotImplementedError, match="supported backends: eager, sdpa"):
        enter(model, "skip_attn")
    # skip_ffn leaves attention to HF, so any backend works.
    enter(model, "skip_ffn")


def test_text_only_input_is_a_noop_with_one_warning():
    model = model_for("llava-llama")
    batch = make_batch("llava", (("USER: just text ASSISTANT:", []), ("USER: more text here ASSISTANT:", [])))
    with torch.no_grad():
        vanilla = model(**batch).logits
        with warnings.catch_warnings(record=True) as caught, ablate(model, "skip_attn_ffn", start_layer=0):
            warnings.simplefilter("always")
            first = model(**batch).logits
            model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert torch.equal(vanilla, first)
    messages = [str(w.message) for w in caught if "no image tokens" in str(w.message)]
    assert messages == ["ablate(): the input has no image tokens, so the op changes nothing"]


def test_inputs_embeds_are_refused():
    model = model_for("llava-llama")
    batch = make_batch("llava")
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with pytest.raises(ValueError, match="call the model with input_ids"), ablate(model, "skip_ffn"):
        model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])


def test_cache_built_outside_the_context_is_refused():
    model = model_for("llava-llama")
    batch = make_batch("llava")
    with torch.no_grad():
        out = model(**batch, use_cache=True)
        step = {"input_ids": out.logits[:, -1:].argmax(-1),
                "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(batch["attention_mask"][:, :1])], 1)}
        with pytest.raises(RuntimeError, match="inside the same `with ablate"), ablate(model, "drop_v2t"):
            model(**step, past_key_values=out.past_key_values)
