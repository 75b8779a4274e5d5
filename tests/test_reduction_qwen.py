"""FastV and PyramidDrop on Qwen2-VL / Qwen2.5-VL / Qwen3-VL equal an independent reference
(tests/qwen_reference.py: plain per-sample loops, explicit masks, M-RoPE from get_rope_index, each kept row its
own position, DeepStack added to each alive vision row), images and video, eager and sdpa; a padded batch equals
each sample alone; generate() with the KV cache equals recomputation; the model is unchanged after exit;
unsupported combinations are one clear error."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from conftest import assert_unchanged_after_blocks
from qwen_helpers import KINDS, SAMPLE_SETS, assert_generate_equals_reference, make_batch, model_for
from qwen_reference import reduced_reference

from analysis import ablate
from analysis.variant import Variant, family

# name: (ablate kwargs, (method, boundaries, keep)); the tiny fixtures have 3 layers, Qwen3-VL DeepStack after 0, 1
VARIANTS = {
    "fastv-1": ({"start_layer": 1, "keep": 0.5}, ("fastv", [1], 0.5)),
    "pdrop-1-2": ({"layers": [1, 2], "keep": 0.6}, ("pdrop", [1, 2], 0.6)),
}
STEPS = 3


@functools.cache
def batch_for(kind, samples="videos"):
    return make_batch(kind, SAMPLE_SETS[samples], "left")


@functools.cache
def reference_for(kind, samples, name):
    return reduced_reference(model_for(kind), batch_for(kind, samples), *VARIANTS[name][1])


def assert_matches_reference(kind, attn, samples, name):
    model, batch = model_for(kind, attn), batch_for(kind, samples)
    valid = batch["attention_mask"].bool()
    with torch.no_grad(), ablate(model, name.split("-")[0], **VARIANTS[name][0]) as red:
        logits = model(**batch).logits
        kept = [[t.tolist() for t in stage] for stage in red.kept_vision]
    for b, (ref, _, ref_kept) in enumerate(reference_for(kind, samples, name)):
        # rows are right-aligned per sample (fillers first); every real row is a text row or a kept vision row
        torch.testing.assert_close(logits[b, -len(ref):], ref, atol=1e-5, rtol=0)
        assert [stage[b] for stage in kept] == ref_kept
        assert len(ref) < int(valid[b].sum()) or not ref_kept or not ref_kept[0]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(kind, name, attn):
    """A left-padded batch: a 4-block video then an image, and a sample opening with a video (Qwen3-VL: timestamp
    text between blocks; FastV from layer 1 and PyramidDrop at 1 prune before DeepStack's addition after layer 1)."""
    assert_matches_reference(kind, attn, "videos", name)


@pytest.mark.parametrize("kind, name", [("qwen2_vl", "fastv-1"), ("qwen2_5_vl", "pdrop-1-2"), ("qwen3_vl", "fastv-1"),
                                        ("qwen3_vl", "pdrop-1-2")])
def test_several_images_a_video_and_a_text_only_sample(kind, name):
    assert_matches_reference(kind, "sdpa", "multi", name)


def test_deepstack_follows_the_kept_rows():
    """Qwen3-VL, FastV from layer 1: the output matches the reference only with each kept vision row receiving its
    own DeepStack feature after layer 1 (and all of them after layer 0)."""
    model, batch = model_for("qwen3_vl"), batch_for("qwen3_vl")
    with torch.no_grad(), ablate(model, "fastv", start_layer=1, keep=0.5):
        logits = model(**batch).logits
    without = reduced_reference(model, batch, "fastv", [1], 0.5, with_deepstack=False)
    for b, (ref, _, _) in enumerate(reference_for("qwen3_vl", "videos", "fastv-1")):
        torch.testing.assert_close(logits[b, -len(ref):], ref, atol=1e-5, rtol=0)
        assert (logits[b, -len(ref):] - without[b][0]).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("kind", KINDS)
def test_batch_equals_each_sample_alone(kind, name):
    """Left padding; several images and a video in one sample, a text-only sample (nothing pruned in it)."""
    model, samples = model_for(kind), SAMPLE_SETS["multi"]
    method = name.split("-")[0]
    with torch.no_grad(), ablate(model, method, **VARIANTS[name][0]):
        batched = model(**batch_for(kind, "multi")).logits
    for b, sample in enumerate(samples):
        with torch.no_grad(), warnings.catch_warnings(), ablate(model, method, **VARIANTS[name][0]):
            warnings.simplefilter("ignore")  # the text-only sample alone has no vision token
            alone = model(**make_batch(kind, (sample,))).logits[0]
        torch.testing.assert_close(batched[b, -len(alone):], alone, atol=1e-5, rtol=0)


def suppressed(model):
    return [model.config.image_token_id, model.config.video_token_id]


@pytest.mark.parametrize("kind, attn, names", [(kind, "sdpa", list(VARIANTS)) for kind in KINDS]
                         + [("qwen3_vl", "eager", ["pdrop-1-2"])])
def test_generate_with_cache_equals_recomputation(kind, attn, names):
    """Greedy generate() with the KV cache (pruned stages hold only the kept rows, decode positions from
    rope_deltas) equals the reference recomputing prompt + generated tokens each step, the ranking token fixed at
    the prompt's last token; images and a video, left padding."""
    model, batch = model_for(kind, attn), batch_for(kind)
    for name in names:
        assert_generate_equals_reference(
            model, batch, functools.partial(ablate, model, name.split("-")[0], **VARIANTS[name][0]),
            lambda generated, name=name: reduced_reference(model, batch, *VARIANTS[name][1], generated=generated),
            STEPS)


@pytest.mark.parametrize("kind", KINDS)
def test_model_is_unchanged_after_exit(kind):
    model, batch = model_for(kind), batch_for(kind)
    blocks = [functools.partial(ablate, model, name.split("-")[0], **kwargs) for name, (kwargs, _) in VARIANTS.items()]
    assert_unchanged_after_blocks(model, batch, blocks)
    assert all("forward" not in vars(layer) for layer in model.model.language_model.layers)
    assert "_deepstack_process" not in vars(model.model.language_model)
    assert "get_video_features" not in vars(model.model)


def enter(model, *args, **kwargs):
    with ablate(model, *args, **kwargs):
        pass


@pytest.mark.parametrize("kind", KINDS)
def test_visionzip_is_refused_in_one_line(kind):
    with pytest.raises(NotImplementedError, match=r"^visionzip on Qwen.*ForConditionalGeneration: VisionZip picks "
                                                  r"dominant tokens by the CLS token's attention and the Qwen-VL vision "
                                                  r"towers have no CLS token; use fastv or pdrop [^\n]*$"):
        enter(model_for(kind), "visionzip", dominant=4, contextual=2)


def test_pdrop_renumbered_positions_are_refused_in_one_line():
    """One rule (models.qwen_params) for ablate(), the runner and the plugin; the execution itself refuses a
    hand-built Variant the same way."""
    line = (r"^op=pdrop positions=renumber on a Qwen-VL model: M-RoPE gives every token its own \(temporal, height, "
            r"width\) position [^\n]*use positions=original \(the default on Qwen-VL\)$")
    model = model_for("qwen2_5_vl")
    with pytest.raises(ValueError, match=line):
        enter(model, "pdrop", layers=[1], keep=0.5, positions="renumber")
    variant = Variant("reduction", "pdrop", (1,), (("keep", 0.5), ("positions", "renumber")))
    with pytest.raises(NotImplementedError, match=line), family("reduction").load("execute")(model, variant):
        pass


def test_unsupported_backend_is_one_line():
    model = model_for("qwen2_vl", "eager")
    saved = model.config.text_config._attn_implementation
    model.config.text_config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(NotImplementedError, match=r"^op 'fastv' needs attention with an explicit"):
            enter(model, "fastv", start_layer=1, keep=0.5)
    finally:
        model.config.text_config._attn_implementation = saved
