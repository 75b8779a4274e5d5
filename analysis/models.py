"""Which HF model classes the toolkit drives, and where their parts are."""

from __future__ import annotations

import importlib.util
import os

import torch
from transformers import (
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2VLForConditionalGeneration,
    Qwen2VLModel,
    Qwen3VLForConditionalGeneration,
    Qwen3VLModel,
)

# The one map of supported LLaVA classes: config.model_type -> (the class checkpoints load as, its core model).
LLAVA_CLASSES = {
    "llava": (LlavaForConditionalGeneration, LlavaModel),
    "llava_next": (LlavaNextForConditionalGeneration, LlavaNextModel),
}
GENERATION_CLASSES = {kind: classes[0] for kind, classes in LLAVA_CLASSES.items()}
SUPPORTED_CLASSES = (*GENERATION_CLASSES.values(), *(classes[1] for classes in LLAVA_CLASSES.values()))
SUPPORTED_BACKBONES = ("llama", "qwen2", "mistral")
# Qwen-VL classes (issue 12): config.model_type -> (generation class, core model), text backbone model_types.
# The operators of analysis.ops and token reduction (ablate), ProxyV, the FLOPs model, the runner and the lmms-eval
# plugin drive them; llava_core() -- and with it training -- still refuses them; vlm_core() accepts both.
QWEN_VL_CLASSES = {
    "qwen2_vl": (Qwen2VLForConditionalGeneration, Qwen2VLModel),
    "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel),
    "qwen3_vl": (Qwen3VLForConditionalGeneration, Qwen3VLModel),
}
QWEN_VL_BACKBONES = ("qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text")
QWEN_VL_SUPPORTED_CLASSES = tuple(c for classes in QWEN_VL_CLASSES.values() for c in classes)


