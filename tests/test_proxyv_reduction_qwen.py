"""FastV and PyramidDrop on a ProxyV Qwen2-VL / Qwen2.5-VL / Qwen3-VL model (learned proxies, every drop at or
before ProxyV's start layer): equal to an independent reference (tests/qwen_proxyv_reduction_reference.py: the
plain-loop reduction reference up to the start layer, then the plain-loop ProxyV reference on the surviving
tokens, each block's learned proxies over its surviving cells at their mean M-RoPE position), eager and sdpa,
images and multi-block videos, padding, a text-only sample; batch == each sample alone; generate() with the
cache == the reference recomputing prompt + generated tokens; the model is unchanged after exit; the refused
combinations are one clear line."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from qwen_helpers import KINDS, SAMPLE_SETS, assert_generate_equals_reference, make_batch, model_for, suppressed
from qwen_proxyv_reduction_reference import reduction_reference
from qwen_reference import reduced_reference

from analysis import ablate
from analysis.proxyv import apply_proxyv

L = 2  # ProxyV's start layer: the tiny models have 3 layers; the tiny Qwen3-VL injects DeepStack after 0, 1
LEARNED = 3  # learned proxies per image / video block
# name: (op, ablate() keywords, (method, boundaries, keep) for the reference); every drop <= L
VARIANTS = {
    "fastv-before-L": ("fastv", {"start_layer": 1, "keep": 0.5}, ("fastv", [1], 0.5)),
    "fastv-at-L": ("fastv", {"start_layer": L, "keep": 0.4}, ("fastv", [L], 0.4)),
    "pdrop": ("pdrop", {"layers": [1, L], "keep": 0.6}, ("pdrop", [1, L], 0.6)),
}
# keep 10% before L: whole video blocks lose every cell (test_blocks_without_a_surviving_cell)
SPARSE = {"fastv-sparse": ("fastv", {"start_layer": 1, "keep": 0.1}, ("fastv", [1], 0.1))}
STEPS = 3


@functools.cache
def proxyv_model(kind: str, attn: str = "sdpa", init: str = "learned", start: int = L):
    model = copy.deepcopy(model_for(kind, attn)).eval()
    return apply_proxyv(model, start, 2, init=init, seed=0, learned_proxies=LEARNED if init == "learned" else 0)


@functools.cache
def batch_for(kind: str, samples: str, padding_side: str = "left"):
    return make_batch(kind, SAMPLE_SETS[samples], padding_side)


@functools.cache
def reference_for(kind: str, samples: str, name: str):
    return reduction_reference(proxyv_model(kind), batch_for(kind, samples), *{**VARIANTS, **SPARSE}[name][2])


def reduced(model, name):
    op, kwargs, _ = {**VARIANTS, **SPARSE}[name]
    return ablate(model, op, **kwargs)


def assert_matches_reference(kind, attn, samples, name):
    model, batch = proxyv_model(kind, attn), batch_for(kind, samples)
    with torch.no_grad(), reduced(model, name) as red:
        logits = model(**batch).logits
        kept = [[t.tolist() for t in stage] for stage in red.kept_vision]
    expected = reference_for(kind, samples, name)
    assert logits.shape[1] == max(len(alive) for _, alive, _ in expected)
    for b, (ref, _, ref_kept) in enumerate(expected):
        # rows are right-aligned per sample (fillers first); every real row is a text row or a kept vision row
        torch.testing.assert_close(logits[b, -len(ref):], ref, atol=1e-5, rtol=0, msg=lambda m, b=b: f"{b}: {m}")
        assert [stage[b] for stage in kept] == ref_kept
    return logits


@pytest.mark.parametrize("samples", ["videos", "multi"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(kind, name, attn, samples):
    """videos: a left-padded batch, a 4-block video then an image, and a sample opening with a 3-block video
    (Qwen3-VL: timestamp text between blocks; drops before its second DeepStack addition); multi: two images and
    a video in one sample beside a text-only sample (nothing pruned in it)."""
    assert_matches_reference(kind, attn, samples, name)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", KINDS)
def test_blocks_without_a_surviving_cell(kind, attn):
    """FastV from layer 1 keeping 10%: some video blocks lose every cell (they get no proxy). On Qwen3-VL sample
    0's video loses its first two blocks, so its first surviving cell comes after timestamp text: its proxies
    still see only the text before the video's original first token (a rule that starts the grid at its first
    surviving cell, as on LLaVA, fails here)."""
    assert_matches_reference(kind, attn, "videos", "fastv-sparse")
    batch, config = batch_for(kind, "videos"), proxyv_model(kind).config
    merge = config.vision_config.spatial_merge_size
    t, h, w = batch["video_grid_thw"][0].tolist()  # sample 0's video: 4 blocks of 2 x 3 merged tokens
    blocks = (batch["input_ids"][0] == config.video_token_id).nonzero().flatten().view(t, -1).tolist()
    assert len(blocks[0]) == (h // merge) * (w // merge)
    kept = set(reference_for(kind, "videos", "fastv-sparse")[0][2][0])
    emptied = [not kept & set(block) for block in blocks]
    assert any(emptied) and not all(emptied)
    if kind == "qwen3_vl":
        assert emptied[0]


@pytest.mark.parametrize("kind", KINDS)
def test_the_comparison_is_not_vacuous(kind):
    """The combination differs from the reduction alone on the plain model (the proxies act), and some block of
    the batch lost cells before the start layer (the proxies are planned over a broken grid)."""
    batch = batch_for(kind, "videos")
    plain = reduced_reference(model_for(kind), batch, "fastv", [1], 0.5)
    for (ref, _, kept), (alone, _, _) in zip(reference_for(kind, "videos", "fastv-before-L"), plain):
        assert (ref - alone).abs().max() > 1e-3
        assert kept[0]
    vision = (batch["input_ids"] == model_for(kind).config.image_token_id) | \
             (batch["input_ids"] == model_for(kind).config.video_token_id)
    kept = sum(len(k[0]) for _, _, k in reference_for(kind, "videos", "fastv-before-L"))
    assert kept < int(vision.sum())


@pytest.mark.parametrize("name", ["fastv-before-L", "pdrop"])
@pytest.mark.parametrize("kind", KINDS)
def test_batch_equals_each_sample_alone(kind, name):
    """Left and right padding; several images and a video in one sample, a text-only sample."""
    model = proxyv_model(kind)
    for padding_side in ("left", "right"):
        batch = batch_for(kind, "multi", padding_side)
        with torch.no_grad(), reduced(model, name):
            batched = model(**batch).logits
            for b, parts in enumerate(SAMPLE_SETS["multi"]):
                alone = model(**make_batch(kind, (parts,), padding_side)).logits[0]
                # either padding side: the pruned output right-aligns each sample's rows (fillers first)
                torch.testing.assert_close(batched[b, -len(alone):], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind, attn, names", [(kind, "sdpa", list(VARIANTS)) for kind in KINDS]
                         + [("qwen3_vl", "eager", ["pdrop"])])
def test_generate_with_cache_equals_recomputation(kind, attn, names):
    """Greedy generate() with the KV cache (pruned stages hold only the kept rows, proxies never enter it, decode
    positions from rope_deltas) equals the reference recomputing prompt + generated tokens each step, the ranking
    token fixed at the prompt's last; images and multi-block videos, left padding."""
    model, batch = proxyv_model(kind, attn), batch_for(kind, "videos")
    for name in names:
        assert_generate_equals_reference(
            model, batch, functools.partial(reduced, model, name),
            functools.partial(reduction_reference, model, batch, *VARIANTS[name][2]), STEPS)


