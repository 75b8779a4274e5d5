"""FLOPs of a LLaVA model's prefill: one analytic model per variant, exact against what executes.

    python -m analysis.flops --config llava-1.5-7b --vision-tokens 576 --text-tokens 64 \\
        --op skip_ffn --start-layer 12 --json

    from analysis.flops import PrefillTokens, count_flops
    from analysis.variant import resolve_variant
    variant = resolve_variant("skip_ffn", 32, start_layer=12)
    report = count_flops(model.config, PrefillTokens.from_batch(batch, model.config), variant)
    # or by name, as ablate() takes it:  count_flops(config, tokens, "skip_ffn", range(12, 32))
    report.total, report.baseline, report.reduction, report.theoretical

Modules, a concept each: :mod:`.dims` (:class:`TextDims`, the vision tower), :mod:`.tokens`
(:class:`PrefillTokens`: which positions of a prefill are vision / valid, and its crops),
:mod:`.decoder` (per-layer formulas, :class:`LayerFlops`, the operators' counts), :mod:`.variants`
(a :class:`analysis.variant.Variant` or a name -> its layer-FLOPs variant, through the family
registry), :mod:`.proxyv` (ProxyV's formulas and variant), :mod:`.reduction` (token reduction:
FastV's and PyramidDrop's stages, rankings and variant), :mod:`.visionzip` (VisionZip's), :mod:`.report` (:func:`count_flops`,
:class:`FlopsReport`), :mod:`.per_sample` (:func:`mean_flops` of an evaluation), :mod:`.configs`
(shipped configs), :mod:`.measure` (torch's and fvcore's counts of a real forward), :mod:`.cli`.

Conventions
-----------
* Only matrix products are counted, and one multiply-add is 2 FLOPs: an (m, k) @ (k, n) product
  costs ``2·m·k·n``, as ``torch.utils.flop_counter`` counts it (fvcore counts multiply-adds, i.e.
  half; see :mod:`analysis.flops.measure`). Not counted: norms, the rotary embedding, activations,
  softmax, bias and residual additions, the embedding lookup -- O(T·D) work beside the O(T·D²) of
  the products, and counted by neither torch's counter nor fvcore. (In transformers 5.x the rotary
  angles are a broadcast multiply, not a matmul, so the decoder has no FLOPs outside its layers;
  the tests check that.)
* Decoder layer, with D hidden, H query heads, Hkv key/value heads, hd head dim, F FFN width,
  R rows (tokens) a sub-layer runs on and K keys each query row is scored against::

      q_proj  2·R_attn·D·H·hd        k_proj, v_proj  2·R·D·Hkv·hd each      o_proj  2·R_attn·H·hd·D
      attn_scores (Q K^T)  2·H·hd per (query row, key)    attn_values (A V)  2·H·hd per (query row, key)
      gate_proj, up_proj  2·R_ffn·D·F each                down_proj  2·R_ffn·F·D

  Attention is counted per *query* head also under GQA: eager repeats K/V to all heads
  (``repeat_kv``) and the SDPA kernels do the same work.
* **Executed** figure: what the kernels execute for the whole padded (B, T) batch. Attention is the
  full rectangle (every query row against all T keys; causal and padding masks are applied to a
  computed score matrix, not skipped). HF's own layers run on all B·T rows, padding included.
  Where an op skips attention or the FFN for vision tokens, :func:`analysis.ablation.ablate` gathers
  each sample's non-vision rows (text and padding) into a (B, N) block, N the largest such count in
  the batch (:func:`analysis.rows.select_rows`): R_attn (or R_ffn) = B·N, which includes filler slots
  of samples with fewer non-vision rows. Mask-only ops (``mask_v2v``, ``drop_v2t``) execute exactly
  the baseline's work. This figure equals ``FlopCounterMode`` on the real forward, exactly.
* **Theoretical** figure: what an ideal kernel needs, per sample, padding removed. Projections and
  FFN run on the sample's valid tokens (minus its vision tokens where the op skips that sub-layer);
  attention costs 2·H·hd (scores) + 2·H·hd (weighted sum) per *allowed* (query, key) pair: the key
  is not after the query (causal), within the sliding window if the layer has one, allowed by the
  op's mask (``Operator.allowed``), and the query always keeps itself (the diagonal). So the
  baseline's attention is the causal half incl. the diagonal, n(n+1)/2 pairs for n tokens.
* Token groups: every row and every (query, key) pair is attributed to its *query* token:
  ``vision`` (positions the op treats as vision, LLaVA-NeXT newline tokens per ``newline_tokens``),
  ``text``, and, executed only, ``padding`` (padding tokens and filler slots: computed, discarded).
* Separate figures: the LM head (``2·rows·D·V``; rows = every position of the forward, or one per
  sample as ``generate()`` computes with ``logits_to_keep=1``) and the vision tower + projector
  (all crops, the tower runs on every crop in full; see :func:`vision_flops`).

Variants: a :class:`analysis.variant.Variant` is counted by its family's ``flops`` callable
(:mod:`analysis.families`): every operator of :mod:`analysis.ops` from its own declaration
(``skip_attention``, ``skip_ffn``, ``allowed``), so a new operator is counted without a change
here; ProxyV by :func:`analysis.flops.proxyv.proxyv_flops` (``--op proxyv --proxy-reduce F
[--proxy-init learned]``), FastV and PyramidDrop by
:func:`analysis.flops.variants.reduction_flops` (``--op fastv --start-layer K --keep R``,
``--op pdrop --layers K1,K2,... --keep R``; VisionZip, ``--op visionzip --dominant D --contextual C``, by
:mod:`analysis.flops.visionzip`: its tower extras and projector in the vision figure, the decoder on the shortened
prompt), each imported on first use, so importing this package does
not import transformers. Dependencies run one way: this package may import :mod:`analysis.proxyv` (its
shapes), never the runner, the sweep or the experiments; :mod:`analysis.proxyv` never imports it.
"""

from __future__ import annotations

from .configs import CONFIG_DIR, load_config, shipped_configs
from .decoder import (
    COMPONENTS,
    GROUPS,
    Breakdown,
    LayerFlops,
    OperatorVariant,
    VariantFlops,
    decoder_layer_breakdown,
)
from .dims import TextDims, tokens_per_crop, vision_flops
from .per_sample import mean_flops
from .report import FlopsReport, count_flops
from .tokens import PrefillTokens, allowed_pair_counts
from .variants import known_variants, make_variant

__all__ = [
    "COMPONENTS", "CONFIG_DIR", "GROUPS", "Breakdown", "FlopsReport", "LayerFlops", "OperatorVariant",
    "PrefillTokens", "TextDims", "VariantFlops", "allowed_pair_counts", "count_flops", "decoder_layer_breakdown",
    "known_variants", "load_config", "main", "make_variant", "mean_flops", "shipped_configs", "tokens_per_crop",
    "vision_flops",
]


def main(argv: list[str] | None = None) -> int:
    """The command line (:mod:`analysis.flops.cli`; imported on call: it reads ProxyV's defaults)."""
    from .cli import main as cli_main

    return cli_main(argv)
