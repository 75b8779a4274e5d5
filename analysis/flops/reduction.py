"""FLOPs of token reduction (the ``reduction`` family): FastV and PyramidDrop, as :mod:`analysis.reduction` executes them.

    from analysis.flops import PrefillTokens, count_flops, load_config
    tokens = PrefillTokens.from_counts(576, 64, 576)          # or PrefillTokens.from_batch(batch, config)
    count_flops(load_config("llava-1.5-7b"), tokens, "fastv", start_layer=3, keep=0.5)
    count_flops(load_config("llava-1.5-7b"), tokens, "pdrop", layers=[8, 16, 24], keep=0.5)

Conventions as :mod:`analysis.flops` (an (m, k) @ (k, n) product costs 2·m·k·n; dims D, H, Hkv, hd, F
of :class:`~analysis.flops.TextDims`). A padded prefill batch (B, T); sample b has ``valid_b`` tokens,
``n_b`` of them vision tokens (as :class:`~analysis.flops.PrefillTokens` marks them) and
``t_b = valid_b - n_b`` text tokens. A *stage* is a run of layers on the same rows: per sample its
alive rows ``r_b`` (text + the vision tokens still kept), executed as a (B, W) block.

**FastV** (start layer K, keep R)::

    layers 0..K-1     HF's own layer on (B, T)                                (stage 0, W = T)
    ranking           rank_scores: the last prompt token's query row against all T keys of layer K-1, all
                      H query heads, from layer K-1's own q_proj / k_proj outputs (no extra projection):
                      executed B·H·T·2·hd; it runs as layer K begins, so it is counted in layer K
    kept              k_b = ceil(R·n_b) vision tokens; r_b = t_b + k_b; W = N = max_b r_b
    layers K..L-1     every component on B·N rows; attention the full B·H·N·N rectangle

**PyramidDrop** (stage boundaries K_1 < ... < K_S, keep R)::

    stage s           floor(n_b·R^s) vision tokens kept; r_b = t_b + floor(n_b·R^s); W = N_s = max_b r_b
                      (stage 0: the padded (B, T) input, r_b = valid_b)
    ranking before K_s, counted in layer K_s, on the rows of stage s-1 (W = N_{s-1}):
                      rank_q_proj  B rows (one query row per sample)       2·rows·D·H·hd
                      rank_k_proj  B·N_{s-1} rows (filler/padding incl.)   2·rows·D·Hkv·hd
                      rank_scores  B·H·1·N_{s-1} (query, key) pairs        2·hd each
    layers K_s..K_{s+1}-1 on (B, N_s), as FastV's pruned layers

**Theoretical** figure (per sample, padding and filler removed): projections and FFN on the r_b alive
rows; attention over the causal pairs of the kept sequence (r_b(r_b+1)/2, fewer under a sliding
window, which is taken over the kept rows' order); ranking on the sample's valid rows only (FastV:
H·valid_b·2·hd; PyramidDrop: one query row, r_b key rows, H·r_b·2·hd), and only for a sample that
has vision tokens to rank.

**Token groups**: rows of (kept) vision tokens ``vision``, text rows ``text``, padding and filler slots
``padding`` (executed only); ranking work is all ``vision`` (it exists for the vision tokens). The
theoretical vision / text split of the attention pairs assumes the kept vision tokens spread evenly over
a sample's vision positions: exact for one image (the split depends only on how many are kept), an
approximation of the split (never of the total) when a sample has several images.

**LM head** (:func:`analysis.flops.count_flops`, ``lm_head="all"``): every row of the forward's output,
which for a pruned forward is the last stage's B·N rows (:meth:`ReductionFlops.output_rows`).
``positions`` (PyramidDrop's renumbered or original position ids) changes no FLOPs. A batch without any
vision token executes the baseline (nothing to rank or drop).

**Qwen2-VL / Qwen2.5-VL / Qwen3-VL**: the same functions, fed the Qwen token layout
(:meth:`~analysis.flops.PrefillTokens.from_batch`: image and video pad tokens are vision tokens, a sample's kept
counts are over all of them together) and the Qwen text config's dims; the vision side (tower, PatchMerger, DeepStack
mergers) runs in full before the decoder and is counted by :mod:`analysis.flops.qwen` in
:func:`~analysis.flops.count_flops`, as for the plain forward. Kept rows keep their M-RoPE positions and DeepStack adds
its features to the alive vision rows: no products, nothing counted. Exact against torch's counter in
tests/test_flops_reduction_qwen.py.

Kept counts are the execution's own functions (:mod:`analysis.reduction.counts`, imported: the two cannot
disagree, float rounding included). Each other piece of the model is one small function below (the
schedule of stages, a stage's layer, a ranking), so a change in what executes changes one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reduction.counts import fastv_kept, pdrop_kept
from .decoder import Breakdown, LayerFlops, baseline_flops, decoder_layer_breakdown
from .dims import TextDims
from .tokens import PrefillTokens, allowed_pair_counts

METHODS = ("fastv", "pdrop")
RANK_COMPONENTS = ("rank_q_proj", "rank_k_proj", "rank_scores")


# ----------------------------------------------------------------------------- stages

@dataclass(frozen=True)
class Rows:
    """The rows a stage runs on: per sample its alive vision and text rows, and the executed width W of
    its (B, W) block (T for the padded input; the largest alive count after a gather)."""

    vision: tuple[int, ...]
    text: tuple[int, ...]
    width: int

    @property
    def batch(self) -> int:
        return len(self.vision)

    @property
    def alive(self) -> tuple[int, ...]:
        return tuple(v + t for v, t in zip(self.vision, self.text))

    def executed_groups(self) -> dict[str, int]:
        """Rows of the (B, W) block by group: filler slots and padding are ``padding``."""
        vision, text = sum(self.vision), sum(self.text)
        return {"vision": vision, "text": text, "padding": self.batch * self.width - vision - text}

    def theoretical_groups(self) -> dict[str, int]:
        return {"vision": sum(self.vision), "text": sum(self.text)}


def gathered(vision: list[int] | tuple[int, ...], text: tuple[int, ...]) -> Rows:
    """The rows after a drop: ``vision`` kept per sample, gathered into a (B, max alive) block."""
    return Rows(tuple(vision), text, max(v + t for v, t in zip(vision, text)))


@dataclass(frozen=True)
class Ranking:
    """Ranking work counted in ``layer``: ``kind`` ("fastv" or "pdrop") on the rows ``rows`` it ranks."""

    layer: int
    kind: str
    rows: Rows


@dataclass(frozen=True)
class Schedule:
    """What a reduced prefill runs: ``stages`` ((first layer, rows), from layer 0) and its ``rankings``."""

    stages: tuple[tuple[int, Rows], ...]
    rankings: tuple[Ranking, ...]

    def rows_at(self, layer: int) -> Rows:
        return [rows for start, rows in self.stages if start <= layer][-1]

    def ranking_at(self, layer: int) -> Ranking | None:
        return next((r for r in self.rankings if r.layer == layer), None)

    @property
    def first_pruned(self) -> int:
        return self.stages[1][0]


def sample_counts(tokens: PrefillTokens) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per sample: its vision tokens n_b and text tokens t_b (valid, not vision)."""
    vision = tokens.vision & tokens.valid
    return tuple(vision.sum(1).tolist()), tuple((tokens.valid & ~vision).sum(1).tolist())


