"""FLOPs of VisionZip (the ``reduction`` family's ``visionzip``), as :mod:`analysis.reduction.visionzip` executes it.

    from analysis.flops import PrefillTokens, count_flops, load_config
    config = load_config("llava-1.5-7b")
    report = count_flops(config, PrefillTokens.from_counts(576, 64, 576), "visionzip", dominant=54, contextual=10)
    report.total, report.baseline          # the decoder on the shortened sequence vs the original one
    report.vision, report.vision_parts     # tower + VisionZip's selection / merge + projector on D + C rows

The input is the ORIGINAL prompt (:meth:`PrefillTokens.from_batch` of the processor's batch, or the runner's
recorded masks): the count shortens it itself, exactly as the execution's pre-hook does.

What executes, per crop the tower encodes (LLaVA-1.5: one per image; LLaVA-NeXT: the base crop and each
high-res crop), with the tower's Dv hidden, Hv heads of hdv = Dv / Hv, N patches + the CLS token (N1 = N + 1),
D dominant (CLS included), C contextual, n = N1 - D the tokens left to merge::

    tower            every layer on every crop, as the baseline (unchanged; dims.tower_flops)
    zip_q_proj       the feature layer's q_proj on the CLS row               2·1·Dv·Dv
    zip_k_proj       its k_proj on all N1 rows                               2·N1·Dv·Dv
    zip_cls_scores   the CLS score row over N1 keys, per head                2·Hv·N1·hdv
    zip_similarity   cosine matrix of the n - C others against C targets     2·(n - C)·hdv·C
    zip_merge        the one-hot merge (C x (n - C)) @ ((n - C) x Dv)        2·C·(n - C)·Dv
    projector        on the D + C kept rows of the crop                       dims.projector_flops(config, D + C)

(``layer_norm1``, the softmax, the head mean and the normalisation are not matrix products: not counted.)
With C = 0 the last two are absent. The decoder sees, per image, the first crops·(D + C) of its placeholder
positions (the rest dropped) in a (B, T') batch aligned as the execution aligns it, filler slots where
samples lose different numbers of tokens (they are ``padding``): its figure is the BASELINE's formula on
that shortened :class:`~analysis.flops.PrefillTokens` (:func:`shorten`), executed and theoretical alike
(theoretical: per sample, padding and fillers removed, causal pairs of the shortened sequence). The LM head
with ``lm_head="all"`` counts B·T' rows. A batch without vision tokens runs the baseline (no image: no tower).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .decoder import LayerFlops, baseline_flops
from .dims import TextDims, projector_flops, tower_flops, tower_tokens
from .tokens import PrefillTokens

METHOD = "visionzip"
ZIP_COMPONENTS = ("zip_q_proj", "zip_k_proj", "zip_cls_scores", "zip_similarity", "zip_merge")


# ----------------------------------------------------------------------------- the vision side

@dataclass(frozen=True)
class TowerDims:
    """What VisionZip's extra work depends on: the CLIP tower's width, heads and tokens per crop (CLS incl.)."""

    hidden: int
    heads: int
    tokens: int  # N + 1

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_config(cls, config) -> TowerDims:
        vision = getattr(config, "vision_config", None)
        if vision is None:
            raise ValueError("visionzip FLOPs need a LLaVA config with a vision tower (vision_config); "
                             "a bare text backbone has none")
        if getattr(vision, "model_type", None) != "clip_vision_model":
            raise NotImplementedError(f"visionzip needs a vision tower with a CLS token (CLIP), got "
                                      f"{getattr(vision, 'model_type', None)!r}")
        if not isinstance(config.vision_feature_layer, int):
            raise NotImplementedError(f"visionzip: one vision feature layer is supported, got "
                                      f"{config.vision_feature_layer!r}")
        return cls(vision.hidden_size, vision.num_attention_heads, tower_tokens(config))


def zip_extras(tower: TowerDims, dominant: int, contextual: int) -> dict[str, int]:
    """VisionZip's selection and merge on ONE crop, by component (see the module docstring)."""
    dv, hd, n1 = tower.hidden, tower.head_dim, tower.tokens
    others = n1 - dominant - contextual  # the non-target tokens merged into the targets
    return {"zip_q_proj": 2 * dv * dv,
            "zip_k_proj": 2 * n1 * dv * dv,
            "zip_cls_scores": 2 * tower.heads * n1 * hd,
            "zip_similarity": 2 * others * hd * contextual,
            "zip_merge": 2 * contextual * others * dv}


# ----------------------------------------------------------------------------- the shortened prefill

def placeholders_per_image(config) -> int:
    """Image tokens the LLaVA-1.5 processor writes per image: N ("default") or N + 1 ("full")."""
    strategy = config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise NotImplementedError(f"visionzip: vision_feature_select_strategy {strategy!r} is not supported")
    return tower_tokens(config) - (strategy == "default")


