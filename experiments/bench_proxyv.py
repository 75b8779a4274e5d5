"""Benchmark: ProxyV vs the baseline on CPU -- prefill time, peak memory, decode-step time.

Random weights, a LLaVA-NeXT model with a Llama text model (width >= 1024) and a cheap vision
tower whose crops are 24x24 = 576 patches, as LLaVA-NeXT's at 336 px: one square image gives the
base crop + 2x2 high-res crops = 5 x 576 vision tokens (+ 48 newline tokens). Prints, does not
assert. Targets (issue 6): time saved / FLOPs saved >= 0.9, peak-memory ratio <= 1.0, decode-step
ratio <= 1.05. Runs alternate, ratios are medians of per-pair ratios, peak memory (KV cache included)
comes from a fresh process per variant (``--memory-of``): analysis.bench. FLOPs: analysis.flops.

    .venv/bin/python experiments/bench_proxyv.py [--width 1024 --layers 8 --start-layer 2 --reduce 4 --repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import sys

from analysis import bench
from analysis.flops import PrefillTokens, count_flops
from analysis.proxyv import apply_proxyv, proxyv_shapes
from analysis.variant import resolve_variant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--grid", type=int, default=24, help="patches per crop side (24 -> 576 per crop)")
    parser.add_argument("--start-layer", type=int, default=None, help="default: the middle layer")
    parser.add_argument("--reduce", type=int, default=4)
    parser.add_argument("--init", default="spatial", choices=["spatial", "learned", "none"])
    parser.add_argument("--text", type=int, default=64, help="text tokens in the prompt")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="1: steadier on a shared machine (see docs)")
    parser.add_argument("--memory-of", choices=["base", "proxyv"], help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    bench.set_threads(args.threads)
    if args.memory_of:
        bench.mmap_every_buffer()  # before anything is allocated
    start = args.layers // 2 if args.start_layer is None else args.start_layer

    base = bench.bench_model("llava_next", args.width, args.layers, args.grid, std=0.02)
    proxyv = apply_proxyv(copy.deepcopy(base), start_layer=start, reduce_factor=args.reduce, init=args.init, seed=0)
    batch = bench.bench_batch("llava_next", args.grid, args.text, crops_per_side=2)
    if args.memory_of:
        model = base if args.memory_of == "base" else proxyv
        del base, proxyv
        return bench.report_peak(lambda: bench.prefill(model, batch))
    n_vision = int((batch["input_ids"] == base.config.image_token_id).sum())
    print(f"LLaVA-NeXT, Llama width {args.width}, {args.layers} layers, {n_vision} image tokens (5 crops x "
          f"{args.grid ** 2} + newlines) + {batch['input_ids'].shape[1] - n_vision} text tokens; ProxyV "
          f"{args.init} from layer {start}, reduce {args.reduce}; sdpa, {args.threads} threads, "
          f"median of {args.repeats}; {bench.load_note()}", flush=True)

    variant = resolve_variant("proxyv", args.layers, start_layer=start,
                              params={k: proxyv.config.proxyv[k] for k in ("reduce_factor", "init", "light_width")})
    shapes = proxyv_shapes(proxyv.config, batch["input_ids"], batch["attention_mask"], batch.get("image_sizes"))
    tokens = PrefillTokens.from_batch(batch, proxyv.config, newline_tokens="text")  # ProxyV's vision: crop cells
    report = count_flops(proxyv.config, tokens, variant, shapes=shapes)  # decoder prefill
    flops, executed = report.theoretical / report.theoretical_baseline, report.total / report.baseline
    t = bench.paired(lambda: bench.prefill_seconds(base, batch), lambda: bench.prefill_seconds(proxyv, batch), args.repeats)
    d = bench.paired_decode(base, proxyv, batch, args.decode_steps)
    m_base, m_proxyv = (bench.peak_in_fresh_process([__file__, *sys.argv[1:], "--memory-of", which])
                        for which in ("base", "proxyv"))
    print(f"{'':<22}{'baseline':>12}{'ProxyV':>12}{'ratio':>9}")
    print(f"{'prefill s':<22}{t.a:>12.3f}{t.b:>12.3f}{t.ratio:>9.3f}")
    print(f"{'decoder FLOPs ratio':<22}{'':>12}{'':>12}{flops:>9.3f}   (theoretical: causal pairs; "
          f"executed, full rectangle: {executed:.3f})")
    print(f"{'peak memory MiB':<22}{m_base:>12.1f}{m_proxyv:>12.1f}{m_proxyv / m_base:>9.3f}   (target <= 1.0)")
    print(f"{'decode step ms':<22}{d.a * 1e3:>12.2f}{d.b * 1e3:>12.2f}{d.ratio:>9.3f}   (target <= 1.05)")
    print(f"time saved / FLOPs saved: {(1 - t.ratio) / (1 - flops):.3f}   (target >= 0.9; "
          f"vs executed FLOPs: {(1 - t.ratio) / (1 - executed):.3f}); after the run: {bench.load_note()}")


if __name__ == "__main__":
    main()
