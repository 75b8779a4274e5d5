"""The rows a pruned stage computes, and the masks its attention uses.

After a drop every sample's kept rows (its text rows and kept vision rows, in original order) are
gathered into a (B, N) layout, N = the largest kept count of the batch. Filler slots come FIRST, so
each sample's last row is its real last token (``logits[:, -1]`` stays right for left and right
padding); fillers are computed (a copy of some dropped row) but masked out as keys and discarded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..rows import gather_rows


@dataclass
class Rows:
    """The rows of one stage in one forward call, each field (B, N) (``cos``/``sin``: (B, N, hd))."""

    index: torch.Tensor  # original sequence index (cache position in the full layout) of each slot
    valid: torch.Tensor  # the slot holds a real token (not a filler or padding)
    vision: torch.Tensor  # the slot holds a vision token still alive
    pos: torch.Tensor  # position id its rotary embedding uses in this stage
    cos: torch.Tensor
    sin: torch.Tensor

    def gather(self, rows: torch.Tensor) -> Rows:
        return Rows(*(gather_rows(t, rows) for t in (self.index, self.valid, self.vision, self.pos, self.cos,
                                                       self.sin)))


def right_aligned(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the True entries of ``mask`` (B, T), in order and right-aligned per sample.

    Returns ``rows`` (B, N) and ``valid`` (B, N), N = the largest count; the first N - count_b slots of
    sample b hold unselected indices (fillers), ``valid`` False there.
    """
    T = mask.shape[1]
    counts = mask.sum(dim=1)
    n = int(counts.max()) if mask.numel() else 0
    rows = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, T - n:]
    valid = torch.arange(n, device=mask.device)[None, :] >= (n - counts)[:, None]
    return rows, valid


def prefill_mask(rows: Rows) -> torch.Tensor:
    """(B, N, N) bool: causal by original index, valid keys only, and every slot sees itself (fillers too)."""
    allowed = rows.valid[:, None, :] & (rows.index[:, None, :] <= rows.index[:, :, None])
    return allowed | torch.eye(rows.index.shape[1], dtype=torch.bool, device=allowed.device)


def decode_mask(cached_valid: torch.Tensor, new_valid: torch.Tensor) -> torch.Tensor:
    """(B, t, Nc + t) bool for ``t`` new rows after ``Nc`` cached slots (all earlier): every valid cached
    slot, the valid new rows up to each one, and itself."""
    B, t = new_valid.shape
    own = torch.ones(t, t, dtype=torch.bool, device=new_valid.device).tril()
    own = (own & new_valid[:, None, :]) | torch.eye(t, dtype=torch.bool, device=new_valid.device)
    return torch.cat([cached_valid[:, None, :].expand(B, t, -1), own], dim=2)
