"""Computation redundancy of vision tokens in LLaVA-style models, and ProxyV.

Public API:
    ablate(model, op, layers=...)  -- scoped, exact removal of computations on vision tokens
    OPERATORS, get_operator        -- the operator registry
    compute_layout                 -- where the vision tokens of a batch are
"""

from .ablate import ablate
from .layout import BatchLayout, compute_layout
from .ops import OPERATORS, Operator, get_operator, register_operator

__all__ = ["ablate", "compute_layout", "BatchLayout", "OPERATORS", "Operator", "get_operator", "register_operator"]
