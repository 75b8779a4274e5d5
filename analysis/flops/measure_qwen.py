"""torch's ``FlopCounterMode`` on a Qwen2-VL / Qwen2.5-VL / Qwen3-VL forward, split like the analytic model.

:func:`measure_qwen_torch` runs ``model(**batch)`` (the plain HF forward: the operators are not wired into these
classes in this module) under :func:`analysis.flops.measure.torch_flop_counter` (which also counts the CPU SDPA
kernel) and splits the count by module: the decoder (per layer and per component, the attention kernel being what a
layer counts beyond its linear layers), the LM head, and the vision side: patch embedding, each block, the
PatchMerger, each DeepStack merger (Qwen3-VL).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .measure import LINEARS, torch_flop_counter


@dataclass(frozen=True)
class MeasuredQwenFlops:
    """FlopCounterMode's counts of one Qwen-VL forward, in FLOPs."""

    decoder: int  # everything counted inside language_model
    per_layer: tuple[int, ...]
    components: tuple[dict[str, int], ...]  # per layer: the linear layers and "attention"
    lm_head: int
    patch_embed: int
    blocks: tuple[int, ...]  # per vision block
    merger: int
    deepstack: tuple[int, ...]  # per DeepStack merger
    visual: int  # everything counted inside the vision model
    total: int

    @property
    def tower(self) -> int:
        return self.patch_embed + sum(self.blocks)

    @property
    def vision_parts(self) -> dict[str, int]:
        return {"tower": self.tower, "merger": self.merger, "deepstack": sum(self.deepstack)}

    @property
    def decoder_outside_layers(self) -> int:
        """Decoder counts outside its layers (rotary embedding, DeepStack additions, final norm): 0 in 5.23."""
        return self.decoder - sum(self.per_layer)

    @property
    def visual_outside_parts(self) -> int:
        """Vision counts outside patch embedding, blocks and mergers (position embedding interpolation, rotary): 0."""
        return self.visual - self.tower - self.merger - sum(self.deepstack)


def measure_qwen_torch(model, batch: Mapping, op: str = "none", **where) -> MeasuredQwenFlops:
    """FlopCounterMode's count of ``model(**batch)`` for a Qwen-VL ``*ForConditionalGeneration`` model: plain (``op``
    "none", nothing in ``where``) or inside ``ablate(model, op, **where)`` (``where``: ``layers`` / ``start_layer`` /
    ``end_layer`` and the method's parameters, e.g. ``keep``). A token reduction's ranking runs inside the layers'
    modules (PyramidDrop: the layer's own q_proj / k_proj; FastV: a product of its own, counted in the layer)."""
    from ..ablation import ablate

    context = contextlib.nullcontext() if op == "none" and not where else ablate(model, op, **where)
    counter = torch_flop_counter()
    with torch.no_grad(), context, counter:
        model(**batch)
    counts = {name: sum(by_op.values()) for name, by_op in counter.get_flop_counts().items()}
    name_of = {id(module): f"{type(model).__name__}.{name}" for name, module in model.named_modules() if name}
    core = model.model
    visual, text = core.visual, core.language_model
    per_layer, components = [], []
    for layer in text.layers:
        prefix = name_of[id(layer)]
        linear = {part: counts.get(f"{prefix}.{path}", 0) for part, path in LINEARS.items()}
        per_layer.append(counts.get(prefix, 0))
        components.append({**linear, "attention": per_layer[-1] - sum(linear.values())})
    deepstack = getattr(visual, "deepstack_merger_list", ())
    return MeasuredQwenFlops(
        decoder=counts.get(name_of[id(text)], 0),
        per_layer=tuple(per_layer),
        components=tuple(components),
        lm_head=counts.get(name_of[id(model.lm_head)], 0),
        patch_embed=counts.get(name_of[id(visual.patch_embed)], 0),
        blocks=tuple(counts.get(name_of[id(block)], 0) for block in visual.blocks),
        merger=counts.get(name_of[id(visual.merger)], 0),
        deepstack=tuple(counts.get(name_of[id(m)], 0) for m in deepstack),
        visual=counts.get(name_of[id(visual)], 0),
        total=counter.get_total_flops(),
    )
