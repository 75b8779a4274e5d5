"""The embedded default's architecture: HF LlavaForConditionalGeneration, 32 narrow Llama layers."""

from __future__ import annotations

from analysis import tiny

IMAGE_SIZE = 64  # 8 x 8 cells of 8 px: one glyph per CLIP patch
PATCH_SIZE = 8
VISION = dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512)
# 32 layers like the paper's 7B models, so a layer index means the same depth as there.
TEXT = dict(hidden_size=128, num_layers=32, num_heads=4, intermediate_size=344)


def default_config(**text_overrides):
    """LlavaConfig of the tiny default (char-level vocabulary of :func:`analysis.tiny.build_tokenizer`)."""
    return tiny.build_config(
        "llava", "llama", image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vision_kwargs=VISION,
        **{**TEXT, **text_overrides},
    )


def default_processor():
    return tiny.build_processor("llava", image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
