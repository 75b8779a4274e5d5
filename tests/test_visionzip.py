"""VisionZip equals an independent reference: selection, merge, shortened sequence, batched, under generate();
LLaVA-1.5 and LLaVA-NeXT (every crop zipped to D + C tokens)."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import MULTI, PAIR, assert_unchanged_after_blocks, make_batch, model_for, position_ids
from visionzip_reference import reference_batch, reference_greedy

from analysis import ablate, tiny

D, C = 4, 3  # tiny towers: 16 patches + CLS -> 7 image tokens per image
STEPS = 4


def zipped(model, dominant=D, contextual=C):
    return ablate(model, "visionzip", dominant=dominant, contextual=contextual)


@functools.cache
def next_model(backbone: str, attn: str = "sdpa"):
    """Tiny LLaVA-NeXT models: Llama (conftest's), Qwen2 with GQA and q/k/v bias (built here)."""
    if backbone == "llama":
        return model_for("next-llama", attn)
    return tiny.build_model("llava_next", "qwen2", attn_implementation=attn, seed=1, num_kv_heads=2)


def assert_matches_reference(model, batch, dominant=D, contextual=C):
    expected = reference_batch(model, batch, dominant, contextual)
    with torch.no_grad(), zipped(model, dominant, contextual) as state:
        logits = model(**batch, position_ids=position_ids(batch["attention_mask"])).logits
    images = [image for _, _, info in expected for image in info]
    assert [s.tolist() for s in state.selected] == [kept for kept, _ in images]
    assert [t.tolist() for t in state.targets] == [targets for _, targets in images]
    for b, (ref, where, _) in enumerate(expected):
        assert state.kept_positions[b][-len(where):].tolist() == where  # left padding: the last m slots
        torch.testing.assert_close(logits[b, -len(where):], ref, atol=1e-5, rtol=0)
    return logits, state


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("spec_name", ["llava-llama", "llava-qwen2-gqa"])
def test_matches_reference(spec_name, attn):
    model = model_for(spec_name, attn)
    batch = make_batch("llava")
    logits, state = assert_matches_reference(model, batch)
    image = batch["input_ids"] == model.config.image_token_id
    assert logits.shape[1] == batch["input_ids"].shape[1] - (16 - D - C)  # one image per sample
    assert all(len(s) == D and s[0] == 0 for s in state.selected)  # D counts the CLS token, kept
    assert int(image.sum()) == 2 * 16


@pytest.mark.parametrize("dominant, contextual", [(1, 0), (1, 16), (17, 0), (6, 1), (2, 5)])
def test_budgets_at_the_edges(dominant, contextual):
    """CLS only; CLS + everything merged into 16 targets (each its own); all 17 tower tokens are too many
    for 16 placeholders (below); various splits."""
    model = model_for("llava-llama")
    batch = make_batch("llava")
    if dominant + contextual > 16:
        with pytest.raises(ValueError, match="exceeds the 16 image tokens per image"):
            enter(model, dominant=dominant, contextual=contextual)
        return
    assert_matches_reference(model, batch, dominant, contextual)


def test_several_images_and_a_text_only_sample():
    model = model_for("llava-llama")
    batch = make_batch("llava", MULTI)
    logits, state = assert_matches_reference(model, batch)
    assert len(state.selected) == 2
    with torch.no_grad():
        alone = model(**make_batch("llava", MULTI[1:])).logits[0]  # vanilla: the text-only sample is unchanged
    torch.testing.assert_close(logits[1, -len(alone):], alone, atol=1e-5, rtol=0)
    assert bool((state.kept_positions == -1).any())  # one sample lost 18 tokens, the other none: filler slots


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_equals_each_sample_alone(padding_side):
    model = model_for("llava-qwen2-gqa")
    batch = make_batch("llava", PAIR, padding_side=padding_side)
    with torch.no_grad(), zipped(model):
        batched = model(**batch, position_ids=position_ids(batch["attention_mask"])).logits
        mask = batch["attention_mask"]
        short = len(batched[0])
        for b, sample in enumerate(PAIR):
            alone = model(**make_batch("llava", (sample,))).logits[0]
            m = len(alone)
            got = batched[b, -m:] if padding_side == "left" else batched[b, :m]
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)
        assert short == mask.shape[1] - (16 - D - C)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("spec_name, samples", [("llava-llama", PAIR), ("llava-qwen2-gqa", PAIR),
                                                ("llava-llama", MULTI)])
