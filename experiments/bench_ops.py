"""Benchmark: prefill wall time of each operator vs vanilla at a realistic shape, on CPU.

Prints (does not assert) time ratios beside FLOPs ratios. Targets (issue 2): `none` with hooks
<= 1.01x vanilla; each skip op saves >= 0.9x the share of FLOPs it removes. Vanilla and op runs
alternate (analysis.bench.paired); ratios are medians of per-pair ratios.

    .venv/bin/python experiments/bench_ops.py [--width 1024 --layers 8 --grid 32 --text 64 --repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from analysis import ablate, bench
from analysis.bench import bench_batch, bench_model, load_note, paired, set_threads
from analysis.flops import PrefillTokens, count_flops
from analysis.variant import resolve_variant

OPS = ["none", "skip_ffn", "skip_attn", "skip_attn_ffn", "mask_v2v", "drop_v2t"]


def run(model, batch, op=None, layers=None) -> float:
    """Seconds of one prefill forward, under ``ablate(model, op, layers)`` if ``op`` else vanilla."""
    with torch.no_grad(), (ablate(model, op, layers=layers) if op else contextlib.nullcontext()):
        return bench.timed(lambda: model(**batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--grid", type=int, default=32, help="vision tokens = grid^2")
    parser.add_argument("--text", type=int, default=64, help="text tokens in the prompt")
    parser.add_argument("--start-layer", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)

    model = bench_model("llava", args.width, args.layers, args.grid)
    batch = bench_batch("llava", args.grid, args.text)
    tokens = PrefillTokens.from_batch(batch, model.config)
    n_vision = int(tokens.vision.sum())
    layers = range(args.start_layer, args.layers)
    print(f"Llama width {args.width}, {args.layers} layers, {n_vision} vision + {tokens.seq_len - n_vision} text "
          f"tokens, ops on layers {layers.start}..{layers.stop - 1}, sdpa, {args.threads} threads, median of "
          f"{args.repeats}; {load_note()}")

    print(f"{'variant':<15}{'prefill s':>10}{'time':>8}{'FLOPs':>8}{'theory':>8}{'efficiency':>12}{'vs theory':>11}")
    for op in OPS:
        timing = paired(lambda: run(model, batch), lambda op=op: run(model, batch, op, layers), args.repeats)
        report = count_flops(model.config, tokens, resolve_variant(op, args.layers, layers=layers))
        flops, theory = report.total / report.baseline, report.theoretical / report.theoretical_baseline
        efficiency = f"{(1 - timing.ratio) / (1 - flops):.2f}" if flops < 0.999 else "-"
        vs_theory = f"{(1 - timing.ratio) / (1 - theory):.2f}" if flops < 0.999 else "-"
        print(f"{op:<15}{timing.b:>10.3f}{timing.ratio:>8.3f}{flops:>8.3f}{theory:>8.3f}{efficiency:>12}"
              f"{vs_theory:>11}", flush=True)
    print("time, FLOPs, theory: ratios to vanilla. FLOPs: executed (attention as the full rectangle); theory: "
          "allowed (causal) pairs only, closer to what sdpa's causal kernel does. efficiency: saved time / saved "
          f"FLOPs (executed; vs theory: theoretical). After the run: {load_note()}")


if __name__ == "__main__":
    main()
