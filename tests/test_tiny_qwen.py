"""The tiny offline Qwen-VL fixtures behave like hub checkpoints: the real processor and model classes,
processor -> forward -> generate with images, videos and padding; reproducible from the seed."""

from __future__ import annotations

import pytest
import torch

from analysis import tiny_qwen
from qwen_helpers import KINDS, SAMPLE_SETS, make_batch, model_for, processor_for


@pytest.mark.parametrize("kind", KINDS)
def test_classes_and_token_ids(kind):
    model, processor = model_for(kind), processor_for(kind)
    assert type(model) is tiny_qwen.GENERATION_CLASSES[kind]
    assert type(processor) is tiny_qwen.PROCESSOR_CLASSES[kind]
    config = model.config
    assert processor.image_token_id == config.image_token_id
    assert processor.video_token_id == config.video_token_id
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids("<|vision_start|>") == config.vision_start_token_id
    assert tokenizer.convert_tokens_to_ids("<|vision_end|>") == config.vision_end_token_id
    assert config.text_config.vocab_size == len(tokenizer)
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert processor.image_processor.patch_size == config.vision_config.patch_size
    assert processor.video_processor.merge_size == config.vision_config.spatial_merge_size
    if kind == "qwen3_vl":
        assert list(config.vision_config.deepstack_visual_indexes) == [0, 1]


def test_build_is_reproducible():
    a = tiny_qwen.build_model("qwen3_vl", seed=3).state_dict()
    b = tiny_qwen.build_model("qwen3_vl", seed=3).state_dict()
    c = tiny_qwen.build_model("qwen3_vl", seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ValueError, match="unknown kind 'qwen4_vl'"):
        tiny_qwen.build_config("qwen4_vl")


@pytest.mark.parametrize("kind", KINDS)
def test_generate_equals_greedy_recomputation(kind):
    """generate() with a KV cache (M-RoPE deltas, left padding, images + video + a text-only sample) gives the
    tokens of re-running the whole sequence each step through the model's own forward."""
    model = model_for(kind)
    batch = make_batch(kind, SAMPLE_SETS["multi"], "left")
    assert {"pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw"} <= set(batch)
    steps = 3
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=steps, do_sample=False)
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"]
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, use_cache=False,
                           **extra).logits[:, -1]
        next_ids = logits.argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, next_ids], 1), torch.cat([mask, torch.ones_like(next_ids)], 1)
        types = torch.cat([types, torch.zeros_like(next_ids)], 1)
    assert torch.equal(generated, ids)
    # The random model's answers differ between samples: the vision inputs matter.
    assert not torch.equal(generated[0, -steps:], generated[1, -steps:])
