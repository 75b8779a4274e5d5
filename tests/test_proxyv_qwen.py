"""ProxyV on Qwen2-VL / Qwen2.5-VL / Qwen3-VL: equal to an independent reference (tests/qwen_proxyv_reference.py:
proxies per image and per video block, M-RoPE positions downsampled like the features, DeepStack before the start
layer), spatial and learned, eager and sdpa, images, several images, videos, padding; batch == each sample alone;
generate() with the cache == greedy recomputation; save and load; unsupported settings are one clear error."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from qwen_helpers import KINDS, SAMPLE_SETS, greedy_recomputation, make_batch, model_for, suppressed
from qwen_proxyv_reference import qwen_proxyv_reference_logits

from analysis.proxyv import apply_proxyv, load_proxyv, proxyv_parameters, proxyv_shapes

START = {"qwen2_vl": 1, "qwen2_5_vl": 1, "qwen3_vl": 2}  # the tiny Qwen3-VL injects DeepStack after layers 0, 1
LEARNED = 3  # learned proxies per image / video block
STEPS = 3


@functools.cache
def proxyv_model(kind: str, attn: str = "sdpa", init: str = "spatial", factor: int = 2):
    model = copy.deepcopy(model_for(kind, attn)).eval()
    return apply_proxyv(model, START[kind], factor, init=init, seed=0,
                        learned_proxies=LEARNED if init == "learned" else 0)


@functools.cache
def batch_for(kind: str, samples: str, padding_side: str = "left"):
    return make_batch(kind, SAMPLE_SETS[samples], padding_side)


@functools.cache
def reference_for(kind: str, samples: str, init: str, factor: int = 2):
    return qwen_proxyv_reference_logits(proxyv_model(kind, "sdpa", init, factor), batch_for(kind, samples))


def valid_logits(model, batch):
    with torch.no_grad():
        logits = model(**batch).logits
    valid = batch["attention_mask"].bool()
    return [logits[b][valid[b]] for b in range(len(valid))]


@pytest.mark.parametrize("samples", sorted(SAMPLE_SETS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("init", ["spatial", "learned"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(kind, init, attn, samples):
    """pair: two images of different aspect ratios (grids 4x6 and 7x3: odd sides padded to f); multi: two images
    and a video in one sample beside a text-only one; videos: videos of several temporal blocks and an image."""
    got = valid_logits(proxyv_model(kind, attn, init), batch_for(kind, samples))
    for b, (g, want) in enumerate(zip(got, reference_for(kind, samples, init))):
        torch.testing.assert_close(g, want, atol=1e-5, rtol=0, msg=lambda m, b=b: f"sample {b}: {m}")


@pytest.mark.parametrize("kind", KINDS)
def test_a_factor_that_divides_no_grid(kind):
    """f = 3: every grid of the batch is padded up on both sides."""
    got = valid_logits(proxyv_model(kind, "sdpa", "spatial", 3), batch_for(kind, "videos"))
    for g, want in zip(got, reference_for(kind, "videos", "spatial", 3)):
        torch.testing.assert_close(g, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_proxyv_changes_the_output(kind):
    """The comparison above is not vacuous: ProxyV's output differs from the plain model's on every sample."""
    batch = batch_for(kind, "pair")
    plain, proxied = valid_logits(model_for(kind), batch), valid_logits(proxyv_model(kind), batch)
    for p, q in zip(plain, proxied):
        assert (p - q).abs().max() > 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_batch_equals_each_sample_alone(kind):
    for padding_side in ("left", "right"):
        model, batch = proxyv_model(kind, "sdpa", "learned"), batch_for(kind, "multi", padding_side)
        batched = valid_logits(model, batch)
        for b, parts in enumerate(SAMPLE_SETS["multi"]):
            alone = valid_logits(model, make_batch(kind, (parts,), padding_side))[0]
            torch.testing.assert_close(batched[b], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["spatial", "learned"])
@pytest.mark.parametrize("kind", KINDS)
def test_generate_with_cache_equals_greedy_recomputation(kind, init):
    """Decode steps read the cached vision keys (proxies never enter the cache) at M-RoPE positions."""
    model, batch = proxyv_model(kind, "sdpa", init), batch_for(kind, "videos")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, suppress_tokens=suppressed(model))
    assert out.past_key_values.get_seq_length() == out.sequences.shape[1] - 1
    ids, logits = greedy_recomputation(model, batch, STEPS)
    assert torch.equal(out.sequences, ids)
    for got, want in zip(out.logits, logits):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_give_identical_logits(tmp_path, kind):
    model = proxyv_model(kind, "sdpa", "learned")
    model.save_pretrained(tmp_path)
    loaded = load_proxyv(tmp_path, attn_implementation="sdpa").eval()
    assert loaded.config.proxyv == model.config.proxyv
    batch = batch_for(kind, "videos")
    for a, b in zip(valid_logits(model, batch), valid_logits(loaded, batch)):
        assert torch.equal(a, b)


def test_proxyv_parameters_receive_gradients():
    model = copy.deepcopy(proxyv_model("qwen2_5_vl", "sdpa", "learned")).train()
    batch = batch_for("qwen2_5_vl", "multi")
    model(**batch).logits.float().pow(2).mean().backward()
    params = proxyv_parameters(model)
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_proxy_counts_per_grid_and_block():
    """Spatial proxies per image and per temporal block: ceil(h/f) x ceil(w/f) each, in sequence order."""
    kind = "qwen3_vl"
    batch = batch_for(kind, "videos")
    shapes = proxyv_shapes(proxyv_model(kind).config, batch["input_ids"], batch["attention_mask"],
                           image_grid_thw=batch["image_grid_thw"], video_grid_thw=batch["video_grid_thw"])
    merge = 2
    grids = {"image": batch["image_grid_thw"].tolist(), "video": batch["video_grid_thw"].tolist()}
    ceil = lambda n: -(-n // 2)  # f = 2
    per_block = lambda g: (g[0], ceil(g[1] // merge) * ceil(g[2] // merge))
    # Sample 0: a video, then an image; sample 1: a video.
    (t0, n0), (t1, n1), (t2, n2) = per_block(grids["video"][0]), per_block(grids["image"][0]), per_block(grids["video"][1])
    assert shapes.counts == (((n0,) * t0, (n1,) * t1), ((n2,) * t2,))


def test_unsupported_settings_are_one_clear_error():
    with pytest.raises(ValueError, match=r"^init='learned' on a Qwen-VL model needs learned_proxies=N"):
        apply_proxyv(copy.deepcopy(model_for("qwen2_5_vl")), 1, 2, init="learned")
    with pytest.raises(ValueError, match=r"^start_layer=1: Qwen3-VL's DeepStack adds vision features to the vision "
                                         r"tokens after decoder layers 0\.\.1"):
        apply_proxyv(copy.deepcopy(model_for("qwen3_vl")), 1, 2)


def test_pre_encoded_features_without_grids_are_refused():
    model, batch = proxyv_model("qwen2_vl"), batch_for("qwen2_vl", "videos")
    with torch.no_grad():
        encoded = {"image": model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]),
                   "video": model.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"])}
    model.model.proxyv.locator.encoded_grids = {"image": None, "video": None}  # as if encoded by another model
    inputs = {k: v for k, v in batch.items() if k not in ("pixel_values", "pixel_values_videos", "image_grid_thw")}
    with pytest.raises(ValueError, match="^ProxyV: the call carries image features but no image_grid_thw"), \
            torch.no_grad():
        model(**inputs, mm_encoder_outputs=encoded)
