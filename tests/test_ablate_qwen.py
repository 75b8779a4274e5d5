"""ablate() on Qwen2-VL / Qwen2.5-VL / Qwen3-VL: every operator equals an independent reference (M-RoPE and
DeepStack written in tests/qwen_reference.py), on images and video, eager and sdpa; a padded batch equals each
sample alone; generate() with the KV cache equals greedy recomputation; the model is unchanged afterwards;
unsupported combinations are one clear error."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from conftest import assert_unchanged_after_blocks
from qwen_helpers import KINDS, SAMPLE_SETS, greedy_recomputation, make_batch, model_for, suppressed
from qwen_reference import reference_logits

from analysis import OPERATORS, ablate, tiny_qwen

OPS = sorted(OPERATORS)
N_LAYERS = 3  # the tiny fixtures


@functools.cache
def batch_for(kind: str, samples: str = "videos"):
    return make_batch(kind, SAMPLE_SETS[samples], "left")


@functools.cache
def reference_for(kind: str, samples: str, op: str, start: int):
    """The reference does not depend on the attention backend: computed once for eager and sdpa."""
    return reference_logits(model_for(kind), batch_for(kind, samples), op, range(start, N_LAYERS))


def assert_matches_reference(kind, attn, samples, op, start):
    model, batch = model_for(kind, attn), batch_for(kind, samples)
    expected = reference_for(kind, samples, op, start)
    with torch.no_grad(), ablate(model, op, start_layer=start):
        logits = model(**batch).logits
    valid = batch["attention_mask"].bool()
    for b, ref in enumerate(expected):
        torch.testing.assert_close(logits[b][valid[b]], ref, atol=1e-5, rtol=0)  # fp32; logits are O(1)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_op_matches_reference(kind, op, attn):
    """Start layers 0 and 1 of 3; a left-padded batch with a multi-block video followed by an image, and a
    sample opening with a video (Qwen3-VL: DeepStack added after layers 0 and 1, timestamps between blocks)."""
    for start in (0, 1):
        assert_matches_reference(kind, attn, "videos", op, start)


@pytest.mark.parametrize("op", ["mask_v2v", "skip_attn_ffn", "drop_v2t"])
@pytest.mark.parametrize("kind", KINDS)
def test_several_images_a_video_and_a_text_only_sample(kind, op):
    assert_matches_reference(kind, "sdpa", "multi", op, 1)


def test_deepstack_is_part_of_the_reference():
    """Qwen3-VL from layer 0: the op matches the reference only with the DeepStack additions after layers 0 and 1
    (they land on the same vision rows whatever the op), so the check above really covers them."""
    model, batch = model_for("qwen3_vl"), batch_for("qwen3_vl")
    valid = batch["attention_mask"].bool()
    with torch.no_grad(), ablate(model, "skip_attn_ffn", start_layer=0):
        logits = model(**batch).logits
    with_deepstack = reference_for("qwen3_vl", "videos", "skip_attn_ffn", 0)
    without = reference_logits(model, batch, "skip_attn_ffn", range(N_LAYERS), with_deepstack=False)
    for b in range(len(with_deepstack)):
        torch.testing.assert_close(logits[b][valid[b]], with_deepstack[b], atol=1e-5, rtol=0)
        assert (logits[b][valid[b]] - without[b]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_ops_really_change_the_output(kind):
    model, batch = model_for(kind), batch_for(kind)
    with torch.no_grad():
        vanilla = model(**batch).logits
        for op in sorted(set(OPS) - {"none"}):
            with ablate(model, op, start_layer=1):
                assert (model(**batch).logits - vanilla).abs().max() > 1e-3, op


@pytest.mark.parametrize("op", ["skip_attn", "drop_v2t"])
@pytest.mark.parametrize("kind", KINDS)
def test_batch_equals_each_sample_alone(kind, op):
    """Left padding, several images and a video in one sample, a text-only sample."""
    model, samples = model_for(kind), SAMPLE_SETS["multi"]
    batch = batch_for(kind, "multi")
    with torch.no_grad(), ablate(model, op, start_layer=0):
        batched = model(**batch).logits
        for b, sample in enumerate(samples):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the text-only sample alone: "no image or video tokens"
                alone = model(**make_batch(kind, (sample,))).logits[0]
            valid = batch["attention_mask"][b].bool()
            torch.testing.assert_close(batched[b][valid], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_right_padded_batch_equals_each_sample_alone(kind):
    """Right padding: the pads follow each sample, so vision positions and M-RoPE origins do not shift."""
    model, samples = model_for(kind), SAMPLE_SETS["multi"]
    batch = make_batch(kind, samples, padding_side="right")
    assert not batch["attention_mask"][:, -1].all()  # some sample really is right-padded
    with torch.no_grad(), ablate(model, "skip_attn_ffn", start_layer=0):
        batched = model(**batch).logits
        for b, sample in enumerate(samples):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                alone = model(**make_batch(kind, (sample,))).logits[0]
            valid = batch["attention_mask"][b].bool()
            torch.testing.assert_close(batched[b][valid], alone, atol=1e-5, rtol=0)


STEPS = 3


@pytest.mark.parametrize("attn, ops", [("sdpa", OPS), ("eager", ["mask_v2v", "skip_attn_ffn", "drop_v2t"])])
@pytest.mark.parametrize("kind", KINDS)
def test_generate_with_cache_equals_greedy_recomputation(kind, attn, ops):
    """Decode steps attend to the cached vision keys under the op (drop_v2t: not at all) with rope_deltas
    positions; images and a video, left padding."""
    model, batch = model_for(kind, attn), batch_for(kind)
    for op in ops:
        with torch.no_grad(), ablate(model, op, start_layer=1 if op != "drop_v2t" else 0):
            out = model.generate(**batch, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, suppress_tokens=suppressed(model))
        start = 1 if op != "drop_v2t" else 0
        ids, logits = greedy_recomputation(model, batch, STEPS, lambda: ablate(model, op, start_layer=start))
        assert torch.equal(out.sequences, ids), op
        for got, want in zip(out.logits, logits):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_drop_v2t_hides_the_video_from_every_decode_step():
    """With vision keys cut for every text query in every layer, the pixels cannot change the generated logits."""
    model, batch = model_for("qwen3_vl"), batch_for("qwen3_vl")
    blank = dict(batch)
    blank["pixel_values"] = torch.zeros_like(batch["pixel_values"])
    blank["pixel_values_videos"] = torch.zeros_like(batch["pixel_values_videos"])
    outs = []
    for b in (batch, blank):
        with torch.no_grad(), ablate(model, "drop_v2t", start_layer=0):
            outs.append(model.generate(**b, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                                       output_logits=True, return_dict_in_generate=True))
    # The text rows are not touched by vision features except through DeepStack, which adds only to vision rows.
    for a, b in zip(outs[0].logits, outs[1].logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_model_is_unchanged_after_the_blocks(kind):
    model, batch = model_for(kind), batch_for(kind)
    blocks = [functools.partial(ablate, model, op, start_layer=0) for op in OPS]
    assert_unchanged_after_blocks(model, batch, blocks)
    assert all("forward" not in vars(layer) for layer in model.model.language_model.layers)
    assert "get_video_features" not in vars(model.model)


def enter(model, *args, **kwargs):
    with ablate(model, *args, **kwargs):
        pass


def test_unsupported_attention_backend_is_one_line():
    model = tiny_qwen.build_model("qwen2_5_vl", seed=0)
    model.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(NotImplementedError, match=r"^op 'drop_v2t' needs attention with an explicit \(query, key\) "
                                                  r"mask, .*supported backends: eager, sdpa\..*'sdpa'"):
        enter(model, "drop_v2t")
    enter(model, "skip_ffn")  # skip_ffn leaves attention to HF


def test_proxyv_needs_a_proxyv_checkpoint_on_qwen():
    """Token reduction (fastv, pdrop) runs on these classes (tests/test_reduction_qwen.py); ``proxyv`` runs a trained
    ProxyV model (tests/test_proxyv_qwen.py): on a plain one it is one clear error."""
    with pytest.raises(TypeError, match=r"runs a trained ProxyV checkpoint; this model is not one"):
        enter(model_for("qwen3_vl"), "proxyv", start_layer=1)


def test_text_only_input_is_a_noop_with_one_warning():
    model = model_for("qwen2_vl")
    batch = make_batch("qwen2_vl", ([("text", "just text")], [("text", "more text here")]))
    with torch.no_grad():
        vanilla = model(**batch).logits
        with warnings.catch_warnings(record=True) as caught, ablate(model, "skip_attn_ffn", start_layer=0):
            warnings.simplefilter("always")
            inside = model(**batch).logits
    assert torch.equal(vanilla, inside)
    assert [str(w.message) for w in caught if "changes nothing" in str(w.message)] == [
        "ablate(): the input has no image or video tokens, so the op changes nothing"]


def test_pre_encoded_features_without_grids_are_refused():
    model, batch = model_for("qwen2_vl"), batch_for("qwen2_vl")
    with torch.no_grad():
        encoded = {"image": model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]),
                   "video": model.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"])}
    inputs = {k: v for k, v in batch.items() if k not in ("pixel_values", "pixel_values_videos", "image_grid_thw")}
    # Encoded outside the block, so no grid was recorded.
    with pytest.raises(ValueError, match="^ablate\\(\\): the call carries image features but no image_grid_thw"), \
            torch.no_grad(), ablate(model, "skip_ffn"):
        model(**inputs, mm_encoder_outputs=encoded)