def test_generate_with_cache_equals_stepwise_recomputation(spec_name, samples, attn):
    model = model_for(spec_name, attn)
    batch = make_batch("llava", samples)
    image_id = model.config.image_token_id
    with torch.no_grad(), zipped(model):
        out = model.generate(**batch, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, suppress_tokens=[image_id])
    ids, logits = reference_greedy(model, batch, D, C, STEPS,
                                   suppressed=[image_id, model.generation_config.eos_token_id])
    assert torch.equal(out.sequences, ids)
    for got, want in zip(out.logits, logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    image = batch["input_ids"] == image_id
    short = max(batch["input_ids"].shape[1] - int(n) // 16 * (16 - D - C) for n in image.sum(1))
    assert all(layer.keys.shape[2] == short + STEPS - 1 for layer in out.past_key_values.layers)


def test_model_is_bit_identical_after_exit():
    model = model_for("llava-llama")
    assert_unchanged_after_blocks(model, make_batch("llava"), [lambda: zipped(model)])


def test_text_only_batch_is_vanilla():
    model = model_for("llava-llama")
    batch = make_batch("llava", (("USER: just text ASSISTANT:", []), ("USER: more text here ASSISTANT:", [])))
    with torch.no_grad():
        vanilla = model(**batch).logits
        with zipped(model):
            inside = model(**batch).logits
    assert torch.equal(vanilla, inside)


def enter(model, **kwargs):
    with ablate(model, "visionzip", **kwargs):
        pass


@pytest.mark.parametrize("kwargs, message", [
    ({"dominant": 0, "contextual": 3}, "dominant must be an integer >= 1"),
    ({"dominant": 4, "contextual": -1}, "contextual must be an integer >= 0"),
    ({"dominant": 4.0, "contextual": 3}, "dominant must be an integer >= 1"),
    ({"dominant": 10, "contextual": 8}, r"dominant \+ contextual = 18 exceeds the 16 patches \+ CLS"),
    ({"dominant": 4, "contextual": 3, "start_layer": 2}, "takes no layers"),
])
def test_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        enter(model_for("llava-llama"), **kwargs)


def test_towers_without_a_cls_token_are_refused():
    """A real (tiny, offline) SigLIP tower in a LLaVA-1.5 and a LLaVA-NeXT model; and a CLIP tower stubbed CLS-less."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    siglip = {"model_type": "siglip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 32,
              "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    for kind, config_class, model_class in [("llava", LlavaConfig, LlavaForConditionalGeneration),
                                            ("llava_next", LlavaNextConfig, LlavaNextForConditionalGeneration)]:
        config = tiny.build_config(kind, "llama").to_dict()
        config["vision_config"] = siglip
        model = model_class._from_config(config_class(**config))
        assert type(model.model.vision_tower).__name__ == "SiglipVisionModel"
        with pytest.raises(NotImplementedError, match=r"needs a vision tower with a CLS token .*SiglipVisionModel "
                                                      r"\(siglip_vision_model\).*fastv or pdrop"):
            enter(model, dominant=D, contextual=C)
    model = tiny.build_model("llava", "llama")
    model.model.vision_tower.embeddings.class_embedding = None  # a CLIP tower stubbed without its CLS token
    with pytest.raises(NotImplementedError, match="needs a vision tower with a CLS token"):
        enter(model, dominant=D, contextual=C)


def test_inputs_embeds_are_refused():
    model = model_for("llava-llama")
    batch = make_batch("llava")
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with torch.no_grad(), pytest.raises(ValueError, match="call the model with input_ids"), zipped(model):
        model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])


def test_full_strategy_allows_every_tower_token():
    """With vision_feature_select_strategy="full" the processor writes N + 1 placeholders: D + C = N + 1 fits."""
    from conftest import image

    model = tiny.build_model("llava", "llama", seed=1)
    model.config.vision_feature_select_strategy = "full"
    processor = tiny.build_processor("llava")
    processor.tokenizer.padding_side = "left"
    processor.vision_feature_select_strategy = "full"
    batch = processor(images=[image(*spec) for _, specs in PAIR for spec in specs], text=[t for t, _ in PAIR],
                      return_tensors="pt", padding=True)
    assert (batch["input_ids"] == model.config.image_token_id).sum(1).tolist() == [17, 17]
    assert_matches_reference(model, batch, 10, 7)


# ---------------------------------------------------------------------------------------------- LLaVA-NeXT (AnyRes)

def sample_crops(samples, crops):
    """Per sample the crops of its images (``crops``: per image of the batch, in order)."""
    out, i = [], 0
    for _, specs in samples:
        out.append(sum(crops[i:i + len(specs)]))
        i += len(specs)
    return out


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("backbone", ["llama", "qwen2"])
def test_next_matches_reference(backbone, attn):
    """Two images of different sizes (3 and 5 crops), left padding: every crop zipped to D + C, no newline."""
    model = next_model(backbone, attn)
    batch = make_batch("llava_next")
    logits, state = assert_matches_reference(model, batch)
    assert state.crops == [3, 5]
    assert len(state.selected) == 8 and all(len(s) == D and s[0] == 0 for s in state.selected)
    placeholders = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert placeholders == [44, 72]  # processor: 16 base + unpadded grid + newlines
    dropped = [p - c * (D + C) for p, c in zip(placeholders, [3, 5], strict=True)]
    assert logits.shape[1] == batch["input_ids"].shape[1] - min(dropped)
    assert ((state.kept_positions == -1).sum(1)).tolist() == [0, max(dropped) - min(dropped)]


@pytest.mark.parametrize("dominant, contextual", [(1, 0), (2, 12), (14, 0)])
def test_next_budgets(dominant, contextual):
    """CLS only per crop; 14 tokens per crop (3 x 14 = 42 of the first image's 44 placeholders)."""
    assert_matches_reference(next_model("llama"), make_batch("llava_next"), dominant, contextual)


def test_next_budget_above_an_images_placeholders_is_refused():
    model = next_model("llama")
    batch = make_batch("llava_next")
    with torch.no_grad(), pytest.raises(ValueError, match=r"image 0 of sample 0 \(size \[32, 48\]\) has 3 crops x "
                                                          r"\(dominant \+ contextual = 15\) = 45 tokens, more than "
                                                          r"its 44 placeholder positions"), zipped(model, 10, 5):
        model(**batch)


def test_next_several_images_and_a_text_only_sample():
    model = next_model("llama")
    batch = make_batch("llava_next", MULTI)
    logits, state = assert_matches_reference(model, batch)
    assert state.crops == [5, 3] and len(state.selected) == 8
    with torch.no_grad():
        alone = model(**make_batch("llava_next", MULTI[1:])).logits[0]  # the text-only sample is unchanged
    torch.testing.assert_close(logits[1, -len(alone):], alone, atol=1e-5, rtol=0)
    assert bool((state.kept_positions[0] == -1).any())  # the image sample lost 122 - 8 * 7 tokens: fillers


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_next_padded_batch_equals_each_sample_alone(padding_side):
    model = next_model("qwen2")
    batch = make_batch("llava_next", PAIR, padding_side=padding_side)
    with torch.no_grad(), zipped(model) as state:
        batched = model(**batch, position_ids=position_ids(batch["attention_mask"])).logits
        width = batched.shape[1]
        for b, sample in enumerate(PAIR):
            alone = model(**make_batch("llava_next", (sample,))).logits[0]
            m = len(alone)
            got = batched[b, -m:] if padding_side == "left" else batched[b, :m]
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)
            assert state.crops == [[3], [5]][b]
    assert width == batch["input_ids"].shape[1] - min(44 - 3 * (D + C), 72 - 5 * (D + C))


@pytest.mark.parametrize("backbone, attn, samples", [("llama", "eager", PAIR), ("llama", "sdpa", MULTI),
                                                     ("qwen2", "sdpa", PAIR)])
def test_next_generate_with_cache_equals_stepwise_recomputation(backbone, attn, samples):
    model = next_model(backbone, attn)
    batch = make_batch("llava_next", samples)
    image_id = model.config.image_token_id
    with torch.no_grad(), zipped(model) as state:
        out = model.generate(**batch, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, suppress_tokens=[image_id])
    ids, logits = reference_greedy(model, batch, D, C, STEPS,
                                   suppressed=[image_id, model.generation_config.eos_token_id])
    assert torch.equal(out.sequences, ids)
    for got, want in zip(out.logits, logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    placeholders = (batch["input_ids"] == image_id).sum(1).tolist()
    crops = sample_crops(samples, state.crops)
    short = max(batch["input_ids"].shape[1] - p + c * (D + C) for p, c in zip(placeholders, crops, strict=True))
    assert all(layer.keys.shape[2] == short + STEPS - 1 for layer in out.past_key_values.layers)


def test_next_model_is_bit_identical_after_exit():
    model = next_model("llama")
    assert_unchanged_after_blocks(model, make_batch("llava_next", MULTI), [lambda: zipped(model)])
    assert not model.model._forward_pre_hooks


def test_next_full_strategy_is_refused():
    model = tiny.build_model("llava_next", "llama")
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(NotImplementedError, match="supports vision_feature_select_strategy 'default' only"):
        enter(model, dominant=D, contextual=C)
