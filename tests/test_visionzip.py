"""VisionZip equals an independent reference: selection, merge, shortened sequence, batched, under generate()."""

from __future__ import annotations

import pytest
import torch
from conftest import MULTI, PAIR, make_batch, model_for, position_ids
from visionzip_reference import reference_batch, reference_greedy

from analysis import ablate, tiny

D, C = 4, 3  # tiny towers: 16 patches + CLS -> 7 image tokens per image
STEPS = 4


def zipped(model, dominant=D, contextual=C):
    return ablate(model, "visionzip", dominant=dominant, contextual=contextual)


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
    batch = make_batch("llava")
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def hooks():
        return {name: (list(m._forward_hooks.values()), list(m._forward_pre_hooks.values()))
                for name, m in model.named_modules()}

    with torch.no_grad():
        vanilla = model(**batch).logits
        model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
        before = hooks()
        with zipped(model):
            model(**batch)
            model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
        with pytest.raises(KeyError), zipped(model):
            raise KeyError("boom")
        after = model(**batch).logits
    assert torch.equal(vanilla, after)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert hooks() == before
    assert "get_image_features" not in vars(model.model)


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


def test_unsupported_models_are_refused():
    with pytest.raises(NotImplementedError, match="LLaVA-NeXT's AnyRes"):
        enter(model_for("next-llama"), dominant=D, contextual=C)
    model = tiny.build_model("llava", "llama")
    model.model.vision_tower.embeddings.class_embedding = None  # as a tower without a CLS token (SigLIP)
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


def test_flops_are_refused_clearly():
    from analysis.flops import PrefillTokens, count_flops

    model = model_for("llava-llama")
    tokens = PrefillTokens.from_batch(make_batch("llava"), model.config)
    with pytest.raises(NotImplementedError, match="FLOPs model of visionzip is not implemented yet"):
        count_flops(model.config, tokens, "visionzip", dominant=D, contextual=C)
