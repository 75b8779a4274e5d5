"""Measured FLOPs of a real forward, to check :mod:`analysis.flops` against: torch and fvcore.

    python -m analysis.flops.measure   # analytic, torch and fvcore side by side on a tiny LLaVA

* :func:`measure_torch` -- ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add;
  counts ``mm``/``addmm``/``bmm``/convolutions and the attention kernels it has formulas for).
  torch ships no formula for the CPU SDPA kernel ``aten._scaled_dot_product_flash_attention_for_cpu``,
  so attention on ``attn_implementation="sdpa"`` would count as 0; :data:`SDPA_FORMULAS` registers
  torch's own SDPA formula for it (full rectangle, per query head, like torch's formulas for the
  CUDA kernels). SDPA's math fallback decomposes into ``bmm`` and is counted without help.
* :func:`measure_fvcore` -- fvcore's ``FlopCountAnalysis`` (JIT-traces the forward; counts
  **multiply-adds**, i.e. half of the above; skips, with a warning, every op it has no handle for).
  We register a handle for ``aten::scaled_dot_product_attention`` so attention is counted on sdpa.
  fvcore also has handles for ``layer_norm`` & co. (about 5 per element), which the CLIP tower uses:
  its vision figure is therefore a little above half of torch's; the decoder (RMSNorm is elementwise
  code, not an op) and the LM head are exactly half.

Both run the model under :func:`analysis.ablation.ablate` and split the count by module: decoder
(``language_model``; per layer and per component, the attention kernel being what a layer counts
beyond its linear layers), LM head, vision tower + projector.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..ablation import ablate
from ..models import decoder_layers, llava_core
from .report import count_flops
from .tokens import PrefillTokens

LINEARS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
           "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
           "down_proj": "mlp.down_proj"}


# The module torch's counter finds each analytic component in (a linear layer of LINEARS, else "attention": what a
# layer counts beyond its linear layers). A token reduction's ranking runs in the layer's own q_proj / k_proj
# (PyramidDrop) or as a product beside its attention (FastV's score row).
MODULE_OF = {"attn_scores": "attention", "attn_values": "attention", "rank_scores": "attention",
             "rank_q_proj": "q_proj", "rank_k_proj": "k_proj"}


def by_module(executed: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    """A layer's executed breakdown (component -> group -> FLOPs) as :func:`measure_torch` splits a layer: per
    linear layer and ``attention``."""
    out: dict[str, int] = {}
    for component, groups in executed.items():
        module = MODULE_OF.get(component, component)
        out[module] = out.get(module, 0) + sum(groups.values())
    return out


def _sdpa_formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# CPU SDPA kernels torch's FlopCounterMode has no formula for.
SDPA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_formula}


def torch_flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts the CPU SDPA kernel."""
    return FlopCounterMode(display=False, depth=None, custom_mapping=SDPA_FORMULAS)


@dataclass(frozen=True)
class MeasuredFlops:
    """Counts of one forward. ``unit``: "flops" (torch) or "multiply-adds" (fvcore)."""

    unit: str
    decoder: int  # everything counted inside language_model
    per_layer: tuple[int, ...]
    components: tuple[dict[str, int], ...]  # per layer: the linear layers and "attention"
    lm_head: int
    vision: int  # vision tower + projector
    total: int

    @property
    def decoder_outside_layers(self) -> int:
        """Decoder counts outside its layers (rotary embedding, final norm): 0 in transformers 5.x."""
        return self.decoder - sum(self.per_layer)


@dataclass(frozen=True)
class _Names:
    decoder: str
    layers: tuple[str, ...]
    lm_head: str | None
    vision: tuple[str, ...]


def _module_names(model, prefix: str) -> _Names:
    core = llava_core(model)
    name_of = {id(module): f"{prefix}{name}" if name else prefix.rstrip(".") for name, module in model.named_modules()}
    head = getattr(model, "lm_head", None)
    vision = [core.vision_tower, core.multi_modal_projector]
    return _Names(
        decoder=name_of[id(core.language_model)],
        layers=tuple(name_of[id(layer)] for layer in decoder_layers(core)),
        lm_head=None if head is None else name_of[id(head)],
        vision=tuple(name_of[id(module)] for module in vision),
    )


def _split(counts: Mapping[str, int], names: _Names, total: int, unit: str) -> MeasuredFlops:
    per_layer, components = [], []
    for layer in names.layers:
        linear = {part: counts.get(f"{layer}.{path}", 0) for part, path in LINEARS.items()}
        layer_total = counts.get(layer, 0)
        per_layer.append(layer_total)
        components.append({**linear, "attention": layer_total - sum(linear.values())})
    return MeasuredFlops(
        unit=unit,
        decoder=counts.get(names.decoder, 0),
        per_layer=tuple(per_layer),
        components=tuple(components),
        lm_head=counts.get(names.lm_head, 0) if names.lm_head else 0,
        vision=sum(counts.get(name, 0) for name in names.vision),
        total=total,
    )