def _runs(positions: list[int]) -> list[list[int]]:
    """Consecutive runs of sorted positions."""
    runs: list[list[int]] = []
    for p in positions:
        if runs and runs[-1][-1] == p - 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def _next_lengths(config, crops: int) -> set[int]:
    """Token counts a LLaVA-NeXT image of ``crops`` crops can have (base crop + unpadded high-res grid with one
    newline per row), over the config's grid pinpoints."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
    )

    size = config.vision_config.image_size
    side = size // config.vision_config.patch_size
    lengths = set()
    for pinpoint in config.image_grid_pinpoints:
        rows, cols = get_anyres_image_grid_shape(tuple(pinpoint), config.image_grid_pinpoints, size)
        if 1 + rows * cols != crops:
            continue
        height, width = rows * side, cols * side
        lengths |= {side * side + height * (w + 1) for w in range(1, width + 1)}
        lengths |= {side * side + h * (width + 1) for h in range(1, height + 1)}
    return lengths


def image_blocks(config, tokens: PrefillTokens) -> list[list[tuple[list[int], int]]]:
    """Per sample, per image: (its placeholder positions, the crops the tower encodes for it), from the
    tokens' vision mask (every image token a vision token: LLaVA-NeXT newline tokens included) and crops."""
    samples = []
    kind = getattr(config, "model_type", None)
    for b in range(tokens.batch):
        positions = torch.nonzero(tokens.vision[b] & tokens.valid[b]).flatten().tolist()
        crops = len(tokens.crop_shapes[b]) if tokens.crop_shapes else None
        if not positions:
            samples.append([])
            continue
        if kind == "llava":
            per = placeholders_per_image(config)
            if len(positions) % per or (crops is not None and crops != len(positions) // per):
                raise ValueError(f"visionzip: sample {b} has {len(positions)} image tokens and {crops} crops, not "
                                 f"whole images of {per} placeholders (one crop each)")
            samples.append([(positions[i:i + per], 1) for i in range(0, len(positions), per)])
        elif kind == "llava_next":
            samples.append(_next_images(config, b, _runs(positions), crops))
        else:
            raise NotImplementedError(f"visionzip FLOPs know LLaVA-1.5 and LLaVA-NeXT configs, got {kind!r}")
    return samples


def _next_images(config, b: int, runs: list[list[int]], crops: int | None) -> list[tuple[list[int], int]]:
    """A LLaVA-NeXT sample's images: each run of consecutive image tokens is one image; its crop count is
    the one its token count allows (with the sample's total crops)."""
    if crops is None:
        raise ValueError(f"visionzip on LLaVA-NeXT: sample {b}'s crops are unknown (build the tokens with "
                         "PrefillTokens.from_batch / from_counts, which record crop_shapes)")
    if len(runs) == 1:
        return [(runs[0], crops)]
    feasible = [[c for c in range(2, crops + 1) if len(run) in _next_lengths(config, c)] for run in runs]
    splits = [split for split in itertools.product(*feasible) if sum(split) == crops]
    if len(splits) != 1:
        raise ValueError(f"visionzip on LLaVA-NeXT: cannot tell how sample {b}'s {crops} crops split over its "
                         f"{len(runs)} images of {[len(r) for r in runs]} tokens ({len(splits)} ways); count its "
                         "FLOPs with newline tokens as vision tokens (newline_tokens='vision'), images apart")
    return [(run, c) for run, c in zip(runs, splits[0])]


def shorten(tokens: PrefillTokens, blocks, per_crop: int) -> PrefillTokens:
    """The shortened prefill the decoder runs: per image the first crops·``per_crop`` placeholder positions kept,
    the others dropped; samples in a (B, T') block, T' the longest, filler slots (not valid) on the padding
    side (left unless the batch is right-padded), as ``VisionZip._shorten_prefill`` lays it out."""
    B, T = tokens.vision.shape
    keep = torch.ones(B, T, dtype=torch.bool)
    for b, images in enumerate(blocks):
        for positions, crops in images:
            kept = crops * per_crop
            if kept > len(positions):
                raise ValueError(f"visionzip: an image of {len(positions)} image tokens cannot hold its {crops} x "
                                 f"(dominant + contextual = {per_crop}) tokens; the sequence can only be shortened")
            keep[b, positions[kept:]] = False
    if bool(keep.all()):
        return tokens
    lengths = keep.sum(1)
    width = int(lengths.max())
    right_padded = bool((~tokens.valid[:, -1]).any())
    vision = torch.zeros(B, width, dtype=torch.bool)
    valid = torch.zeros(B, width, dtype=torch.bool)
    for b in range(B):
        where = keep[b].nonzero().flatten()
        start = 0 if right_padded else width - len(where)
        vision[b, start:start + len(where)] = tokens.vision[b, where]
        valid[b, start:start + len(where)] = tokens.valid[b, where]
    return PrefillTokens(vision, valid, tokens.crop_shapes)


# ----------------------------------------------------------------------------- the family's FLOPs variant

class VisionZipFlops:
    """VisionZip with ``dominant`` D (CLS included) and ``contextual`` C: counted on the shortened prefill.

    A layer-FLOPs variant (``layer_flops``) with three more methods :func:`analysis.flops.count_flops` uses:
    :meth:`with_config` (the LLaVA config: the tower and the placeholders per image), :meth:`output_rows`
    (the LM head's rows) and :meth:`vision_parts` (tower, ``visionzip`` extras, projector)."""

    name = METHOD
    layers: tuple[int, ...] = ()

    def __init__(self, dominant: int, contextual: int, config=None):
        if isinstance(dominant, bool) or not isinstance(dominant, int) or dominant < 1:
            raise ValueError(f"visionzip: dominant must be an integer >= 1, got {dominant!r}")
        if isinstance(contextual, bool) or not isinstance(contextual, int) or contextual < 0:
            raise ValueError(f"visionzip: contextual must be an integer >= 0, got {contextual!r}")
        self.dominant, self.contextual = dominant, contextual
        self.config = config
        self._cached: tuple | None = None  # (tokens, shortened, blocks) of the last tokens counted
        if config is not None:
            self._check(config)

    @property
    def per_crop(self) -> int:
        return self.dominant + self.contextual

    def with_config(self, config) -> VisionZipFlops:
        """This variant for the model of ``config`` (a LLaVA / LLaVA-NeXT config with a CLIP tower)."""
        return VisionZipFlops(self.dominant, self.contextual, config)

    def _check(self, config) -> None:
        tower = TowerDims.from_config(config)
        if self.per_crop > tower.tokens:
            raise ValueError(f"visionzip: dominant + contextual = {self.per_crop} exceeds the {tower.tokens - 1} "
                             f"patches + CLS of an image")
        if getattr(config, "model_type", None) == "llava" and self.per_crop > placeholders_per_image(config):
            raise ValueError(f"visionzip: dominant + contextual = {self.per_crop} exceeds the "
                             f"{placeholders_per_image(config)} image tokens per image (vision_feature_select_strategy "
                             f"{config.vision_feature_select_strategy!r}); the sequence can only be shortened")

    def _need_config(self):
        if self.config is None:
            raise ValueError("visionzip FLOPs need the model config (count_flops(config, ...) binds it)")
        return self.config

    def _prepared(self, tokens: PrefillTokens):
        if self._cached is None or self._cached[0] is not tokens:
            blocks = image_blocks(self._need_config(), tokens) if self.active(tokens) else [[] for _ in
                                                                                            range(tokens.batch)]
            self._cached = (tokens, shorten(tokens, blocks, self.per_crop), blocks)
        return self._cached

    def shortened(self, tokens: PrefillTokens) -> PrefillTokens:
        """The (B, T') prefill the decoder runs (``tokens`` itself when nothing is dropped)."""
        return self._prepared(tokens)[1]

    def crops(self, tokens: PrefillTokens) -> int:
        """Crops the tower encodes (and VisionZip reduces) for ``tokens``."""
        return sum(c for images in self._prepared(tokens)[2] for _, c in images)

    def active(self, tokens: PrefillTokens) -> bool:
        """Whether the batch has image tokens (without, HF's own forward runs: no tower, nothing dropped)."""
        return bool((tokens.vision & tokens.valid).any())

    def output_rows(self, tokens: PrefillTokens) -> int:
        """Rows of the shortened forward (the LM head's rows with ``lm_head="all"``): B·T'."""
        short = self.shortened(tokens)
        return short.batch * short.seq_len

    def layer_flops(self, layer: int, dims: TextDims, tokens: PrefillTokens) -> LayerFlops:
        """The baseline's layer on the shortened prefill (no decoder layer is changed: none is ``ablated``)."""
        return baseline_flops().layer_flops(layer, dims, self.shortened(tokens))

    def vision_parts(self, config, tokens: PrefillTokens) -> dict[str, int]:
        """The vision figure's parts: ``tower`` (every layer, every crop, as the baseline), ``visionzip`` (the
        selection and merge, total) with its components (``zip_*``), and ``projector`` (D + C rows per crop)."""
        variant = self if config is self.config else self.with_config(config)
        crops = variant.crops(tokens)
        extras = {name: crops * flops
                  for name, flops in zip_extras(TowerDims.from_config(config), self.dominant, self.contextual).items()}
        return {"tower": tower_flops(config, crops), "visionzip": sum(extras.values()),
                "projector": crops * projector_flops(config, self.per_crop), **extras}


def visionzip_flops(variant, **extra) -> VisionZipFlops:
    """The layer-FLOPs variant of a ``visionzip`` :class:`~analysis.variant.Variant` (through ``reduction_flops``);
    ``extra``: ``config`` (the model's LLaVA config) only."""
    config = extra.pop("config", None)
    if extra:
        raise ValueError(f"op {variant.method!r} takes no options, got {sorted(extra)}")
    counted = VisionZipFlops(variant.options["dominant"], variant.options["contextual"])
    return counted if config is None else counted.with_config(config)
