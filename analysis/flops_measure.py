"""Measured FLOPs of a real forward, to check :mod:`analysis.flops` against: torch and fvcore.

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

Both run the model under :func:`analysis.ablate.ablate` and split the count by module: decoder
(``language_model``; per layer and per component, the attention kernel being what a layer counts
beyond its linear layers), LM head, vision tower + projector.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .ablate import ablate
from .models import decoder_layers, llava_core

LINEARS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
           "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
           "down_proj": "mlp.down_proj"}


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