def pick_device(device: str | None = None) -> torch.device:
    """``device``, or for ``None`` / ``"auto"``: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    if device not in (None, "", "auto"):
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return torch.device("cpu")


# A backend the vision tower may run on while the language model runs another (see attn_implementations).
VISION_ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def attn_implementations(text: str, vision: str | None = None, device_type: str | None = None) -> str | dict:
    """``attn_implementation`` for ``from_pretrained``: ``text`` for the whole model; with a ``vision`` backend,
    ``text`` for the model and its language model and ``vision`` for its tower (transformers' per-sub-config form).

    Why: the operators, token reduction and ProxyV need an explicit-mask backend (eager / sdpa) in the decoder only.
    Qwen2.5-VL's windowed tower under sdpa or eager runs one attention call per window (tens of thousands per long
    video, bound by the host's launches); under ``flash_attention_2`` it runs one varlen call per block. A value that
    cannot run is one line (ValueError): an unknown backend, flash-attn not installed, a device that is not CUDA.
    """
    if vision is None or vision == text:
        return text
    if vision not in VISION_ATTN_IMPLEMENTATIONS:
        known = ", ".join(VISION_ATTN_IMPLEMENTATIONS)
        raise ValueError(f"vision_attn_implementation={vision!r} is not one of {known}")
    if vision == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("vision_attn_implementation='flash_attention_2' needs the flash-attn package; install it "
                             "on a CUDA machine with: .venv/bin/pip install -c constraints.txt '.[gpu]'")
        if device_type not in (None, "cuda"):
            raise ValueError("vision_attn_implementation='flash_attention_2' runs on a CUDA GPU, "
                             f"not on {device_type}")
    return {"": text, "text_config": text, "vision_config": vision}


# Methods beyond the six operators that the runner and the lmms-eval plugin run on Qwen-VL models (FastV and PyramidDrop:
# analysis.reduction; ProxyV checkpoints: analysis.proxyv). A method not listed here is refused in one line.
QWEN_VL_METHODS = ("fastv", "pdrop", "proxyv")


def qwen_runs(method: str, family_name: str) -> bool:
    """Whether the runner and the plugin run ``method`` (of the variant family ``family_name``) on Qwen-VL models."""
    return family_name == "ablation" or method in QWEN_VL_METHODS


def qwen_params(method: str, params: dict) -> dict:
    """The parameters ``method`` runs with on a Qwen-VL model -- the one rule that ``ablate()``, the runner and the
    plugin apply: PyramidDrop keeps every kept row's own M-RoPE (temporal, height, width) position,
    ``positions='original'``, the default there; an explicit ``positions='renumber'`` (a 1-D renumbering, which M-RoPE
    does not have) is refused in one line. Other methods: ``params`` unchanged."""
    if method != "pdrop":
        return dict(params)
    params = {"positions": "original", **params}
    if params["positions"] != "original":
        raise ValueError(renumber_refusal(method, str(params["positions"])))
    return params


def renumber_refusal(method: str, positions: str = "renumber") -> str:
    """The one line refusing ``positions`` other than 'original' for ``method`` on a Qwen-VL model."""
    return (f"op={method} positions={positions} on a Qwen-VL model: M-RoPE gives every token its own (temporal, "
            "height, width) position and has no 1-D renumbering; use positions=original (the default on Qwen-VL)")


def qwen_unsupported(method: str, model_type: str) -> str:
    """The one line refusing a method :func:`qwen_runs` does not run on a Qwen-VL model."""
    if method == "visionzip":
        return (f"op=visionzip is not supported on Qwen-VL models ({model_type}): VisionZip picks dominant tokens by "
                "the CLS token's attention and the Qwen-VL vision towers have no CLS token; use op=fastv or op=pdrop")
    return (f"op={method} is not supported on Qwen-VL models ({model_type}): the six operators (none, mask_v2v, "
            f"skip_attn, skip_ffn, skip_attn_ffn, drop_v2t), {', '.join(QWEN_VL_METHODS)} run on them")


_LAYER_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")


def generation_class(model_type: str, where: str = "the checkpoint"):
    """The HF class a checkpoint of ``model_type`` loads as; TypeError naming the supported types."""
    if model_type not in GENERATION_CLASSES:
        raise TypeError(f"{where}: model_type {model_type!r} is not supported; supported: "
                        f"{', '.join(GENERATION_CLASSES)}")
    return GENERATION_CLASSES[model_type]


def vlm_generation_class(model_type: str, where: str = "the checkpoint"):
    """:func:`generation_class`, the Qwen-VL classes included (for code that supports both families)."""
    if model_type in QWEN_VL_CLASSES:
        return QWEN_VL_CLASSES[model_type][0]
    if model_type not in GENERATION_CLASSES:
        raise TypeError(f"{where}: model_type {model_type!r} is not supported; supported: "
                        f"{', '.join([*GENERATION_CLASSES, *QWEN_VL_CLASSES])}")
    return GENERATION_CLASSES[model_type]


def _names(classes) -> str:
    return ", ".join(c.__name__ for c in classes)


def llava_core(model):
    """The ``LlavaModel`` / ``LlavaNextModel`` inside ``model`` (which may be one itself)."""
    if not isinstance(model, SUPPORTED_CLASSES):
        raise TypeError(f"unsupported model class {type(model).__name__}; supported: {_names(SUPPORTED_CLASSES)}")
    core = model.model if isinstance(model, tuple(GENERATION_CLASSES.values())) else model
    backbone = text_config_of(core).model_type
    if backbone not in SUPPORTED_BACKBONES:
        raise TypeError(f"unsupported text backbone {backbone!r}; supported: {', '.join(SUPPORTED_BACKBONES)}")
    return core


def is_qwen_vl_model(model) -> bool:
    """Whether ``model`` is one of the Qwen-VL classes of :data:`QWEN_VL_CLASSES` (generation class or core)."""
    return isinstance(model, QWEN_VL_SUPPORTED_CLASSES)


def vlm_core(model):
    """The core model (``LlavaModel`` / ``LlavaNextModel`` / ``Qwen2VLModel`` / ``Qwen2_5_VLModel`` /
    ``Qwen3VLModel``) inside ``model``, for code that supports both families (the operators)."""
    if not is_qwen_vl_model(model):
        if not isinstance(model, SUPPORTED_CLASSES):
            raise TypeError(f"unsupported model class {type(model).__name__}; supported: "
                            f"{_names(SUPPORTED_CLASSES + QWEN_VL_SUPPORTED_CLASSES)}")
        return llava_core(model)
    core = model.model if isinstance(model, tuple(c[0] for c in QWEN_VL_CLASSES.values())) else model
    backbone = text_config_of(core).model_type
    if backbone not in QWEN_VL_BACKBONES:
        raise TypeError(f"unsupported text backbone {backbone!r}; supported: {', '.join(QWEN_VL_BACKBONES)}")
    return core


def text_config_of(core):
    return core.config.text_config


def decoder_layers(core):
    """The decoder layers of the language model, checked to have the Llama-family structure."""
    layers = core.language_model.layers
    for layer in layers[:1]:
        missing = [p for p in _LAYER_PARTS if not hasattr(layer, p)]
        missing += [f"self_attn.{p}" for p in _ATTN_PARTS if not hasattr(layer.self_attn, p)]
        if missing:
            raise TypeError(f"decoder layer {type(layer).__name__} lacks {missing}; "
                            f"supported backbones: {', '.join(SUPPORTED_BACKBONES)}")
    return layers


def patch_instance(obj, name: str, value):
    """Set ``obj.<name> = value`` on this instance only (never its class); returns an undo that puts back what
    the instance had: its own earlier attribute (e.g. ProxyV's image-size recorder), or none, so that the
    class's attribute shows again."""
    previous = vars(obj).get(name)
    setattr(obj, name, value)

    def undo() -> None:
        if previous is None:
            vars(obj).pop(name, None)
        else:
            setattr(obj, name, previous)

    return undo