@pytest.mark.parametrize("kind", KINDS)
def test_model_is_unchanged_after_exit(kind):
    """Forward and generate inside each variant's block, and an exception inside one, leave the ProxyV model
    bit-identical: logits, weights, per-instance forwards and hooks; ProxyV no longer has a host."""
    model, batch = proxyv_model(kind), batch_for(kind, "videos")
    core = model.model

    def attached():
        return ({i: vars(layer).get("forward") for i, layer in enumerate(core.language_model.layers)},
                {k: v for k, v in vars(core).items() if k.startswith("get_")},
                vars(core.language_model).get("_deepstack_process"),
                {name: (list(m._forward_hooks.values()), list(m._forward_pre_hooks.values()))
                 for name, m in model.named_modules()})

    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before, hooks = model(**batch).logits, attached()
        for name in VARIANTS:
            with reduced(model, name):
                shorter = model(**batch).logits
                model.generate(**batch, max_new_tokens=2, do_sample=False, suppress_tokens=suppressed(model))
            assert shorter.shape[1] < before.shape[1]
        with pytest.raises(KeyError), reduced(model, "pdrop"):
            raise KeyError("boom")
        after = model(**batch).logits
    assert torch.equal(before, after)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert attached() == hooks
    assert core.proxyv.host is None and core.proxyv.state is None


def enter(model, *args, **kwargs):
    with ablate(model, *args, **kwargs):
        pass


@pytest.mark.parametrize("kind", KINDS)
def test_refused_combinations_are_one_clear_line(kind):
    """As on LLaVA (analysis/reduction/rules.py): spatial proxies, no proxies, a drop after the start layer."""
    with pytest.raises(ValueError, match=r"^fastv on a ProxyV model with spatial proxies: token reduction breaks the "
                                         r"crop grid [^\n]*$"):
        enter(proxyv_model(kind, init="spatial"), "fastv", start_layer=1, keep=0.5)
    with pytest.raises(ValueError, match=r"^pdrop on a ProxyV model without proxies \(init='none'\): not supported "
                                         r"[^\n]*$"):
        enter(proxyv_model(kind, init="none"), "pdrop", layers=[1, 2], keep=0.5)
    early = proxyv_model("qwen2_5_vl", start=1)
    with pytest.raises(ValueError, match=r"^fastv drops vision tokens before layer 2, after ProxyV's start layer 1: "
                                         r"every drop must come at or before layer 1 [^\n]*$"):
        enter(early, "fastv", start_layer=2, keep=0.5)
    with pytest.raises(ValueError, match=r"^pdrop drops vision tokens before layer 2, after ProxyV's start layer 1"):
        enter(early, "pdrop", layers=[1, 2], keep=0.5)
    with pytest.raises(ValueError, match=r"^op=pdrop positions=renumber on a Qwen-VL model"):
        enter(proxyv_model(kind), "pdrop", layers=[1, 2], keep=0.5, positions="renumber")
