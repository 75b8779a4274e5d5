"""Tiny, offline instances of the HF classes real LLaVA checkpoints use.

Everything here is built from configs and a locally made character-level tokenizer, so that
``processor(images=..., text=...)`` -> ``model.generate(...)`` works exactly as with a hub
checkpoint, without any download. Used by the tests (random weights) and by the embedded
default model (trained weights, see docs/training.md).
"""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from .models import generation_class

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
# Printable ASCII plus newline: every prompt and answer of the synthetic tasks is spelled in these.
CHARACTERS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]

# A LLaVA-1.5-style conversation template: one user turn, the image token where the user put it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: {{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

TEXT_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer: one token per character, ``<s>`` prepended, ``<image>`` special."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def text_config(backbone: str = "llama", *, vocab_size: int, hidden_size: int = 64, num_layers: int = 4,
                num_heads: int = 4, num_kv_heads: int | None = None, intermediate_size: int = 128,
                **overrides):
    """A decoder-only text config of the given family (``llama`` / ``qwen2`` / ``mistral``)."""
    if backbone not in TEXT_CONFIGS:
        raise ValueError(f"unknown backbone {backbone!r}; known: {sorted(TEXT_CONFIGS)}")
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return TEXT_CONFIGS[backbone](**kwargs)


def vision_config(image_size: int = 32, patch_size: int = 8, hidden_size: int = 32, num_layers: int = 1,
                  num_heads: int = 2, intermediate_size: int = 64) -> CLIPVisionConfig:
    """A CLIP vision tower giving an (image_size/patch_size)^2 grid of patch tokens (+ CLS)."""
    return CLIPVisionConfig(
        image_size=image_size, patch_size=patch_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=intermediate_size, projection_dim=hidden_size,
    )


def image_processor(kind: str, image_size: int, grid_pinpoints=None):
    common = dict(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    if kind == "llava":
        return CLIPImageProcessor(**common)
    return LlavaNextImageProcessor(image_grid_pinpoints=grid_pinpoints, **common)


def default_pinpoints(image_size: int) -> list[list[int]]:
    """AnyRes resolutions of LLaVA-NeXT, scaled to the tiny crop size (1x2, 2x1, 2x2 crops)."""
    s = image_size
    return [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]


def build_processor(kind: str = "llava", *, image_size: int = 32, patch_size: int = 8, grid_pinpoints=None):
    """The processor a checkpoint of ``kind`` ('llava' = LLaVA-1.5, 'llava_next' = AnyRes) ships with."""
    tokenizer = build_tokenizer()
    if kind == "llava":
        return LlavaProcessor(
            image_processor=image_processor(kind, image_size), tokenizer=tokenizer, patch_size=patch_size,
            vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1,
        )
    if kind == "llava_next":
        return LlavaNextProcessor(
            image_processor=image_processor(kind, image_size, grid_pinpoints or default_pinpoints(image_size)),
            tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy="default",
            chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1,
        )
    raise ValueError(f"unknown kind {kind!r}; known: 'llava', 'llava_next'")


def build_config(kind: str = "llava", backbone: str = "llama", *, image_size: int = 32, patch_size: int = 8,
                 grid_pinpoints=None, vision_kwargs: dict | None = None, **text_kwargs):
    """A ``LlavaConfig`` / ``LlavaNextConfig`` whose token ids agree with :func:`build_tokenizer`."""
    tokenizer = build_tokenizer()
    text = text_config(backbone, vocab_size=len(tokenizer), **text_kwargs)
    vision = vision_config(image_size=image_size, patch_size=patch_size, **(vision_kwargs or {}))
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    common = dict(
        vision_config=vision, text_config=text, image_token_id=image_token_id, projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-1, tie_word_embeddings=False,
    )
    if kind == "llava":
        return LlavaConfig(**common)
    if kind == "llava_next":
        return LlavaNextConfig(image_grid_pinpoints=grid_pinpoints or default_pinpoints(image_size), **common)
    raise ValueError(f"unknown kind {kind!r}; known: 'llava', 'llava_next'")




def build_model(kind: str = "llava", backbone: str = "llama", *, seed: int = 0, attn_implementation: str = "sdpa",
                dtype=torch.float32, **config_kwargs):
    """A random-weight tiny model of the real HF class for ``kind``, in eval mode, reproducible from ``seed``."""
    config = build_config(kind, backbone, **config_kwargs)
    torch.manual_seed(seed)
    model = generation_class(kind)._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    widen_init(model)
    if kind == "llava_next":
        with torch.no_grad():
            model.model.image_newline.normal_(0.0, 1.0)
    return model.eval()


def widen_init(model) -> None:
    """Redraw a random model's matrices (std 0.12) and biases (std 0.1) in place. HF initialises with std 0.02; a
    larger std makes random models' outputs depend visibly on every layer, so equivalence tests can fail when a
    computation is wrong."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.12)
            elif "bias" in name:
                p.normal_(0.0, 0.1)
