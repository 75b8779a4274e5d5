"""The trainable parts of ProxyV and the spatial proxy initialiser.

Behaviour follows the official code (github penghao-wu/ProxyV, ``llava/model/vision_mlp.py``):

* :class:`GuidedUpdate` is the per-layer light MLP (official ``VisionMLP``) that replaces attention
  and FFN for the full vision tokens: ``v' = RMSNorm(v + W_out SiLU(W_fuse [W_in v ; W_ctx proxy(v)]))``.
* :class:`LightUpdate` is its context-free form for ``init="none"`` (no proxies: the paper's Table 2
  "light MLP" variant), ``v' = RMSNorm(v + W_out SiLU(W_in v))``.
* :func:`spatial_proxies` is the official spatial initialiser: ``F.interpolate(mode="bilinear",
  align_corners=False)`` of each crop's grid (no antialiasing). For an integer factor f the output
  cell i samples source coordinate ``f*i + (f-1)/2``: f=2 averages each 2x2 block, f=4 averages the
  central 2x2 of each 4x4 block, odd f picks the centre cell.
* :class:`LearnedProxies` is the official ``ProxyInitializer``: n learned queries attend over the
  (raw, un-normalised) cells of a crop; the transposed softmax (over proxies) later "splats" each
  proxy back onto the cells.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GuidedUpdate(nn.Module):
    """Light update of full vision tokens guided by their proxies (one per ProxyV layer).

    Args:
        hidden: model width D.
        width: light-MLP width I (default hidden / 4 in :func:`analysis.proxyv.apply_proxyv`).
        norm: the output RMSNorm, an instance of the backbone's own RMSNorm class.
    """

    def __init__(self, hidden: int, width: int, norm: nn.Module):
        super().__init__()
        self.input_proj = nn.Linear(hidden, width, bias=False)  # W_in: a vision token -> I
        self.context_proj = nn.Linear(hidden, width, bias=False)  # W_ctx: its proxy -> I
        self.fuse = nn.Linear(2 * width, width, bias=False)  # W_fuse
        self.out_proj = nn.Linear(width, hidden, bias=False)  # W_out
        self.norm = norm

    def forward(self, vision: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """vision: (B, Nv, D) hidden states; context: (B, Nv, I) = ``context_proj`` of each token's proxy.

        Returns the updated (B, Nv, D) hidden states (the residual is inside, then the norm).
        """
        mixed = torch.cat([self.input_proj(vision), context], dim=-1)  # (B, Nv, 2I)
        return self.norm(vision + self.out_proj(F.silu(self.fuse(mixed))))


class LightUpdate(nn.Module):
    """Context-free light MLP of the full vision tokens (``init="none"``, the paper's Table 2 "light MLP").

    ``v' = RMSNorm(v + W_out SiLU(W_in v))``: :class:`GuidedUpdate` without its context half. Its ``fuse``
    layer is dropped too: without the context, ``W_fuse W_in`` is a product of two linear maps with no
    nonlinearity between them, i.e. one D -> I map of rank <= I, which ``W_in`` alone already spans; it would
    add I^2 parameters and 2·I^2 FLOPs per token and no expressiveness. Same names as GuidedUpdate's.

    Args:
        hidden: model width D.
        width: light-MLP width I.
        norm: the output RMSNorm, an instance of the backbone's own RMSNorm class.
    """

    def __init__(self, hidden: int, width: int, norm: nn.Module):
        super().__init__()
        self.input_proj = nn.Linear(hidden, width, bias=False)  # W_in: a vision token -> I
        self.out_proj = nn.Linear(width, hidden, bias=False)  # W_out
        self.norm = norm

    def forward(self, vision: torch.Tensor, context: None = None) -> torch.Tensor:
        """vision: (B, Nv, D) hidden states (``context`` must be None). Returns the updated (B, Nv, D)."""
        if context is not None:
            raise ValueError("LightUpdate takes no proxy context")
        return self.norm(vision + self.out_proj(F.silu(self.input_proj(vision))))


def spatial_proxies(cells: torch.Tensor, factor: int) -> torch.Tensor:
    """Bilinear downsampling of crop grids, as the official code does it.

    cells: (C, H, W, D), H and W divisible by ``factor`` (LLaVA crops: H = W = side). Returns
    (C, (H/f)*(W/f), D), row-major.
    """
    C, H, W, D = cells.shape
    rows, cols = H // factor, W // factor
    grid = F.interpolate(cells.permute(0, 3, 1, 2), size=(rows, cols), mode="bilinear",
                         align_corners=False, antialias=False)  # (C, D, H/f, W/f)
    return grid.permute(0, 2, 3, 1).reshape(C, rows * cols, D)


class LearnedProxies(nn.Module):
    """Learned proxy initialiser: ``n`` learned queries attend over each crop's cells.

    Args:
        hidden: model width D.
        width: query/key width I.
        n: proxies per crop (official: crop tokens // reduce_factor^2).
    """

    def __init__(self, hidden: int, width: int, n: int):
        super().__init__()
        self.key_proj = nn.Linear(hidden, width, bias=False)  # official Wk
        # Official init: standard normal / sqrt(4 I).
        self.queries = nn.Parameter(torch.randn(n, width) / (4 * width) ** 0.5)  # (n, I)

    def forward(self, cells: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cells: (C, S, D) raw hidden states of each crop's S cells; valid: (C, S) bool (False: unpadded away).

        Returns ``proxies`` (C, n, D) = softmax over valid cells of the query-key logits, times the
        cells; and ``splat`` (C, S, n) = softmax over proxies of the same logits, transposed, which
        maps proxies back to cells in :class:`GuidedUpdate`'s context.
        """
        keys = self.key_proj(cells)  # (C, S, I)
        logits = torch.einsum("ni,csi->cns", self.queries, keys) / self.queries.shape[-1] ** 0.5  # (C, n, S)
        attn = logits.masked_fill(~valid[:, None, :], torch.finfo(logits.dtype).min).softmax(-1)
        proxies = attn @ cells  # (C, n, D)
        splat = logits.transpose(1, 2).softmax(-1)  # (C, S, n)
        return proxies, splat