def measure_torch(model, batch: Mapping, op: str = "none", layers: Iterable[int] | None = None,
                  newline_tokens: str = "vision") -> MeasuredFlops:
    """FlopCounterMode's count of ``model(**batch)`` under ``ablate(model, op, layers)``."""
    counter = torch_flop_counter()
    with torch.no_grad(), ablate(model, op, layers=layers, newline_tokens=newline_tokens), counter:
        model(**batch)
    counts = {name: sum(by_op.values()) for name, by_op in counter.get_flop_counts().items()}
    return _split(counts, _module_names(model, f"{type(model).__name__}."), counter.get_total_flops(), "flops")


def _fvcore_sdpa(inputs, outputs) -> int:
    """Multiply-adds of ``aten::scaled_dot_product_attention``: (Q K^T) and (A V), per query head."""
    from fvcore.nn.jit_handles import get_shape

    query, key, value = (get_shape(v) for v in inputs[:3])
    batch_heads = 1
    for size in query[:-2]:
        batch_heads *= size
    return batch_heads * query[-2] * key[-2] * (query[-1] + value[-1])


class _Forward(torch.nn.Module):
    """``model(**batch).logits`` as a module of positional tensors, for JIT tracing."""

    def __init__(self, model, keys):
        super().__init__()
        self.model = model
        self.keys = keys

    def forward(self, *tensors):
        return self.model(**dict(zip(self.keys, tensors)), use_cache=False).logits


def measure_fvcore(model, batch: Mapping, op: str = "none", layers: Iterable[int] | None = None,
                   newline_tokens: str = "vision") -> MeasuredFlops:
    """fvcore's ``FlopCountAnalysis`` of ``model(**batch)`` under ``ablate(model, op, layers)``, in multiply-adds."""
    from fvcore.nn import FlopCountAnalysis

    keys = tuple(k for k, v in batch.items() if isinstance(v, torch.Tensor))
    wrapper = _Forward(model, keys)
    with torch.no_grad(), ablate(model, op, layers=layers, newline_tokens=newline_tokens), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # JIT tracer warnings about data-dependent Python values
        analysis = FlopCountAnalysis(wrapper, tuple(batch[k] for k in keys))
        analysis.set_op_handle("aten::scaled_dot_product_attention", _fvcore_sdpa)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        counts = dict(analysis.by_module())
        total = analysis.total()
    return _split(counts, _module_names(model, "model."), total, "multiply-adds")


def side_by_side(model, batch: Mapping, op: str = "none", layers: Iterable[int] | None = None,
                 newline_tokens: str = "vision") -> dict[str, dict[str, int]]:
    """Analytic, torch-counted and fvcore-counted FLOPs of ``model(**batch)`` under ``op``, by part.

    fvcore's multiply-adds are shown as counted and doubled; the decoder and LM head rows agree
    exactly across all three, the vision row differs in fvcore by its LayerNorm handles.
    """
    report = count_flops(model.config, PrefillTokens.from_batch(batch, model.config, newline_tokens), op, layers)
    torch_counts = measure_torch(model, batch, op, layers, newline_tokens)
    fvcore_counts = measure_fvcore(model, batch, op, layers, newline_tokens)
    parts = {"decoder": (report.total, torch_counts.decoder, fvcore_counts.decoder),
             "lm_head": (report.lm_head, torch_counts.lm_head, fvcore_counts.lm_head),
             "vision": (report.vision or 0, torch_counts.vision, fvcore_counts.vision)}
    return {part: {"analytic": a, "torch": t, "fvcore_macs": f, "fvcore_x2": 2 * f} for part, (a, t, f) in parts.items()}


def _demo(argv=None) -> None:
    """Print :func:`side_by_side` for every op on a tiny random-weight LLaVA (offline, a few seconds)."""
    import argparse

    import numpy as np
    from PIL import Image

    from .. import tiny
    from ..ops import OPERATORS

    parser = argparse.ArgumentParser(prog="python -m analysis.flops.measure", description=_demo.__doc__)
    parser.add_argument("--backbone", default="qwen2", choices=sorted(tiny.TEXT_CONFIGS))
    parser.add_argument("--attn", default="sdpa", choices=("eager", "sdpa"))
    parser.add_argument("--start-layer", type=int, default=1)
    args = parser.parse_args(argv)
    model = tiny.build_model("llava", args.backbone, attn_implementation=args.attn, num_kv_heads=2)
    processor = tiny.build_processor("llava")
    images = [Image.fromarray(np.random.RandomState(i).randint(0, 255, (32, 32, 3), dtype=np.uint8)) for i in range(2)]
    batch = processor(images=images, text=["USER: <image>\nWhat is written here? ASSISTANT:", "USER: <image>\nHi ASSISTANT:"],
                      return_tensors="pt", padding=True)
    print(f"tiny LLaVA ({args.backbone}, {args.attn}), batch of 2, op at layers {args.start_layer}..end")
    print(f"{'op':>14} {'part':>8} {'analytic':>10} {'torch':>10} {'fvcore x2':>10}")
    for op in sorted(OPERATORS):
        for part, row in side_by_side(model, batch, op, range(args.start_layer, 4)).items():
            print(f"{op:>14} {part:>8} {row['analytic']:>10} {row['torch']:>10} {row['fvcore_x2']:>10}")


if __name__ == "__main__":
    _demo()
