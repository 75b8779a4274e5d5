"""Token reduction (FastV, PyramidDrop) equals an independent reference, batched, cached, on every layout."""

from __future__ import annotations

import warnings

import pytest
import torch

from analysis import ablate, tiny
from analysis.reduction import fastv_kept, kept_per_stage, pdrop_kept
from conftest import MODEL_SPECS, MULTI, PAIR, assert_unchanged_after_blocks, make_batch, model_for, position_ids
from reduction_reference import kept_count, reference_batch, reference_greedy, vision_tokens
from reference import language_model_inputs

# name -> (op, ablate() keywords, (method, layers, keep, positions) for the reference)
VARIANTS = {
    "fastv": ("fastv", {"start_layer": 2, "keep": 0.5}, ("fastv", [2], 0.5, "original")),
    "pdrop-renumber": ("pdrop", {"layers": [1, 3], "keep": 0.5}, ("pdrop", [1, 3], 0.5, "renumber")),
    "pdrop-original": ("pdrop", {"layers": [1, 2], "keep": 0.6, "positions": "original"},
                       ("pdrop", [1, 2], 0.6, "original")),
}
STEPS = 4


def reduced(model, name, newline_tokens="vision"):
    op, kwargs, _ = VARIANTS[name]
    return ablate(model, op, newline_tokens=newline_tokens, **kwargs)


def assert_matches_reference(model, batch, name, newline_tokens="vision", **forward_kwargs):
    """Every sample's kept rows (the last m rows of the output) equal the reference, as do the kept tokens."""
    expected = reference_batch(model, batch, *VARIANTS[name][2], newline_tokens=newline_tokens, **forward_kwargs)
    with torch.no_grad(), reduced(model, name, newline_tokens) as state:
        logits = model(**batch, **forward_kwargs).logits
    assert logits.shape[1] == max(len(alive) for _, alive, _ in expected)
    for b, (ref, alive, kept) in enumerate(expected):
        torch.testing.assert_close(logits[b, -len(alive):], ref, atol=1e-5, rtol=0)  # fp32; logits are O(1)
        assert [stage[b].tolist() for stage in state.kept_vision] == kept
    return logits, state


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_matches_reference(spec, attn, name):
    model = model_for(spec, attn)
    assert_matches_reference(model, make_batch(MODEL_SPECS[spec][0]), name)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_llava_next_newline_tokens_ranked_as_vision_or_kept_as_text(name):
    model = model_for("next-llama")
    batch = make_batch("llava_next")
    _, as_text = assert_matches_reference(model, batch, name, newline_tokens="text")
    _, as_vision = assert_matches_reference(model, batch, name, newline_tokens="vision")
    embeds, _ = language_model_inputs(model, batch)
    newline = (vision_tokens(model, batch, embeds, "vision") & ~vision_tokens(model, batch, embeds, "text"))
    for b in range(len(newline)):
        lines = set(newline[b].nonzero().flatten().tolist())
        assert lines and not lines & set(torch.cat([s[b] for s in as_text.kept_vision]).tolist())
        assert not lines <= set(as_vision.kept_vision[-1][b].tolist())  # as vision, some are dropped


@pytest.mark.parametrize("name", ["fastv", "pdrop-renumber"])
@pytest.mark.parametrize("spec_name", ["llava-qwen2-gqa", "next-llama"])
def test_ranking_is_what_eager_attention_probabilities_pick(spec_name, name):
    """The first drop keeps the vision tokens the last token attends most in HF's own eager attention
    probabilities (FastV: layer K-1; PyramidDrop: layer K_1, whose input is still the full sequence)."""
    kind = MODEL_SPECS[spec_name][0]
    batch = make_batch(kind)
    method, layers, keep, _ = VARIANTS[name][2]
    rank_layer = layers[0] - 1 if method == "fastv" else layers[0]
    with torch.no_grad():
        probs = model_for(spec_name, "eager")(**batch, output_attentions=True).attentions[rank_layer]
        with reduced(model_for(spec_name, "sdpa"), name) as state:
            model_for(spec_name, "sdpa")(**batch)
    image = batch["input_ids"] == model_for(spec_name).config.image_token_id
    for b in range(len(image)):
        row = probs[b, :, -1].mean(0)  # left padding: the last column is the last token
        columns = image[b].nonzero().flatten().tolist()
        count = kept_count(method, keep, len(columns), 1)
        best = sorted(columns, key=lambda j: (-float(row[j]), j))[:count]
        assert state.kept_vision[0][b].tolist() == sorted(best)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("spec_name", ["llava-qwen2-gqa", "next-llama"])
