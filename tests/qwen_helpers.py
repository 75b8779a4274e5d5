"""Shared helpers for the Qwen-VL tests: tiny random-weight models and processors (cached), batches of chat
prompts with images of different sizes, several images, videos, text-only samples, left or right padding."""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
from PIL import Image

from analysis import tiny_qwen

KINDS = tiny_qwen.KINDS
VIDEO_FPS = 2.0  # the videos' metadata: frames taken at 2 fps (Qwen's default sampling rate)


@functools.cache
def model_for(kind: str, attn: str = "sdpa"):
    return tiny_qwen.build_model(kind, seed=1, attn_implementation=attn)


@functools.cache
def processor_for(kind: str, padding_side: str = "left"):
    return tiny_qwen.build_processor(kind, padding_side=padding_side)


def image(seed: int, height: int, width: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8))


def video(seed: int, frames: int, height: int, width: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 255, (frames, height, width, 3), dtype=np.uint8)


# A sample: a list of parts, ("text", str) / ("image", (seed, h, w)) / ("video", (seed, frames, h, w)).
# Two images of different sizes and prompt lengths -> padding.
PAIR = (
    [("image", (0, 32, 48)), ("text", "What is written here?")],
    [("image", (1, 56, 24)), ("text", "Hi")],
)
# Several images and a video in one sample, and a sample without vision.
MULTI = (
    [("image", (2, 40, 40)), ("text", "and"), ("image", (3, 24, 72)), ("text", "then"), ("video", (4, 4, 24, 40)),
     ("text", "Compare.")],
    [("text", "No image in this one, only text.")],
)
# Videos of several temporal blocks (t=4 > h, w: the temporal extent exceeds the spatial one), one with an image
# after it; a video first in a sample.
VIDEOS = (
    [("text", "Watch"), ("video", (5, 8, 16, 24)), ("text", "and look"), ("image", (6, 24, 32)), ("text", "?")],
    [("video", (7, 6, 32, 32)), ("text", "What happens?")],
)
SAMPLE_SETS = {"pair": PAIR, "multi": MULTI, "videos": VIDEOS}


def messages(parts) -> list[dict]:
    content = [{"type": kind, "text": value} if kind == "text" else {"type": kind} for kind, value in parts]
    return [{"role": "user", "content": content}]


def make_batch(kind: str, samples=PAIR, padding_side: str = "left"):
    """The processor's batch for ``samples``: chat template, then images / videos (with 2 fps metadata)."""
    processor = processor_for(kind, padding_side)
    texts = [processor.apply_chat_template(messages(parts), add_generation_prompt=True) for parts in samples]
    images = [image(*spec) for parts in samples for k, spec in parts if k == "image"]
    videos = [video(*spec) for parts in samples for k, spec in parts if k == "video"]
    extra = {}
    if videos:
        extra["videos"] = videos
        extra["video_metadata"] = [{"total_num_frames": len(v), "fps": VIDEO_FPS, "frames_indices": list(range(len(v)))}
                                   for v in videos]
    return processor(images=images or None, text=texts, return_tensors="pt", padding=True, **extra)


def rope_index(model, batch) -> torch.Tensor:
    """The model's own M-RoPE positions ``(3, B, T)`` of ``batch``."""
    keys = ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "attention_mask",
            "second_per_grid_ts")
    with torch.no_grad():
        positions, _ = model.model.get_rope_index(**{k: batch[k] for k in keys if k in batch})
    return positions


def suppressed(model) -> list[int]:
    """A generated <|image_pad|> / <|video_pad|> would be a featureless vision token: never generate one."""
    return [model.config.image_token_id, model.config.video_token_id]


def greedy_recomputation(model, batch, steps: int, context=contextlib.nullcontext):
    """Greedy decoding re-running the whole sequence each step (no cache), each forward inside ``context()``, the
    model computing its own M-RoPE positions each time (get_rope_index over the grown sequence): the reference
    for generate() with a KV cache. Returns (ids, per-step last logits)."""
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"]
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    step_logits = []
    for _ in range(steps):
        with torch.no_grad(), context():
            logits = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, use_cache=False,
                           **extra).logits[:, -1]
        step_logits.append(logits)
        next_ids = logits.clone()
        next_ids[:, suppressed(model)] = -torch.inf
        next_ids = next_ids.argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, next_ids], 1), torch.cat([mask, torch.ones_like(next_ids)], 1)
        types = torch.cat([types, torch.zeros_like(next_ids)], 1)
    return ids, step_logits


def assert_generate_equals_reference(model, batch, context, reference, steps: int) -> None:
    """Greedy ``generate()`` with the KV cache inside ``context()`` equals ``reference(generated)`` (per sample
    (logits of the alive tokens, ...) for the prompt + the tokens generated so far) step by step, to 1e-5: the
    logits of every step and the tokens chosen."""
    with torch.no_grad(), context():
        out = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, suppress_tokens=suppressed(model))
    generated = [[] for _ in range(batch["input_ids"].shape[0])]
    for step in range(steps):
        last = torch.stack([logits[-1] for logits, *_ in reference(generated)])
        torch.testing.assert_close(out.logits[step], last, atol=1e-5, rtol=0)
        last[:, suppressed(model)] = -torch.inf
        for b, token in enumerate(last.argmax(-1).tolist()):
            generated[b].append(token)
    assert out.sequences[:, -steps:].tolist() == generated
