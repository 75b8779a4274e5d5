"""Row selection for computing a sub-layer on some tokens only, batched, without Python loops."""

from __future__ import annotations

import torch


def select_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the True entries of ``mask`` (B, T), left-aligned per sample.

    Returns ``rows`` (B, N) long and ``valid`` (B, N) bool, N = the largest count in the batch; slots
    past a sample's count hold other (unselected) row indices and ``valid`` False there, so they can
    be computed and then discarded.
    """
    counts = mask.sum(dim=1)
    n = int(counts.max()) if mask.numel() else 0
    rows = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :n]
    valid = torch.arange(n, device=mask.device)[None, :] < counts[:, None]
    return rows, valid


def flat_rows(rows: torch.Tensor, T: int) -> torch.Tensor:
    """Row indices ``rows`` (B, N) of (B, T, *F) as indices (B*N,) into its (B*T, *F) flattening."""
    return (rows + torch.arange(rows.shape[0], device=rows.device)[:, None] * T).reshape(-1)


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[b, rows[b, i]]``: (B, T, *F) -> (B, N, *F)."""
    index = rows.view(*rows.shape, *([1] * (x.dim() - 2))).expand(*rows.shape, *x.shape[2:])
    return torch.gather(x, 1, index)


def scatter_add_rows(x: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` (B, T, D) with ``update[b, i]`` added to row ``rows[b, i]`` wherever ``valid``. Under autocast
    ``update`` may be half precision while the residual stream is fp32: it is added in ``x``'s dtype, as the
    layer's own ``residual + out`` would promote it.

    ``rows`` as :func:`select_rows` gives them: distinct within a sample, filler slots naming unselected rows. The
    filler slots add an exact zero (``where``, so a non-finite value computed on a filler row cannot leak) rather
    than being removed: selecting the valid slots would read ``valid`` back to the host in every layer."""
    B, T, D = x.shape
    update = torch.where(valid[..., None], update.to(x.dtype), 0).reshape(-1, D)
    return x.reshape(B * T, D).index_add(0, flat_rows(rows, T), update).view(B, T, D)


def put_rows(x: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` (B, T, D) with row ``rows[b, i]`` replaced by ``values[b, i]`` (B, N, D). ``rows`` distinct
    within a sample (as :func:`select_rows` gives them); a filler slot must carry its row's own value."""
    B, T, D = x.shape
    return x.reshape(B * T, D).index_copy(0, flat_rows(rows, T), values.reshape(-1, D).to(x.dtype)).view(B, T, D)
