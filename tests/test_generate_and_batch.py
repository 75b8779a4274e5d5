"""ablate() under generate() with a KV cache, and batch == per-sample."""

from __future__ import annotations

import pytest
import torch

from analysis import ablate
from conftest import MODEL_SPECS, PAIR, greedy_recomputation, make_batch, model_for, position_ids

STEPS = 5


def full_recomputation(model, batch, op, layers, steps=STEPS):
    """Greedy decoding by re-running the whole sequence each step (no cache), under the same op."""
    return greedy_recomputation(model, batch, steps, lambda: ablate(model, op, layers=layers))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("op", ["none", "mask_v2v", "skip_attn", "skip_ffn", "skip_attn_ffn", "drop_v2t"])
def test_generate_with_cache_equals_full_recomputation(spec, attn, op):
    model = model_for(spec, attn)
    batch = make_batch(MODEL_SPECS[spec][0])
    layers = range(1, 4)
    with torch.no_grad(), ablate(model, op, layers=layers):
        out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, min_new_tokens=STEPS,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                             suppress_tokens=[model.config.image_token_id])
    expected_ids, expected_logits = full_recomputation(model, batch, op, layers)
    assert torch.equal(out.sequences, expected_ids)
    for got, want in zip(out.logits, expected_logits):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_drop_v2t_is_applied_in_every_decode_step():
    """Decode steps must not read vision keys: generated logits differ from prefill-only dropping."""
    model = model_for("llava-llama")
    batch = make_batch("llava")
    layers = range(0, 4)
    with torch.no_grad(), ablate(model, "drop_v2t", layers=layers):
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, min_new_tokens=3, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    # With vision keys cut for every text query, the image cannot influence the output at all.
    blank = dict(batch)
    blank["pixel_values"] = torch.zeros_like(batch["pixel_values"])
    with torch.no_grad(), ablate(model, "drop_v2t", layers=layers):
        out_blank = model.generate(**blank, max_new_tokens=3, do_sample=False, min_new_tokens=3, output_logits=True,
                                   return_dict_in_generate=True, pad_token_id=0)
    for a, b in zip(out.logits, out_blank.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("op", ["mask_v2v", "skip_attn", "skip_ffn", "skip_attn_ffn", "drop_v2t"])
def test_batch_equals_each_sample_alone(spec, op):
    kind = MODEL_SPECS[spec][0]
    model = model_for(spec)
    batch = make_batch(kind, PAIR)
    with torch.no_grad(), ablate(model, op, start_layer=1):
        batched = model(**batch, position_ids=position_ids(batch["attention_mask"])).logits
        for b, sample in enumerate(PAIR):
            alone = make_batch(kind, (sample,))
            logits = model(**alone).logits[0]
            valid = batch["attention_mask"][b].bool()
            torch.testing.assert_close(batched[b][valid], logits, atol=1e-5, rtol=0)