def fastv_schedule(tokens: PrefillTokens, start: int, keep: float) -> Schedule:
    """FastV from layer K = ``start``: layer K-1's score row over the (B, T) input (counted in layer K, where it
    runs), then the kept rows."""
    n, t = sample_counts(tokens)
    full = Rows(n, t, tokens.seq_len)
    return Schedule(((0, full), (start, gathered([fastv_kept(v, keep) for v in n], t))),
                    (Ranking(start, "fastv", full),))


def pdrop_schedule(tokens: PrefillTokens, boundaries: tuple[int, ...], keep: float) -> Schedule:
    """PyramidDrop: before each boundary K_s the alive rows are ranked, floor(n_b·R^s) vision tokens stay."""
    n, t = sample_counts(tokens)
    stages, rankings = [(0, Rows(n, t, tokens.seq_len))], []
    for s, boundary in enumerate(boundaries, start=1):
        rankings.append(Ranking(boundary, "pdrop", stages[-1][1]))
        stages.append((boundary, gathered([pdrop_kept(v, keep, s) for v in n], t)))
    return Schedule(tuple(stages), tuple(rankings))


# ----------------------------------------------------------------------------- one layer of a stage

def executed_layer(dims: TextDims, rows: Rows) -> Breakdown:
    """Every component on the B·W rows of the stage's block; attention the full (W x W) rectangle per sample."""
    groups = rows.executed_groups()
    pairs = {group: n * rows.width for group, n in groups.items()}
    return decoder_layer_breakdown(dims, groups, groups, groups, pairs)


