"""The ablation operators: which computations on vision tokens a decoder layer stops doing.

Each operator is one small class registered by name in :data:`OPERATORS`. An operator says
declaratively what it removes; :mod:`analysis.ablation` executes that, and :mod:`analysis.flops`
counts it, from the same declaration:

* ``skip_attention`` -- vision rows are not attention queries: their residual stream passes the
  attention sub-layer unchanged and their Q and O projections and attention rows are not computed.
  Their keys and values still are (other tokens read them).
* ``skip_ffn`` -- the FFN runs on non-vision rows only; vision rows pass it unchanged.
* ``allowed(q_vision, k_vision)`` -- which (query, key) pairs attention may use, on top of
  causality and padding. Every query always keeps itself (the diagonal) so the softmax stays
  defined; ``None`` means no change.

Operators from "Streamline Without Sacrifice" (Wu, Lu, Liu; ICML 2025, arXiv 2505.15816).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # tensors only flow through; importing this registry stays torch-free (the report reads it)
    import torch

OPERATORS: dict[str, type[Operator]] = {}


def register_operator(cls: type[Operator]) -> type[Operator]:
    """Class decorator: register ``cls`` under ``cls.name``; a second class of the same name is an error."""
    if cls.name in OPERATORS:
        raise ValueError(f"operator {cls.name!r} is already registered by {OPERATORS[cls.name].__qualname__}")
    OPERATORS[cls.name] = cls
    return cls


def get_operator(name: str) -> Operator:
    """An instance of the operator registered as ``name``."""
    if isinstance(name, Operator):
        return name
    try:
        return OPERATORS[name]()
    except KeyError:
        raise ValueError(f"unknown op {name!r}; known ops: {', '.join(sorted(OPERATORS))}") from None


class Operator:
    name: ClassVar[str]
    description: ClassVar[str]
    skip_attention: ClassVar[bool] = False
    skip_ffn: ClassVar[bool] = False

    def allowed(self, q_vision: torch.Tensor, k_vision: torch.Tensor) -> torch.Tensor | None:
        """(B, Nq, Nk) bool: pairs this op allows, from (B, Nq) query and (B, Nk) key vision masks."""
        return None

    @property
    def changes_mask(self) -> bool:
        return type(self).allowed is not Operator.allowed

    @property
    def changes_attention(self) -> bool:
        """Whether the attention sub-layer must be computed by :mod:`analysis.attention`."""
        return self.skip_attention or self.changes_mask

    @property
    def is_identity(self) -> bool:
        return not (self.changes_attention or self.skip_ffn)

    def affects(self, query_vision: torch.Tensor, key_vision: torch.Tensor) -> bool:
        """Whether this op changes anything for a chunk with these (B, T) query / (B, K) key vision masks."""
        if self.is_identity:
            return False
        if self.skip_attention or self.skip_ffn:
            if bool(query_vision.any()):
                return True
        return self.changes_mask and bool(key_vision.any())

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@register_operator
class NoOp(Operator):
    name = "none"
    description = "baseline: nothing is removed"


@register_operator
class MaskV2V(Operator):
    name = "mask_v2v"
    description = (
        "vision queries stop attending to vision keys; they keep the non-vision tokens before them "
        "(system prompt, earlier text) and themselves"
    )

    def allowed(self, q_vision, k_vision):
        return ~(q_vision[:, :, None] & k_vision[:, None, :])


@register_operator
class SkipAttn(Operator):
    name = "skip_attn"
    description = "vision tokens skip the attention sub-layer; text still attends to their keys/values"
    skip_attention = True


@register_operator
class SkipFFN(Operator):
    name = "skip_ffn"
    description = "vision tokens skip the FFN sub-layer"
    skip_ffn = True


@register_operator
class SkipAttnFFN(Operator):
    name = "skip_attn_ffn"
    description = "vision tokens skip attention and FFN: they are frozen from the first ablated layer on"
    skip_attention = True
    skip_ffn = True


@register_operator
class DropV2T(Operator):
    name = "drop_v2t"
    description = "non-vision queries stop attending to vision keys (prefill and every decode step)"

    def allowed(self, q_vision, k_vision):
        return ~(~q_vision[:, :, None] & k_vision[:, None, :])
