"""``apply_proxyv``: convert a HF LLaVA or Qwen-VL model to ProxyV, permanently and per instance.

What it attaches (nothing else changes, no transformers class is patched):

* ``core.proxyv`` -- a registered :class:`~analysis.proxyv.runtime.ProxyV` submodule holding every
  trainable ProxyV parameter, so ``state_dict`` / ``save_pretrained`` include them
  (keys ``model.proxyv.layers.<i>.*`` and ``model.proxyv.initializer.*``);
* ``config.proxyv`` -- the settings (a dict), so :func:`analysis.proxyv.load_proxyv` can rebuild;
* a forward pre-hook and a forward hook on the core (plan the chunk / drop the proxies), and
  ``core.get_image_features`` on the instance (records ``image_sizes`` during ``generate()``; Qwen-VL:
  ``get_image_features`` / ``get_video_features`` record the grids, and a pre-hook on the language model
  records the M-RoPE positions the proxies' positions are made from);
* ``layer.forward`` on the instances of decoder layers >= start layer.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch

from ..ablation import QwenVisionTracker, VisionTracker
from ..attention import check_backend
from ..layout import compute_layout
from ..models import decoder_layers, is_qwen_vl_model, text_config_of, vlm_core
from .plan import build_plan
from .runtime import EncoderRecorder, ProxyV, proxyv_layer_forward

INITS = ("spatial", "learned", "none")  # "none": no proxies, a context-free light MLP (paper Table 2)
FORMAT = 1


@dataclass(frozen=True)
class ProxyVSettings:
    """ProxyV settings as stored in ``config.proxyv``."""

    start_layer: int
    reduce_factor: int = 4  # init="none": recorded as given, unused (there are no proxies)
    init: str = "spatial"
    light_width: int = 0  # light-MLP (and learned-query) width I; 0 -> hidden // 4 when applied
    learned_proxies: int = 0  # learned proxies per crop / grid block; 0 -> side^2 // f^2 (LLaVA's fixed crop)

    def to_dict(self) -> dict:
        data = asdict(self)
        if not data["learned_proxies"]:  # written only where set: checkpoints of earlier versions stay equal
            del data["learned_proxies"]
        return {**data, "format": FORMAT}

    def learned_count(self, rows: int, cols: int) -> int:
        """Learned proxies per crop of a rows x cols grid."""
        return learned_count(self.learned_proxies, self.reduce_factor, rows, cols)

    @classmethod
    def from_dict(cls, data: dict) -> ProxyVSettings:
        data = dict(data)
        if data.pop("format", FORMAT) != FORMAT:
            raise ValueError(f"config.proxyv has an unknown format; this code reads format {FORMAT}")
        return cls(**data)


def learned_count(learned_proxies: int, reduce_factor: int, rows: int, cols: int) -> int:
    """Learned proxies per crop of a rows x cols grid: ``learned_proxies`` where set, else rows * cols // f^2."""
    return learned_proxies or rows * cols // reduce_factor**2


def _crop_side(core) -> int | None:
    """The side of a LLaVA crop's patch grid; ``None`` for Qwen-VL (native-resolution grids of any shape)."""
    if is_qwen_vl_model(core):
        return None
    vision = core.config.vision_config
    return vision.image_size // vision.patch_size


def _deepstack_layers(core) -> int:
    """How many decoder layers DeepStack injects vision features after (Qwen3-VL: layers 0..n-1; else 0)."""
    return len(getattr(core.config.vision_config, "deepstack_visual_indexes", None) or ())


def _window(attn) -> int | None:
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(attn.config, "sliding_window", None)