def kept_rows(vision: torch.Tensor, kept: int) -> torch.Tensor:
    """Which of a sample's valid tokens (``vision``: (valid,) bool) remain: every text token and ``kept`` of its
    vision tokens, spread evenly over its vision positions."""
    positions = torch.nonzero(vision).flatten()
    n = positions.numel()
    keep = torch.ones_like(vision)
    if kept >= n:
        return keep
    chosen = positions[(torch.arange(kept) * n) // kept] if kept else positions[:0]
    keep[positions] = False
    keep[chosen] = True
    return keep


def kept_vision_mask(vision: torch.Tensor, kept: int) -> torch.Tensor:
    """A sample's kept sequence as a vision mask: its valid tokens in order, ``kept`` of its vision tokens
    left, spread evenly over its vision positions (``vision``: (valid,) bool)."""
    return vision[kept_rows(vision, kept)]


def theoretical_pairs(tokens: PrefillTokens, rows: Rows, window: int | None) -> dict[str, int]:
    """Causal (query, key) pairs of every sample's kept sequence (within ``window`` if any), by query group."""
    totals = {"vision": 0, "text": 0}
    for b in range(tokens.batch):
        sequence = kept_vision_mask(tokens.vision[b][tokens.valid[b]], rows.vision[b])
        for group, n in allowed_pair_counts(sequence, None, window, False).items():
            totals[group] += n
    return totals


def theoretical_layer(dims: TextDims, rows: Rows, pairs: dict[str, int]) -> Breakdown:
    """Projections and FFN on the alive rows, attention on ``pairs``."""
    groups = rows.theoretical_groups()
    return decoder_layer_breakdown(dims, groups, groups, groups, pairs)


# ----------------------------------------------------------------------------- ranking

def fastv_ranking(dims: TextDims, rows: Rows, theoretical: bool) -> Breakdown:
    """The score row of the last prompt token against every key, all query heads (q and k reused)."""
    per_key = 2 * dims.heads * dims.head_dim
    if theoretical:  # the sample's valid keys, where it has vision tokens to rank
        keys = sum(a for a, v in zip(rows.alive, rows.vision) if v)
    else:
        keys = rows.batch * rows.width
    return {"rank_scores": {"vision": keys * per_key}}


def pdrop_ranking(dims: TextDims, rows: Rows, theoretical: bool) -> Breakdown:
    """Layer K_s's q_proj on one row per sample, its k_proj on the alive rows, and the score row."""
    if theoretical:
        ranked = [a for a, v in zip(rows.alive, rows.vision) if v]
        queries, keys = len(ranked), sum(ranked)
    else:
        queries, keys = rows.batch, rows.batch * rows.width
    D, H, Hkv, hd = dims.hidden, dims.heads, dims.kv_heads, dims.head_dim
    return {"rank_q_proj": {"vision": queries * 2 * D * H * hd},
            "rank_k_proj": {"vision": keys * 2 * D * Hkv * hd},
            "rank_scores": {"vision": keys * 2 * H * hd}}


RANKINGS = {"fastv": fastv_ranking, "pdrop": pdrop_ranking}


class ReductionFlops:
    """FastV (``layers`` = K..L-1) or PyramidDrop (``layers`` = its stage boundaries), keeping ``keep``."""

    def __init__(self, method: str, layers, keep: float):
        if method not in METHODS:
            raise ValueError(f"token-reduction FLOPs know {', '.join(METHODS)}, got {method!r}")
        self.name = method
        self.layers = tuple(layers)
        self.keep = keep
        if not self.layers:
            raise ValueError(f"{method}: no layers")
        if method == "fastv" and list(self.layers) != list(range(self.layers[0], self.layers[-1] + 1)):
            raise ValueError(f"fastv prunes consecutive layers K..L-1, got {list(self.layers)}")
        self._cached: tuple | None = None  # (tokens, schedule) of the last tokens counted

    def schedule(self, tokens: PrefillTokens) -> Schedule:
        """The stages and rankings of ``tokens``' prefill (cached for the last tokens)."""
        if self._cached is None or self._cached[0] is not tokens:
            if self.name == "fastv":
                schedule = fastv_schedule(tokens, self.layers[0], self.keep)
            else:
                schedule = pdrop_schedule(tokens, self.layers, self.keep)
            self._cached = (tokens, schedule, {})
        return self._cached[1]

    def active(self, tokens: PrefillTokens) -> bool:
        """Whether the batch has vision tokens to rank; without, the baseline executes."""
        return bool((tokens.vision & tokens.valid).any())

    def output_rows(self, tokens: PrefillTokens) -> int:
        """Rows the decoder outputs (the LM head's rows with ``lm_head="all"``): B·W of the last stage."""
        if not self.active(tokens):
            return tokens.batch * tokens.seq_len
        rows = self.schedule(tokens).stages[-1][1]
        return rows.batch * rows.width

    def layer_flops(self, layer: int, dims: TextDims, tokens: PrefillTokens) -> LayerFlops:
        self._check(dims)
        if not self.active(tokens):
            return baseline_flops().layer_flops(layer, dims, tokens)
        schedule = self.schedule(tokens)
        rows, ranking = schedule.rows_at(layer), schedule.ranking_at(layer)
        executed = executed_layer(dims, rows)
        theoretical = theoretical_layer(dims, rows, self._pairs(tokens, rows, dims.windows[layer]))
        if ranking is not None:
            rank = RANKINGS[ranking.kind]
            executed = {**executed, **rank(dims, ranking.rows, theoretical=False)}
            theoretical = {**theoretical, **rank(dims, ranking.rows, theoretical=True)}
        ablated = layer >= schedule.first_pruned or ranking is not None
        return LayerFlops(layer, ablated, executed, theoretical)

    def _pairs(self, tokens: PrefillTokens, rows: Rows, window: int | None) -> dict[str, int]:
        self.schedule(tokens)
        cache = self._cached[2]
        if (rows, window) not in cache:
            cache[(rows, window)] = theoretical_pairs(tokens, rows, window)
        return cache[(rows, window)]

    def _check(self, dims: TextDims) -> None:
        if self.name == "fastv" and self.layers[-1] != dims.layers - 1:
            raise ValueError(f"fastv prunes from start_layer={self.layers[0]} through the last layer "
                             f"({dims.layers - 1}), got layers {self.layers[0]}..{self.layers[-1]}")
        if not all(1 <= k < dims.layers for k in self.layers):
            raise ValueError(f"{self.name}: layers {list(self.layers)} outside 1..{dims.layers - 1}")
