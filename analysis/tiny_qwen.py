"""Tiny, offline instances of the HF Qwen-VL classes: Qwen2-VL, Qwen2.5-VL, Qwen3-VL.

Like :mod:`analysis.tiny` for LLaVA: random weights, a few layers, narrow widths, all built from configs,
and the real HF processor classes (``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor``)
around a locally built character-level tokenizer that has the special tokens these processors and a
ChatML chat template need (``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|vision_end|>``,
``<|image_pad|>``, ``<|video_pad|>``), so that
``processor(images=..., videos=..., text=..., return_tensors="pt")`` -> ``model(**batch)`` /
``model.generate(**batch)`` run exactly as with a hub checkpoint, without any download.

Sizes: ViT patch 4 px, spatial merge 2 (one LLM vision token per 8x8 px), temporal patch 2 frames; the image
and video processors keep between 4 and 64 merged tokens per image / per temporal block. Text: 64 wide,
4 heads of 16 (8 rotary frequencies split by ``mrope_section``), 3 layers. Qwen3-VL: DeepStack features of
vision layers 0 and 1 added after decoder layers 0 and 1, interleaved M-RoPE.
"""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from .tiny import CHARACTERS, widen_init

KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
GENERATION_CLASSES = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
}
PROCESSOR_CLASSES = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor, "qwen3_vl": Qwen3VLProcessor}

# Named as in the Qwen tokenizers; "<|endoftext|>" is Qwen's pad token.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<unk>"]

# Qwen's ChatML template (without the default system turn): each image / video part becomes
# <|vision_start|><|image_pad|><|vision_end|> (resp. <|video_pad|>), which the processor expands.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PATCH_SIZE = 4
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # pixels per merged token side
# Per image / per frame: between 4 and 64 merged tokens (smart_resize's min_pixels / max_pixels).
PIXELS = {"shortest_edge": 4 * FACTOR * FACTOR, "longest_edge": 64 * FACTOR * FACTOR}


def build_tokenizer(padding_side: str = "left") -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer with Qwen's special tokens (no BOS, like Qwen's)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
            "im_start_token": "<|im_start|>",
            "vision_pad_token": "<|vision_pad|>",
        },
        padding_side=padding_side,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")


def build_image_processor(kind: str = "qwen2_vl") -> Qwen2VLImageProcessor:
    """The image processor every Qwen-VL class uses (Qwen2-VL's), at the tiny patch size."""
    _check_kind(kind)
    return Qwen2VLImageProcessor(
        patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE, size=dict(PIXELS),
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )


def build_video_processor(kind: str = "qwen2_vl"):
    """Qwen2-VL's video processor (Qwen2.5-VL ships the same), or Qwen3-VL's. Frames are taken as given
    (``do_sample_frames=False``); Qwen3-VL's timestamps then come from the frame indices at the metadata's fps
    (24 when the video carries none, as in HF)."""
    _check_kind(kind)
    common = dict(
        patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_sample_frames=False,
        cap_pixels_per_frame=False,  # today's HF default, stated (silences HF's warning)
    )
    if kind == "qwen3_vl":
        # Qwen3-VL's size caps all frames together: room for 16 frames of 64 tokens.
        return Qwen3VLVideoProcessor(size={"shortest_edge": PIXELS["shortest_edge"],
                                           "longest_edge": 16 * PIXELS["longest_edge"]}, **common)
    return Qwen2VLVideoProcessor(size=dict(PIXELS), min_pixels=PIXELS["shortest_edge"],
                                 max_pixels=PIXELS["longest_edge"], **common)


def build_processor(kind: str = "qwen2_vl", *, padding_side: str = "left"):
    """The processor a checkpoint of ``kind`` ships with: image processor, tokenizer, video processor."""
    _check_kind(kind)
    return PROCESSOR_CLASSES[kind](
        image_processor=build_image_processor(kind), tokenizer=build_tokenizer(padding_side),
        video_processor=build_video_processor(kind), chat_template=CHAT_TEMPLATE,
    )


def _rope(kind: str) -> dict:
    # head_dim 16 -> 8 rotary frequencies: (temporal, height, width) sections.
    if kind == "qwen3_vl":  # interleaved: frequency i goes to H if i % 3 == 1, W if i % 3 == 2 (within the
        # sections' reach), else T; real checkpoints: [24, 20, 20] of 64.
        return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2], "mrope_interleaved": True}
    # Qwen2(.5)-VL: contiguous chunks T | H | W; real checkpoints: [16, 24, 24] of 64.
    return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}


def build_config(kind: str = "qwen2_vl", *, hidden_size: int = 64, num_layers: int = 3, num_heads: int = 4,
                 num_kv_heads: int = 2, intermediate_size: int = 128, vision_depth: int = 2,
                 vision_hidden_size: int = 32):
    """A config of ``kind`` whose token ids agree with :func:`build_tokenizer`."""
    _check_kind(kind)
    tokenizer = build_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    text = dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048, rms_norm_eps=1e-6, rope_parameters=_rope(kind),
        pad_token_id=pad, eos_token_id=eos,
    )
    vision = dict(
        depth=vision_depth, num_heads=2, in_channels=3, patch_size=PATCH_SIZE, spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
    )
    if kind == "qwen2_vl":
        text["bos_token_id"] = None
        vision.update(embed_dim=vision_hidden_size, hidden_size=hidden_size, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    if kind == "qwen2_5_vl":
        text["bos_token_id"] = None
        # window_size in pixels: 16 px = 2x2 merged tokens per attention window; block 1 attends fully.
        vision.update(hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
                      out_hidden_size=hidden_size, window_size=16, fullatt_block_indexes=[vision_depth - 1],
                      tokens_per_second=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    text["head_dim"] = hidden_size // num_heads
    # num_position_embeddings: learned 8x8 table, bilinearly interpolated to each grid.
    vision.update(hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size, out_hidden_size=hidden_size,
                  num_position_embeddings=64, deepstack_visual_indexes=list(range(min(2, vision_depth))))
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def build_model(kind: str = "qwen2_vl", *, seed: int = 0, attn_implementation: str = "sdpa",
                dtype=torch.float32, **config_kwargs):
    """A random-weight tiny model of the real HF class for ``kind``, in eval mode, reproducible from ``seed``."""
    config = build_config(kind, **config_kwargs)
    torch.manual_seed(seed)
    model = GENERATION_CLASSES[kind]._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    widen_init(model)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return model.eval()


def save_checkpoint(path, kind: str = "qwen2_5_vl", *, seed: int = 0, **config_kwargs):
    """Save a tiny random-weight model of ``kind`` and its processor with ``save_pretrained`` into ``path``, like a
    hub checkpoint: ``model.pretrained=<path>`` (runner) and ``pretrained=<path>`` (lmms-eval plugin) load it
    offline. Returns ``path``."""
    build_model(kind, seed=seed, **config_kwargs).save_pretrained(path)
    build_processor(kind).save_pretrained(path)
    return path
