"""What a FLOPs count reads of a model config: the text decoder's dimensions, and the vision tower's cost.

:class:`TextDims` is the one description of a Llama-family decoder (Llama, Qwen2, Mistral; GQA; any
head_dim) that every formula of this package takes, the operators' and ProxyV's alike.
"""

from __future__ import annotations

from dataclasses import dataclass

# Text backbones the decoder formulas cover: Llama-family layers (q/k/v/o, SwiGLU FFN), GQA, any head_dim.
TEXT_TYPES = ("llama", "qwen2", "mistral", "qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text")
# Qwen2's sliding window applies to the layers its ``layer_types`` mark (from ``max_window_layers`` on).
WINDOWED_BY_LAYER_TYPE = ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text")


@dataclass(frozen=True)
class TextDims:
    """What the FLOPs of a Llama-family decoder depend on (Llama, Qwen2, Mistral, and the text models of
    Qwen2-VL / Qwen2.5-VL / Qwen3-VL; GQA; any head_dim; q/k/v biases and Qwen3's q/k norms are not products)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    vocab: int
    windows: tuple[int | None, ...]  # sliding window of each layer (None: full causal)

    @classmethod
    def from_config(cls, config) -> TextDims:
        """From a LLaVA or Qwen-VL config (its ``text_config``) or a bare text-backbone config."""
        text = getattr(config, "text_config", None) or config
        if getattr(text, "model_type", None) not in TEXT_TYPES:
            raise ValueError(f"FLOPs model supports {', '.join(TEXT_TYPES)} text backbones, "
                             f"got {getattr(text, 'model_type', None)!r}")
        heads = text.num_attention_heads
        n_layers = text.num_hidden_layers
        window = getattr(text, "sliding_window", None)
        layer_types = getattr(text, "layer_types", None)
        if layer_types is not None and text.model_type in WINDOWED_BY_LAYER_TYPE:  # only its later layers
            windows = tuple(window if kind == "sliding_attention" else None for kind in layer_types)
        else:
            windows = (window,) * n_layers
        return cls(
            hidden=text.hidden_size,
            heads=heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            intermediate=text.intermediate_size,
            layers=n_layers,
            vocab=text.vocab_size,
            windows=windows,
        )

    @classmethod
    def of(cls, dims_or_config) -> TextDims:
        """``dims_or_config`` itself if it is a :class:`TextDims`, else :meth:`from_config` of it."""
        return dims_or_config if isinstance(dims_or_config, cls) else cls.from_config(dims_or_config)


def vision_flops(config, crops: int) -> int | None:
    """FLOPs of the vision tower and projector for ``crops`` crops; ``None`` without a vision tower.

    Per crop of S tokens (P = (image/patch)² patches, + 1 CLS token for CLIP; SigLIP has none), with
    Dv hidden, Fv MLP width and L layers -- every layer runs, also when ``vision_feature_layer``
    selects an earlier one::

        patch embedding  2·P·(3·p²)·Dv
        each layer       4·2·S·Dv² (q, k, v, o) + 2·2·S²·Dv (scores, weighted sum) + 2·2·S·Dv·Fv (MLP)
        projector        2·R·(Dv·n_feature_layers)·D + 2·R·D·D,  R = S - 1 ("default" drops CLS) or S

    LLaVA-NeXT runs the tower and projector on every crop (base + high-res) before unpadding.
    (:func:`tower_flops` and :func:`projector_flops` are the two parts; VisionZip runs the projector on
    fewer rows, :mod:`analysis.flops.visionzip`.)
    """
    if getattr(config, "vision_config", None) is None:
        return None
    seq = tower_tokens(config)
    rows = seq - 1 if config.vision_feature_select_strategy == "default" else seq
    return tower_flops(config, crops) + crops * projector_flops(config, rows)


def tower_tokens(config) -> int:
    """Tokens of one crop in the tower: its patches, + 1 CLS token for CLIP (SigLIP has none)."""
    vision = config.vision_config
    kind = getattr(vision, "model_type", None)
    if kind not in ("clip_vision_model", "siglip_vision_model"):
        raise ValueError(f"vision FLOPs support CLIP and SigLIP towers, got {kind!r}")
    return (vision.image_size // vision.patch_size) ** 2 + (1 if kind == "clip_vision_model" else 0)


def tower_flops(config, crops: int) -> int:
    """The vision tower alone (patch embedding and every layer) on ``crops`` crops (see :func:`vision_flops`)."""
    vision = config.vision_config
    seq = tower_tokens(config)
    patches = (vision.image_size // vision.patch_size) ** 2
    dv, fv = vision.hidden_size, vision.intermediate_size
    embed = 2 * patches * vision.num_channels * vision.patch_size ** 2 * dv
    layer = 4 * 2 * seq * dv * dv + 2 * 2 * seq * seq * dv + 2 * 2 * seq * dv * fv
    return crops * (embed + vision.num_hidden_layers * layer)


def projector_flops(config, rows: int) -> int:
    """LLaVA's two-layer projector on ``rows`` feature rows: 2·rows·(Dv·n_feature_layers)·D + 2·rows·D·D."""
    feature_layers = config.vision_feature_layer
    n_features = 1 if isinstance(feature_layers, int) else len(feature_layers)
    d = config.text_config.hidden_size
    return 2 * rows * config.vision_config.hidden_size * n_features * d + 2 * rows * d * d


def tokens_per_crop(config) -> int | None:
    """LM tokens one crop becomes: (image_size / patch_size)², as LLaVA-1.5 / NeXT lay them out."""
    vision = getattr(config, "vision_config", None)
    return None if vision is None else (vision.image_size // vision.patch_size) ** 2