def test_padded_batch_equals_each_sample_alone(spec_name, padding_side, name):
    kind = MODEL_SPECS[spec_name][0]
    model = model_for(spec_name)
    batch = make_batch(kind, PAIR, padding_side=padding_side)
    with torch.no_grad(), reduced(model, name):
        batched = model(**batch, position_ids=position_ids(batch["attention_mask"])).logits
        for b, sample in enumerate(PAIR):
            alone = model(**make_batch(kind, (sample,))).logits[0]
            torch.testing.assert_close(batched[b, -len(alone):], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("spec_name", ["llava-llama", "next-mistral-gqa"])
def test_several_images_and_a_text_only_sample(spec_name, name):
    kind = MODEL_SPECS[spec_name][0]
    model = model_for(spec_name)
    batch = make_batch(kind, MULTI)
    logits, state = assert_matches_reference(model, batch, name, position_ids=position_ids(batch["attention_mask"]))
    assert all(len(stage[1]) == 0 for stage in state.kept_vision)
    with torch.no_grad():
        alone = model(**make_batch(kind, MULTI[1:])).logits[0]  # vanilla: the text-only sample is unchanged
    torch.testing.assert_close(logits[1, -len(alone):], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("spec_name", ["llava-qwen2-gqa", "next-llama"])
def test_generate_with_cache_equals_stepwise_recomputation(spec_name, attn, name):
    """Greedy generate() with a KV cache equals recomputing prompt + generated tokens from scratch at
    every step (ranking fixed at the prompt's last token); the cache holds what the spec says."""
    kind = MODEL_SPECS[spec_name][0]
    model = model_for(spec_name, attn)
    batch = make_batch(kind)
    image_id = model.config.image_token_id
    with torch.no_grad(), reduced(model, name):
        out = model.generate(**batch, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, suppress_tokens=[image_id])
    method, layers, keep, mode = VARIANTS[name][2]
    ids, logits = reference_greedy(model, batch, method, layers, keep, mode, STEPS,
                                   suppressed=[image_id, model.generation_config.eos_token_id])
    assert torch.equal(out.sequences, ids)
    for got, want in zip(out.logits, logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    # KV cache: layers before the first boundary hold every token; stage s holds N_s slots, N_s = the
    # batch's largest count of text + kept vision tokens; each decode step added one slot everywhere.
    valid = batch["attention_mask"].sum(1)
    n_vision = (batch["input_ids"] == image_id).sum(1)
    boundaries = layers if method == "pdrop" else layers[:1]
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    T = batch["input_ids"].shape[1]
    for i, length in enumerate(lengths):
        stage = sum(k <= i for k in boundaries)
        if stage == 0:
            expected = T
        else:
            expected = max(int(v - n) + kept_count(method, keep, int(n), stage) for v, n in zip(valid, n_vision))
        assert length == expected + STEPS - 1, (i, lengths)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_chunk_of_new_tokens_equals_them_one_at_a_time(name):
    """After a cached prefill, t new tokens in one call equal t decode steps (mask and positions per row)."""
    model = model_for("llava-qwen2-gqa")
    batch = make_batch("llava")
    new = torch.tensor([[40, 41, 42], [43, 44, 45]])
    mask = batch["attention_mask"]
    steps = [torch.cat([mask, torch.ones(2, i + 1, dtype=mask.dtype)], 1) for i in range(3)]
    with torch.no_grad():
        with reduced(model, name):
            cache = model(**batch, position_ids=position_ids(mask), use_cache=True).past_key_values
            chunk = model(input_ids=new, attention_mask=steps[-1], past_key_values=cache,
                          position_ids=position_ids(steps[-1])[:, -3:]).logits
        with reduced(model, name):
            cache = model(**batch, position_ids=position_ids(mask), use_cache=True).past_key_values
            single = [model(input_ids=new[:, i:i + 1], attention_mask=steps[i], past_key_values=cache,
                            position_ids=position_ids(steps[i])[:, -1:]).logits for i in range(3)]
    torch.testing.assert_close(chunk, torch.cat(single, 1), atol=1e-5, rtol=0)


def test_model_is_bit_identical_after_exit():
    model = model_for("next-llama")
    blocks = [lambda name=name: reduced(model, name) for name in VARIANTS]  # the exception inside fastv's
    assert_unchanged_after_blocks(model, make_batch("llava_next"), blocks)
    assert all("forward" not in vars(layer) for layer in model.model.language_model.layers)


def test_text_only_batch_is_vanilla_with_one_warning():
    model = model_for("llava-llama")
    batch = make_batch("llava", (("USER: just text ASSISTANT:", []), ("USER: more text here ASSISTANT:", [])))
    with torch.no_grad():
        vanilla = model(**batch).logits
        with warnings.catch_warnings(record=True) as caught, reduced(model, "pdrop-renumber"):
            warnings.simplefilter("always")
            inside = model(**batch).logits
            model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(vanilla, inside)
    assert sum("no image tokens" in str(w.message) for w in caught) == 1


def test_kept_counts_follow_the_official_float_rules():
    assert fastv_kept(576, 0.5) == 288 and fastv_kept(5, 0.5) == 3 and fastv_kept(0, 0.5) == 0
    assert fastv_kept(1, 0.01) == 1 and fastv_kept(10, 0.3) == 3
    assert pdrop_kept(576, 0.5, 3) == 72 and pdrop_kept(3, 0.5, 2) == 0  # 0 is allowed, as int(N * l**s)
    assert pdrop_kept(2880, 0.7, 1) == 2015 and pdrop_kept(100, 0.29, 1) == 28  # float, as the official code
    assert kept_per_stage("pdrop", 576, 0.5, 3) == [288, 144, 72] and kept_per_stage("fastv", 576, 0.25) == [144]
    for n in range(0, 3000, 7):
        for keep in (0.1, 0.25, 0.3, 0.5, 0.7, 1.0):
            assert fastv_kept(n, keep) == kept_count("fastv", keep, n, 1)
            assert [pdrop_kept(n, keep, s) for s in (1, 2, 3)] == [kept_count("pdrop", keep, n, s) for s in (1, 2, 3)]


def enter(model, op, **kwargs):
    with ablate(model, op, **kwargs):
        pass


@pytest.mark.parametrize("op, kwargs, message", [
    ("fastv", {"start_layer": 2, "keep": 0}, r"keep must be in \(0, 1\]"),
    ("pdrop", {"layers": [1], "keep": 1.5}, r"keep must be in \(0, 1\]"),
    ("fastv", {"start_layer": 0}, r"start_layer must be in 1..3"),
    ("fastv", {"start_layer": 4}, r"start_layer must be in 1..3"),
    ("pdrop", {"layers": [2, 1]}, "strictly increasing"),
    ("pdrop", {"layers": [1, 1]}, "strictly increasing"),
    ("pdrop", {"layers": [0, 2]}, r"every boundary must be in 1..3"),
    ("pdrop", {"layers": [1], "positions": "shifted"}, "positions must be one of renumber, original"),
])
def test_bad_parameters(op, kwargs, message):
    with pytest.raises(ValueError, match=message):
        enter(model_for("llava-llama"), op, **kwargs)


def test_inputs_embeds_are_refused():
    model = model_for("llava-llama")
    batch = make_batch("llava")
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with pytest.raises(ValueError, match="call the model with input_ids"), reduced(model, "fastv"):
        model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])


def test_unsupported_backend_proxyv_and_sliding_window_are_refused():
    model = tiny.build_model("llava", "llama")
    model.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(NotImplementedError, match="supported backends: eager, sdpa"):
        enter(model, "fastv", start_layer=2)
    windowed = tiny.build_model("llava_next", "mistral", num_kv_heads=2, sliding_window=24)
    with pytest.raises(NotImplementedError, match="sliding-window attention"):
        enter(windowed, "pdrop", layers=[1, 2])
    from analysis.proxyv import apply_proxyv

    proxyv = apply_proxyv(tiny.build_model("llava", "llama"), start_layer=2, reduce_factor=2, init="spatial", seed=0)
    with pytest.raises(ValueError, match=r"spatial proxies: token reduction breaks the crop grid"):
        enter(proxyv, "fastv", start_layer=2)  # learned proxies combine: tests/test_proxyv_reduction.py


def test_cache_built_outside_the_block_is_refused():
    model = model_for("llava-llama")
    batch = make_batch("llava")
    with torch.no_grad():
        out = model(**batch, use_cache=True)
        mask = batch["attention_mask"]
        step = {"input_ids": out.logits[:, -1:].argmax(-1),
                "attention_mask": torch.cat([mask, torch.ones_like(mask[:, :1])], 1)}
        with pytest.raises(RuntimeError, match="inside the same `with ablate"), reduced(model, "fastv"):
            model(**step, past_key_values=out.past_key_values)


def test_output_labels_give_the_training_loss_of_the_kept_rows():
    """Under a reduction the forward outputs fewer rows; output_labels() gathers each row's label, so that with
    every vision token kept the loss equals the plain model's, and with fewer it is the loss of the kept rows."""
    model = model_for("llava-llama")
    batch = make_batch("llava", PAIR, padding_side="right")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels = labels.masked_fill(labels == model.config.image_token_id, -100)
    with torch.no_grad():
        plain = model(**batch, labels=labels).loss
        with ablate(model, "pdrop", layers=[1, 2], keep=1.0) as state:
            logits = model(**batch).logits
            kept = state.output_labels(labels)
        assert logits.shape[1] == kept.shape[1] < labels.shape[1] + 1
        torch.testing.assert_close(model.loss_function(logits=logits, labels=kept, vocab_size=logits.shape[-1]), plain)
        with ablate(model, "fastv", start_layer=2, keep=0.5) as state:
            logits = model(**batch).logits
            kept = state.output_labels(labels)
        text = (labels != -100).sum()  # minus each sample's first token, which nothing predicts
        assert (kept != -100).sum() == text - 2 and logits.shape[1] == kept.shape[1] < labels.shape[1]


def test_a_causal_mask_runs_sdpa_causal_kernel_with_the_same_result(monkeypatch):
    """A batch-1 pruned layer's mask is exactly causal: split_attention hands it to sdpa's causal kernel
    (as HF's own layers run), with the logits of the explicit-mask path."""
    from analysis import attention

    assert attention.is_causal_mask(torch.ones(1, 5, 5, dtype=torch.bool).tril())
    assert not attention.is_causal_mask(torch.ones(1, 5, 6, dtype=torch.bool).tril())
    one_row_full = torch.ones(2, 5, 5, dtype=torch.bool).tril().index_fill(1, torch.tensor([0]), True)
    assert not attention.is_causal_mask(one_row_full)
    model = model_for("llava-llama", "sdpa")
    batch = make_batch("llava", PAIR[:1])
    calls = []
    real = attention.is_causal_mask
    monkeypatch.setattr(attention, "is_causal_mask", lambda allowed: calls.append(real(allowed)) or calls[-1])
    with torch.no_grad(), reduced(model, "fastv"):
        fast = model(**batch).logits
    assert calls and all(calls)  # every pruned layer took the causal kernel
    monkeypatch.setattr(attention, "is_causal_mask", lambda allowed: False)
    with torch.no_grad(), reduced(model, "fastv"):
        masked = model(**batch).logits
    torch.testing.assert_close(fast, masked, atol=1e-5, rtol=0)
