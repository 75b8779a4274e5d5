"""Where the proxies of a batch are: one plan per prefill chunk, from the token layout.

Vocabulary (shapes): B samples, T rows in the chunk, C crops with vision cells in the batch, each crop laid on
a common H x W grid (S = H*W cells), n proxies per crop (``(H/f)*(W/f)`` spatial, a fixed count learned),
P = the largest proxy count of a sample, Nv / Nt = the largest count of full-vision / other rows.

* Full vision tokens are the cells of the crop grids of :mod:`analysis.layout` (LLaVA: base crop and
  high-res crops; Qwen-VL: one grid per image and one per temporal block of a video, see
  :mod:`analysis.layout_qwen`). Everything else -- text, LLaVA-NeXT ``image_newline`` tokens, a CLS token under
  ``vision_feature_select_strategy="full"``, Qwen's vision start/end and timestamp tokens, padding -- is
  computed in full, as text (the official code treats newline tokens as text too).
* Crops of different shapes (Qwen-VL grids have the image's own aspect ratio) are laid on one H x W grid:
  the largest crop's rows and columns, rounded up to a multiple of f for spatial proxies; a crop fills its
  top-left corner and the rest counts as removed cells. For an integer factor, a bilinear proxy reads only
  cells of its own f x f block (:func:`analysis.proxyv.modules.spatial_proxies`), so this is exactly the
  per-crop computation, whatever the other crops' shapes.
* AnyRes crops: LLaVA-NeXT's unpadding removes whole rows or columns of the merged high-res grid,
  so the cells a crop keeps form a rectangle. Spatial proxies downsample the crop's full grid with
  removed cells filled by their nearest kept cell (edge replication); a proxy exists only where
  its f x f block holds at least one kept cell. Complete crops get exactly the official proxies.
  Learned proxies attend over kept cells only, wherever they are (the kept cells of a crop need not
  form a rectangle: token reduction before the start layer leaves any subset, see
  :func:`remap_layout`); every crop with a kept cell gets n proxies.
* Proxies of a sample are ordered image by image, crop by crop, row-major. Their rotary positions: LLaVA
  (1-D): proxy k of an image has ``position(image's first token) + k``, as in the official code; Qwen-VL
  (M-RoPE): see :mod:`analysis.proxyv.runtime` (the positions downsampled like the features).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import BatchLayout, CropGrid, ImageLayout, SampleLayout
from ..layout_qwen import QwenBatchLayout
from ..rows import flat_rows, select_rows


@dataclass
class ProxyPlan:
    """Index tensors of one chunk (all on the chunk's device)."""

    vision: torch.Tensor  # (B, T) bool: full vision tokens
    vision_rows: torch.Tensor  # (B, Nv) long, with vision_valid (B, Nv) bool (see rows.select_rows)
    vision_valid: torch.Tensor
    text_rows: torch.Tensor  # (B, Nt) long: every other row (text, newline, padding)
    text_valid: torch.Tensor
    cell_src: torch.Tensor  # (C, S) long: flat b*T + t of each cell (removed cells: nearest kept cell)
    cell_valid: torch.Tensor  # (C, S) bool: False where unpadding removed the cell
    crop_proxy: torch.Tensor  # (C, n) long: flat proxy slot b*P + k, -1 where the proxy does not exist
    proxy_slots: tuple  # (sources, slots): the existing proxies' flat (c*n + k) indices and their slots b*P + k
    proxy_valid: torch.Tensor  # (B, P) bool
    proxy_start: torch.Tensor  # (B, P) long: chunk row of the first token of the proxy's image
    proxy_rank: torch.Tensor  # (B, P) long: index of the proxy within its image
    row_context: torch.Tensor  # (B, Nv) long: spatial: flat proxy slot; learned: flat cell c*S + s
    text_flat: torch.Tensor  # (B*Nt,) long: flat row b*T + t of each text slot (for index_select)
    vision_flat: torch.Tensor  # (B*Nv,) long
    text_put: tuple  # (slots, rows): valid text slots (or None: all) and their flat rows, for index_put_
    vision_put: tuple
    grid: tuple[int, int]  # (H, W): the common grid of the crops, S = H * W
    factor: int
    learned: bool
    counts: tuple  # per sample, per image, per crop: number of proxies (for FLOPs)

    @property
    def n_proxies(self) -> int:
        return self.proxy_valid.shape[1]

    def allowed(self, past: int, key_valid: torch.Tensor, key_vision: torch.Tensor) -> torch.Tensor:
        """(B, P + Nt, K + P) bool: which (query, key) pairs the ProxyV attention uses.

        Queries are [proxies, text rows]; keys are the K = past + T cache positions, then the P
        proxies. key_valid / key_vision: (B, K) attention mask / full-vision mask of every position.

        * text rows: causal over all valid positions (full vision tokens included), never proxies;
          the diagonal always (padding rows stay defined).
        * proxies: valid non-vision positions before their image's first token (the prompt so
          far, earlier images' newline tokens), and the proxies up to themselves (causal in proxy
          order, across the images of the sample); never full vision tokens. This is the official
          mask (``pos_q >= pos_k`` with the official positions, proxy rows cut from full keys).
        """
        B, K = key_valid.shape
        device = key_valid.device
        key = torch.arange(K, device=device)
        query = past + self.text_rows  # (B, Nt) cache position of each text row
        text_keys = ((key <= query[..., None]) & key_valid[:, None, :]) | (key == query[..., None])  # (B, Nt, K)
        P = self.n_proxies
        text = torch.cat([text_keys, text_keys.new_zeros(B, query.shape[1], P)], dim=-1)

        readable = key_valid & ~key_vision  # (B, K)
        before = key < (past + self.proxy_start)[..., None]  # (B, P, K)
        proxy_keys = readable[:, None, :] & before & self.proxy_valid[..., None]
        order = torch.arange(P, device=device)
        proxy_proxy = (order[None, :] <= order[:, None]) & self.proxy_valid[:, None, :] & self.proxy_valid[..., None]
        proxy_proxy |= torch.eye(P, dtype=torch.bool, device=device)  # (B, P, P)
        proxy = torch.cat([proxy_keys, proxy_proxy], dim=-1)
        return torch.cat([proxy, text], dim=1)


def _kept_rectangle(kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row (H,) and column (W,) source indices that fill a crop's removed cells from the nearest kept one."""
    rows, cols = kept.any(1), kept.any(0)
    if not torch.equal(kept, rows[:, None] & cols[None, :]):
        raise RuntimeError("the kept cells of a crop do not form a rectangle; unexpected LLaVA-NeXT unpadding")
    r, c = rows.nonzero().flatten(), cols.nonzero().flatten()
    H, W = kept.shape
    return torch.arange(H).clamp(int(r[0]), int(r[-1])), torch.arange(W).clamp(int(c[0]), int(c[-1]))


def grids_of(sample) -> tuple:
    """A sample's images (LLaVA) or images and videos in sequence order (Qwen-VL), each with ``start``/``crops``."""
    return getattr(sample, "grids", None) or sample.images


def common_grid(layout, factor: int, spatial: bool) -> tuple[int, int] | None:
    """(H, W) of the grid every crop of the batch is laid on (``None`` without crops)."""
    shapes = [crop.positions.shape for s in layout.samples for image in grids_of(s) for crop in image.crops]
    if not shapes:
        return None
    H, W = max(h for h, _ in shapes), max(w for _, w in shapes)
    if spatial:
        H, W = -(-H // factor) * factor, -(-W // factor) * factor
    return H, W


def _placed(positions: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A crop's (h, w) positions in the top-left corner of an (H, W) grid of -1 (removed)."""
    if tuple(positions.shape) == grid:
        return positions
    out = positions.new_full(grid, -1)
    out[:positions.shape[0], :positions.shape[1]] = positions
    return out


def build_plan(layout, settings) -> ProxyPlan | None:
    """The plan of a chunk from its token layout (:mod:`analysis.layout`); ``None`` without vision cells.

    ``settings``: a :class:`~analysis.proxyv.apply.ProxyVSettings`. ``init="none"``: no proxy at all (P = 0,
    n = 0 per crop; ``reduce_factor`` unused); the plan then only says which rows are full vision tokens, and
    its mask is the text rows' one."""
    factor, learned, proxies = settings.reduce_factor, settings.init == "learned", settings.init != "none"
    B, T = layout.image_mask.shape
    device = layout.image_mask.device
    vision = torch.zeros(B, T, dtype=torch.bool)
    context = torch.zeros(B, T, dtype=torch.long)  # per position: local proxy slot (spatial) / flat cell (learned)
    cell_src, cell_valid, crop_local, crop_sample, counts = [], [], [], [], []
    starts, ranks = [[] for _ in range(B)], [[] for _ in range(B)]
    grid = common_grid(layout, factor, spatial=proxies and not learned)
    if grid is not None:
        H, W = grid
        small_w = W // factor
        n = 0 if not proxies else settings.learned_count(H, W) if learned else (H // factor) * small_w
    for b, sample in enumerate(layout.samples):
        sample_counts = []
        for image in grids_of(sample):
            image_counts, rank = [], 0
            for crop in image.crops:
                positions = _placed(crop.positions.cpu(), grid)  # (H, W), -1 where removed
                kept = positions >= 0
                if not kept.any():
                    image_counts.append(0)
                    continue
                if learned or not proxies:  # removed cells are masked out of the softmax: any kept cell fills them
                    cell_src.append(b * T + torch.where(kept, positions, positions[kept][0]).flatten())
                else:
                    src_r, src_c = _kept_rectangle(kept)
                    cell_src.append(b * T + positions[src_r][:, src_c].flatten())
                cell_valid.append(kept.flatten())
                if learned or not proxies:
                    exists = torch.ones(n, dtype=torch.bool)
                else:
                    exists = kept.view(H // factor, factor, small_w, factor).any(3).any(1).flatten()  # (n,)
                m = int(exists.sum())
                first = len(starts[b])
                local = torch.full((n,), -1, dtype=torch.long)
                local[exists] = torch.arange(first, first + m)
                crop_local.append(local)
                crop_sample.append(b)
                starts[b] += [image.start] * m
                ranks[b] += range(rank, rank + m)
                rank += m
                image_counts.append(m)
                # Which proxy (spatial) or cell (learned) gives each kept cell its context.
                r, c = kept.nonzero().unbind(1)
                if learned:
                    context[b, positions[r, c]] = (len(cell_src) - 1) * H * W + r * W + c
                elif proxies:
                    context[b, positions[r, c]] = local[(r // factor) * small_w + c // factor]
                vision[b, positions[r, c]] = True
            sample_counts.append(tuple(image_counts))
        counts.append(tuple(sample_counts))
    if not cell_src:
        return None
    P = max(len(s) for s in starts)
    proxy_valid = torch.zeros(B, P, dtype=torch.bool)
    proxy_start = torch.zeros(B, P, dtype=torch.long)
    proxy_rank = torch.zeros(B, P, dtype=torch.long)
    for b in range(B):
        m = len(starts[b])
        proxy_valid[b, :m] = True
        proxy_start[b, :m] = torch.tensor(starts[b], dtype=torch.long)
        proxy_rank[b, :m] = torch.tensor(list(ranks[b]), dtype=torch.long)
    local = torch.stack(crop_local)  # (C, n)
    sample_of_crop = torch.tensor(crop_sample)[:, None]
    crop_proxy = torch.where(local >= 0, sample_of_crop * P + local, -1)
    vision_rows, vision_valid = select_rows(vision)
    text_rows, text_valid = select_rows(~vision)
    row_context = context.gather(1, vision_rows)  # (B, Nv)
    if not learned:
        row_context = row_context + torch.arange(B)[:, None] * P  # local slot -> flat slot
    text_flat, vision_flat = flat_rows(text_rows, T), flat_rows(vision_rows, T)
    to = {"device": device}
    return ProxyPlan(
        vision=vision.to(**to), vision_rows=vision_rows.to(**to), vision_valid=vision_valid.to(**to),
        text_rows=text_rows.to(**to), text_valid=text_valid.to(**to),
        cell_src=torch.stack(cell_src).to(**to), cell_valid=torch.stack(cell_valid).to(**to),
        crop_proxy=crop_proxy.to(**to), proxy_slots=_existing(crop_proxy, device), proxy_valid=proxy_valid.to(**to),
        proxy_start=proxy_start.to(**to), proxy_rank=proxy_rank.to(**to), row_context=row_context.to(**to),
        text_flat=text_flat.to(**to), vision_flat=vision_flat.to(**to),
        text_put=_put(text_flat, text_valid, device), vision_put=_put(vision_flat, vision_valid, device),
        grid=grid, factor=factor, learned=learned, counts=tuple(counts),
    )


def _existing(crop_proxy: torch.Tensor, device) -> tuple:
    """(sources, slots) of the proxies that exist, found here on the CPU: on the device, selecting them in the
    forward would read a mask back to the host and stall the launch queue at the start layer."""
    exists = crop_proxy.flatten() >= 0
    sources = exists.nonzero().flatten()
    return sources.to(device), crop_proxy.flatten()[sources].to(device)


def _put(flat: torch.Tensor, valid: torch.Tensor, device) -> tuple:
    """(slots, rows) writing the valid slots back: slots None when every slot is valid (no copy needed)."""
    keep = valid.flatten()
    slots = None if bool(keep.all()) else keep.nonzero().flatten().to(device)
    return slots, flat[keep].to(device)


def remap_layout(layout, slot_of: torch.Tensor, valid: torch.Tensor):
    """The layout of a gathered block: ``slot_of`` (B, T) maps each position of ``layout``'s chunk to its
    slot in a (B, N) block of alive rows (-1: the row is gone), ``valid`` (B, N) the block's real rows.

    Every crop keeps its grid with the cells whose rows are gone removed (-1); a grid with no alive cell is
    dropped. Where the grid starts (its proxies see the prompt before that slot): LLaVA, the slot of its first
    alive cell (its proxies' 1-D rotary positions follow from there); Qwen-VL (a
    :class:`~analysis.layout_qwen.QwenBatchLayout`: images and videos, one crop per temporal block), the first
    slot at or after the grid's original first token, so the proxies see exactly the prompt ProxyV's proxies see
    without the reduction (text is never dropped; a Qwen3-VL video's timestamps inside it stay unseen). The
    result is a LLaVA :class:`~analysis.layout.BatchLayout` (:func:`build_plan` reads it alike). Token reduction
    before ProxyV's start layer runs ProxyV on such a block (learned proxies only: the crop grid is broken; see
    docs/reduction.md, docs/qwen.md).
    """
    B, N = valid.shape
    qwen = isinstance(layout, QwenBatchLayout)

    def moved(t: torch.Tensor, b: int) -> torch.Tensor:
        return torch.where(t >= 0, slot_of[b].to(t.device)[t.clamp(min=0)], -1)

    def alive(t: torch.Tensor, b: int) -> torch.Tensor:
        t = moved(t, b)
        return t[t >= 0].sort().values

    def first_slot_from(position: int, b: int) -> int:
        later = slot_of[b, position:]
        return int(later[later >= 0].min())

    samples = []
    image_mask = torch.zeros(B, N, dtype=torch.bool, device=valid.device)
    newline_mask = torch.zeros_like(image_mask)
    for b, sample in enumerate(layout.samples):
        images = []
        for image in grids_of(sample):
            crops = tuple(CropGrid(crop.kind, moved(crop.positions, b)) for crop in image.crops)
            cells = torch.cat([c.positions.flatten() for c in crops])
            cells = cells[cells >= 0]
            if cells.numel():
                start = first_slot_from(image.start, b) if qwen else int(cells.min())
                images.append(ImageLayout(start=start, end=int(cells.max()) + 1, crops=crops,
                                          newline=alive(image.newline, b)))
        vision, newline = alive(sample.vision, b), alive(sample.newline, b)
        image_mask[b, vision] = True
        newline_mask[b, newline] = True
        samples.append(SampleLayout(images=tuple(images), vision=vision, newline=newline, text=alive(sample.text, b),
                                    padding=(~valid[b]).nonzero().flatten()))
    return BatchLayout(samples=tuple(samples), image_mask=image_mask, newline_mask=newline_mask, valid_mask=valid)