def _check(core, layers, settings: ProxyVSettings) -> None:
    n = len(layers)
    L, f = settings.start_layer, settings.reduce_factor
    for name, value in (("start_layer", L), ("reduce_factor", f), ("light_width", settings.light_width)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if not 0 <= L < n:
        raise ValueError(f"start_layer={L} is out of range: the model has {n} decoder layers (valid 0..{n - 1})")
    if settings.init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {settings.init!r}")
    side = _crop_side(core)
    if f < 1:
        raise ValueError(f"reduce_factor must be >= 1, got {f}")
    if not isinstance(settings.learned_proxies, int) or settings.learned_proxies < 0:
        raise ValueError(f"learned_proxies must be an int >= 0, got {settings.learned_proxies!r}")
    if side is None:  # Qwen-VL: grids of any shape, padded to a multiple of f (see plan.py)
        if settings.init == "learned" and not settings.learned_proxies:
            raise ValueError("init='learned' on a Qwen-VL model needs learned_proxies=N (proxies per image and per "
                             "video block): its grids have no fixed size to derive N from")
        deep = _deepstack_layers(core)
        if L < deep:
            raise ValueError(f"start_layer={L}: Qwen3-VL's DeepStack adds vision features to the vision tokens after "
                             f"decoder layers 0..{deep - 1}, which proxies made earlier would miss; use start_layer "
                             f">= {deep}")
    elif settings.init == "spatial" and side % f:
        divisors = [d for d in range(1, side + 1) if side % d == 0]
        raise ValueError(f"reduce_factor={f} does not divide the {side}x{side} crop grid, which spatial proxies "
                         f"need; use one of {divisors}, or init='learned'")
    if side is not None and settings.init == "learned" and not settings.learned_count(side, side):
        raise ValueError(f"reduce_factor={f} leaves no proxy for a {side}x{side} crop grid")
    if settings.light_width < 1:
        raise ValueError(f"light_width must be >= 1, got {settings.light_width}")
    check_backend(text_config_of(core)._attn_implementation, "ProxyV")
    windowed = [i for i in range(L, n) if _window(layers[i].self_attn) is not None]
    if windowed:
        raise NotImplementedError(f"ProxyV does not support sliding-window attention (layers {windowed}); "
                                  "load the model with sliding_window=None")
    if core.config.model_type == "llava_next" and core.config.vision_feature_select_strategy != "default":
        raise NotImplementedError("ProxyV on LLaVA-NeXT supports vision_feature_select_strategy='default' only")
    if hasattr(core, "proxyv"):
        raise ValueError("this model already has ProxyV; apply_proxyv() converts a model once")
    patched = [i for i in range(L, n) if "forward" in vars(layers[i])]
    if patched:
        raise RuntimeError(f"decoder layers {patched} already have a per-instance forward (inside ablate()?); "
                           "apply ProxyV outside any ablate() block")


def apply_proxyv(model, start_layer: int, reduce_factor: int = 4, init: str = "spatial",
                 light_width: int | None = None, seed: int | None = None, learned_proxies: int = 0):
    """Convert ``model`` to ProxyV in place and return it.

    Args:
        model: a ``LlavaForConditionalGeneration`` or ``LlavaNextForConditionalGeneration`` (or its
            ``.model``) with a Llama / Qwen2 / Mistral backbone, or a ``Qwen2VLForConditionalGeneration`` /
            ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration`` (or its ``.model``:
            proxies per image and per temporal block of a video, M-RoPE positions; docs/qwen.md, "ProxyV");
            ``attn_implementation`` eager or sdpa.
        start_layer: first decoder layer L that runs ProxyV (0 <= L < number of layers).
        reduce_factor: f; each crop's side x side grid gets (side/f)^2 spatial proxies (side^2 // f^2
            learned ones). Official default 4 (24x24 -> 6x6).
        init: ``"spatial"`` (bilinear downsampling, parameter-free), ``"learned"`` (learned queries), or
            ``"none"``: no proxies -- from L on the vision tokens skip attention and FFN and get a context-free
            light MLP (:class:`~analysis.proxyv.modules.LightUpdate`; the paper's Table 2 variant);
            ``reduce_factor`` is then recorded but unused.
        light_width: width I of the light MLP and of the learned queries; default hidden // 4. (The
            official code uses hidden // 4 from width 1024 on and hidden // 2 below.)
        seed: if given, the new parameters are initialised from ``torch.manual_seed(seed)`` without
            touching the global RNG state; otherwise from the global RNG.
        learned_proxies: learned proxies per crop (init="learned"); 0 -> side^2 // f^2 on LLaVA; required on
            Qwen-VL, whose grids have no fixed size.
    Returns:
        ``model``, with the new parameters trainable (``requires_grad``), see :func:`proxyv_parameters`.
    """
    core = vlm_core(model)
    layers = decoder_layers(core)
    text = text_config_of(core)
    settings = ProxyVSettings(start_layer, reduce_factor, init, light_width or text.hidden_size // 4, learned_proxies)
    _check(core, layers, settings)
    reference = layers[start_layer].post_attention_layernorm
    norm_factory = functools.partial(type(reference), text.hidden_size, eps=text.rms_norm_eps)
    weight = next(layers[start_layer].parameters())
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        side = _crop_side(core)
        learned = settings.learned_count(side, side) if side else settings.learned_proxies
        proxyv = ProxyV(settings, len(layers), text.hidden_size, learned, norm_factory)
    core.proxyv = proxyv.to(device=weight.device, dtype=weight.dtype)
    qwen = is_qwen_vl_model(core)
    proxyv.locator = (QwenVisionTracker if qwen else VisionTracker)(core.config, "text")
    proxyv.locator.who = "ProxyV"
    core.register_forward_pre_hook(proxyv.pre_hook, with_kwargs=True)
    core.register_forward_hook(proxyv.post_hook)
    for kind in proxyv.locator.ENCODERS:  # the encoders generate() calls before the first forward
        setattr(core, f"get_{kind}_features", EncoderRecorder(core, proxyv, kind))
    if qwen:
        core.language_model.register_forward_pre_hook(proxyv.record_positions, with_kwargs=True)
    rotary = core.language_model.rotary_emb
    for i in range(start_layer, len(layers)):
        layers[i].forward = functools.partial(proxyv_layer_forward, layers[i], proxyv, rotary)
        proxyv.bound.append((layers[i], layers[i].forward))
    for config in {id(c): c for c in (core.config, getattr(model, "config", core.config))}.values():
        config.proxyv = settings.to_dict()
    return model


def proxyv_parameters(model) -> list[torch.nn.Parameter]:
    """The trainable ProxyV parameters of ``model`` (light MLPs, and learned queries + key projection)."""
    core = vlm_core(model)
    if not hasattr(core, "proxyv"):
        raise ValueError("the model has no ProxyV; call apply_proxyv() first")
    return list(core.proxyv.parameters())


@dataclass(frozen=True)
class ProxyVShapes:
    """What ProxyV executes for one prefill batch, for a FLOPs count (see docs/proxyv.md)."""

    batch: int  # B
    rows: int  # T, padding included
    proxies: int  # P: proxy slots per sample (the batch's largest count); attention/FFN rows are B*(P + Nt)
    vision_rows: int  # Nv: full-vision slots per sample (largest count); light-MLP rows are B*Nv
    text_rows: int  # Nt: other slots per sample (largest count), newline tokens and padding included
    crops: int  # C: crops with vision cells in the batch
    cells_per_crop: int  # S = side^2
    proxies_per_crop: int  # n (spatial: (side/f)^2; learned: side^2 // f^2; none: 0)
    light_width: int  # I
    learned: bool
    counts: tuple  # per sample, per image, per crop: proxies that exist
    # Per sample, padding and filler slots excluded (the "theoretical" figures):
    sample_proxies: tuple  # P_b
    sample_vision: tuple  # Nv_b full vision tokens
    sample_text: tuple  # Nt_b attended non-vision tokens (text, newline)
    sample_pairs: tuple  # allowed (query, key) pairs of the ProxyV attention, queries = proxies + text

    @property
    def init(self) -> str:
        """The proxy init these shapes were made for (``"none"``: no proxy per crop)."""
        return "none" if self.proxies_per_crop == 0 else "learned" if self.learned else "spatial"


def proxyv_shapes(config, input_ids, attention_mask=None, image_sizes=None, settings: dict | None = None, *,
                  image_grid_thw=None, video_grid_thw=None):
    """The ProxyV shapes of a batch (``None`` without vision tokens), from a config with ``config.proxyv``.

    ``settings`` overrides ``config.proxyv`` (a dict as :meth:`ProxyVSettings.to_dict` writes it). Qwen-VL
    configs take the batch's ``image_grid_thw`` / ``video_grid_thw`` instead of ``image_sizes``.
    """
    data = settings if settings is not None else getattr(config, "proxyv", None)
    if data is None:
        raise ValueError("config has no proxyv settings; pass settings= or use a ProxyV model's config")
    s = ProxyVSettings.from_dict(data)
    grids = {k: v for k, v in (("image_grid_thw", image_grid_thw), ("video_grid_thw", video_grid_thw)) if v is not None}
    layout = compute_layout(input_ids, config, attention_mask, image_sizes, **grids)
    return shapes_of_layout(layout, s, config.text_config.hidden_size)


def shapes_of_layout(layout, settings: ProxyVSettings, hidden: int) -> ProxyVShapes | None:
    """The ProxyV shapes of a token layout (``None`` without vision cells); ``hidden``: the model width D."""
    plan = build_plan(layout, settings)
    if plan is None:
        return None
    width = settings.light_width or hidden // 4
    valid = layout.valid_mask
    allowed = plan.allowed(0, valid, plan.vision)  # (B, P + Nt, T + P)
    text_valid = plan.text_valid & torch.gather(valid, 1, plan.text_rows)  # padding rows are no queries
    queries = torch.cat([plan.proxy_valid, text_valid], dim=1)  # (B, P + Nt)
    keys = torch.cat([valid, plan.proxy_valid], dim=1)  # (B, T + P)
    pairs = (allowed & queries[..., None] & keys[:, None, :]).sum((1, 2))
    return ProxyVShapes(
        batch=plan.vision.shape[0], rows=plan.vision.shape[1], proxies=plan.n_proxies,
        vision_rows=plan.vision_rows.shape[1], text_rows=plan.text_rows.shape[1], crops=plan.cell_src.shape[0],
        cells_per_crop=plan.cell_src.shape[1], proxies_per_crop=plan.crop_proxy.shape[1], light_width=width,
        learned=plan.learned, counts=plan.counts,
        sample_proxies=tuple(plan.proxy_valid.sum(1).tolist()), sample_vision=tuple(plan.vision.sum(1).tolist()),
        sample_text=tuple(text_valid.sum(1).tolist()), sample_pairs=tuple(pairs.tolist()),
    )


def proxyv_context(model, variant, **_):
    """The execution of a ``proxyv``-family :class:`~analysis.variant.Variant` (registered in
    :mod:`analysis.families`): the model is the trained ProxyV checkpoint itself, so nothing is applied;
    it must be one, with the variant's start layer and settings."""
    import contextlib

    config = getattr(model, "config", None)
    settings = getattr(config, "proxyv", None)
    if not settings:
        raise TypeError(f"variant {variant.label} runs a trained ProxyV checkpoint; this model is not one "
                        "(load it with analysis.proxyv.load_proxyv)")
    have = {"start_layer": settings.get("start_layer"), **{k: settings.get(k) for k in variant.options}}
    want = {"start_layer": variant.start_layer, **variant.options}
    if have != want:
        raise ValueError(f"variant {variant.label} does not match the loaded ProxyV checkpoint ({have})")
    return contextlib.nullcontext(list(variant.layers))
