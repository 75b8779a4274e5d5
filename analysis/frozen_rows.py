"""Vision rows that an op freezes: normalise them once per forward instead of once per layer.

Under an op that skips both the attention and the FFN of vision rows (``skip_attn_ffn``), a vision row leaves an
ablated layer exactly as it entered it; only its keys and values are still computed (text reads them), from the
layer's ``input_layernorm`` of the row. HF's RMSNorm is ``weight * unit(x)`` with ``unit(x) = (x.float() *
rsqrt(mean(x.float()^2) + eps)).to(x.dtype)``, and ``unit`` does not depend on the layer. So in a run of consecutive
ablated layers the unit rows are computed once, at the run's first layer; each later layer renormalises only its text
rows (which did change) and multiplies by its own weight -- the same operations on the same values, so the same
bits as calling the module. Per layer that is one pass over the (B, T, D) rows (the weight) instead of HF's six
(the cast to fp32, the square, the mean, the scaling, the cast back, the weight; five for fp32 rows), and no fp32
temporaries of the whole sequence.

The cache is used only where this is provably the same computation, and falls back to calling the module otherwise:

* the norm's ``forward`` is HF's plain RMSNorm (the same bytecode as ``LlamaRMSNorm.forward``; Qwen2, Mistral,
  Qwen2-VL, Qwen2.5-VL and Qwen3-VL text norms are), with no hooks on the module and no instance override;
* the layer's input is the very tensor the previous ablated layer returned, unmodified since (same object, same
  version counter): anything between two layers that changes the hidden states -- Qwen3-VL's DeepStack injection
  after layers 0..2, a user's forward hook that returns a new tensor or edits it in place, a full layer in between
  -- makes the next layer start afresh;
* no autograd graph is being recorded through the rows (the cache is updated in place), and the rows are not
  inference tensors (``torch.inference_mode`` keeps no version counter to prove them unedited; use
  ``torch.no_grad``, as HF's ``generate`` does).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

from .rows import flat_rows, gather_rows


def _plain_rms_code():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    code = LlamaRMSNorm.forward.__code__
    return code.co_code, code.co_consts, code.co_names


_PLAIN = None
_DISABLED = False


@contextlib.contextmanager
def disabled():
    """Within the block every frozen-row norm calls the module (what the benchmark times as a control)."""
    global _DISABLED
    before, _DISABLED = _DISABLED, True
    try:
        yield
    finally:
        _DISABLED = before


def is_plain_rms_norm(norm: nn.Module) -> bool:
    """Whether calling ``norm`` computes exactly ``norm.weight * unit_rows(x, norm.variance_epsilon)``."""
    global _PLAIN
    if _PLAIN is None:
        _PLAIN = _plain_rms_code()
    code = getattr(type(norm).forward, "__code__", None)
    if code is None or (code.co_code, code.co_consts, code.co_names) != _PLAIN or "forward" in vars(norm):
        return False
    hooks = (norm._forward_hooks, norm._forward_pre_hooks, nn.modules.module._global_forward_hooks,
             nn.modules.module._global_forward_pre_hooks)
    return not any(hooks) and isinstance(getattr(norm, "weight", None), torch.Tensor)


def unit_rows(x: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm before its weight, written as HF writes it (so bit for bit the same): (..., D) -> (..., D)."""
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return (hidden * torch.rsqrt(variance + eps)).to(x.dtype)


class FrozenRows:
    """One forward's cache of the unit-normalised rows (see the module docstring); lives on the forward's chunk."""

    def __init__(self):
        self.units: torch.Tensor | None = None  # (B, T, D) unit rows of the last ablated layer's input
        self.key: tuple | None = None  # (eps, dtype) they were computed with
        self._after: weakref.ref | None = None  # the tensor that layer returned
        self._version = -1
        self.fresh = 0  # how many times the rows were normalised in full (tests read it)

    def input_norm(self, norm: nn.Module, h: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor,
                   text: torch.Tensor) -> torch.Tensor:
        """``norm(h)`` for a layer whose vision rows are frozen; ``rows`` / ``valid`` (B, N): its text rows, ``text``
        (B, N, D) those rows of ``h`` (the layer gathers them anyway)."""
        if _DISABLED or not is_plain_rms_norm(norm) or (torch.is_grad_enabled() and h.requires_grad):
            self.units = None
            return norm(h)
        key = (norm.variance_epsilon, h.dtype)
        if self.units is not None and self.key == key and self._follows(h):
            B, T, D = h.shape
            units = unit_rows(text, norm.variance_epsilon)
            units = torch.where(valid[..., None], units, gather_rows(self.units, rows))  # filler slots: unchanged
            self.units.view(B * T, D).index_copy_(0, flat_rows(rows, T), units.reshape(-1, D))
        else:
            self.units, self.key = unit_rows(h, norm.variance_epsilon), key
            self.fresh += 1
        return norm.weight * self.units

    def returned(self, out: torch.Tensor) -> None:
        """Record the tensor the layer returns: the next layer may reuse the unit rows only if it gets this one.
        An inference tensor (``torch.inference_mode``) keeps no version counter, so an in-place edit of it could not
        be seen: the next layer then starts afresh."""
        if out.is_inference():
            self._after = None
            return
        self._after, self._version = weakref.ref(out), out._version

    def _follows(self, h: torch.Tensor) -> bool:
        return self._after is not None and self._after() is h and h._version == self._version
