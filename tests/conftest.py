"""Shared fixtures: tiny random-weight LLaVA models of the real HF classes, and batches for them."""

from __future__ import annotations

import contextlib
import functools
import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(2)

from analysis import tiny  # noqa: E402

# (kind, backbone, extra config): LLaVA-1.5 and LLaVA-NeXT layouts; Llama, Qwen2 (q/k/v bias) with GQA, Mistral.
MODEL_SPECS = {
    "llava-llama": ("llava", "llama", {}),
    "llava-qwen2-gqa": ("llava", "qwen2", {"num_kv_heads": 2}),
    "next-llama": ("llava_next", "llama", {}),
    "next-mistral-gqa": ("llava_next", "mistral", {"num_kv_heads": 1, "sliding_window": None}),
}


# Only for forward passes: HF's own generate() with a sliding-window cache differs from a full
# recomputation after the window fills, so generate tests use the specs above.
SLIDING_SPECS = {"next-mistral-window": ("llava_next", "mistral", {"num_kv_heads": 2, "sliding_window": 24})}


@functools.cache
def model_for(spec: str, attn: str = "sdpa"):
    kind, backbone, extra = {**MODEL_SPECS, **SLIDING_SPECS}[spec]
    return tiny.build_model(kind, backbone, attn_implementation=attn, seed=1, **extra)


@functools.cache
def processor_for(kind: str, padding_side: str = "left"):
    processor = tiny.build_processor(kind)
    processor.tokenizer.padding_side = padding_side
    return processor


def image(seed: int, height: int = 32, width: int = 32) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8))


# Two samples with different prompt lengths and (for AnyRes) different image sizes -> padding.
PAIR = (
    ("USER: <image>\nWhat is written here? ASSISTANT:", [(0, 32, 48)]),
    ("USER: <image>\nHi ASSISTANT:", [(1, 64, 40)]),
)
# Several images in one sample, and a sample without any image.
MULTI = (
    ("USER: <image>\nand <image>\nCompare. ASSISTANT:", [(2, 40, 40), (3, 20, 70)]),
    ("USER: No image in this one, only text. ASSISTANT:", []),
)


def make_batch(kind: str, samples=PAIR, padding_side: str = "left"):
    processor = processor_for(kind, padding_side)
    texts = [text for text, _ in samples]
    images = [image(*spec) for _, specs in samples for spec in specs]
    return processor(images=images or None, text=texts, return_tensors="pt", padding=True)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only attended tokens, as generate() makes them for left-padded batches."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@pytest.fixture(params=list(MODEL_SPECS))
def spec(request):
    return request.param


def greedy_recomputation(model, batch, steps: int, context=contextlib.nullcontext):
    """Greedy decoding by re-running the whole sequence each step (no cache), each forward inside
    ``context()``: the reference for generate() with a KV cache. Returns (ids, per-step last logits)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    step_logits = []
    for _ in range(steps):
        with torch.no_grad(), context():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False,
                           **extra).logits[:, -1]
        step_logits.append(logits)
        # A generated <image> id would be a new, featureless image: suppressed here as in generate().
        next_ids = logits.masked_fill(torch.arange(logits.shape[-1]) == model.config.image_token_id, -torch.inf)
        ids = torch.cat([ids, next_ids.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids, step_logits


def assert_unchanged_after_blocks(model, batch, blocks):
    """Forward and generate inside each of ``blocks`` (zero-argument context factories), and an exception inside
    the first, leave the model as it was: same logits, same weights, the same hooks (HF installs its own on a
    first call: those stay), no per-instance ``get_image_features``."""
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def hooks():
        return {name: (list(m._forward_hooks.values()), list(m._forward_pre_hooks.values()))
                for name, m in model.named_modules()}

    with torch.no_grad():
        vanilla = model(**batch).logits
        model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
        before = hooks()
        for block in blocks:
            with block():
                model(**batch)
                model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
        with pytest.raises(KeyError), blocks[0]():
            raise KeyError("boom")
        after = model(**batch).logits
    assert torch.equal(vanilla, after)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert hooks() == before
    assert "get_image_features" not in vars(model.model)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's generation (2 threads on a shared 2-core box thrash); restored after.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def composed_config(*overrides: str) -> dict:
    """conf/config.yaml composed with ``overrides`` as the runner composes one job, resolved to plain containers
    (what ``analysis.runner.spec.prepare`` takes)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from analysis.config_groups import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="config", overrides=list(overrides)), resolve=True)
