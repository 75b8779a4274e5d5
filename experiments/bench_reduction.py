"""Benchmark on CPU against the vanilla model: FastV, PyramidDrop, VisionZip, ProxyV and ProxyV + FastV --
prefill time, decode step, peak memory (analysis.bench: paired rounds, medians of per-round ratios; peak memory
in a fresh process per variant). Shape of bench_proxyv.py: random weights, LLaVA-NeXT, Llama width >= 1024,
base + 2x2 crops of 24x24 = 5 x 576 vision tokens + 48 newlines, sdpa. FastV from --start-layer (newlines
ranked with the patches); PyramidDrop at 1/4, 1/2, 3/4 of the layers; VisionZip 54 + 10 per crop (decoder
FLOPs; the tower is a cheap stand-in); ProxyV learned from the middle layer (newlines as text). Prints, does
not assert; target: time saved / executed FLOPs saved >= 0.9. See docs/benchmarks.md.

    .venv/bin/python experiments/bench_reduction.py [--width 1024 --layers 8 --repeats 5 --threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from analysis import bench
from analysis.flops import PrefillTokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--grid", type=int, default=24, help="patches per crop side (24 -> 576 per crop)")
    parser.add_argument("--start-layer", type=int, default=2, help="FastV's K")
    parser.add_argument("--text", type=int, default=64, help="text tokens in the prompt")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="1: steadier on a shared machine (see docs)")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: a method's index, -1: vanilla
    args = parser.parse_args()
    bench.set_threads(args.threads)
    if args.memory_of:
        bench.mmap_every_buffer()  # before anything is allocated
    L, K, middle = args.layers, args.start_layer, args.layers // 2
    S = bench.Setting
    specs = {"FastV keep 0.5": S(None, "fastv", {"start_layer": K}, {"keep": 0.5}),
             "FastV keep 0.25": S(None, "fastv", {"start_layer": K}, {"keep": 0.25}),
             "PDrop keep 0.5": S(None, "pdrop", {"layers": [L // 4, L // 2, 3 * L // 4]}, {"keep": 0.5}),
             "VisionZip 54+10": S(None, "visionzip", {}, {"dominant": 54, "contextual": 10}),
             f"ProxyV-L{middle}": S(middle, newline_tokens="text"),
             f"ProxyV-L{middle}+FastV": S(middle, "fastv", {"start_layer": K}, {"keep": 0.5}, "text")}
    base = bench.bench_model("llava_next", args.width, args.layers, args.grid, std=0.02)
    batch = bench.bench_batch("llava_next", args.grid, args.text, crops_per_side=2)
    if args.memory_of:  # -1: vanilla
        spec = [*specs.values()][int(args.memory_of)] if int(args.memory_of) >= 0 else S()
        model = spec.build(base, copy=False)
        with spec.block(model):
            return bench.report_peak(lambda: bench.prefill(model, batch))
    tokens = PrefillTokens.from_batch(batch, base.config)
    n_vision = int(tokens.vision.sum())
    print(f"LLaVA-NeXT, Llama width {args.width}, {args.layers} layers, {n_vision} vision tokens (5 crops x "
          f"{args.grid ** 2} + newlines) + {tokens.seq_len - n_vision} text tokens; sdpa, {args.threads} threads, "
          f"median of {args.repeats}; {bench.load_note()}", flush=True)
    models = [spec.build(base) for spec in specs.values()]
    with contextlib.ExitStack() as stack:
        flops = [spec.flops(model, batch) for model, spec in zip(models, specs.values())]
        for model, spec in zip(models, specs.values()):
            stack.enter_context(spec.block(model))
        t = bench.paired_rounds(lambda: bench.prefill_seconds(base, batch),
                                [lambda m=m: bench.prefill_seconds(m, batch) for m in models], args.repeats)
        d = [bench.paired_decode(base, m, batch, args.decode_steps) for m in models]
    mem = [bench.peak_in_fresh_process([__file__, *sys.argv[1:], "--memory-of", which])
           for which in map(str, range(-1, len(specs)))]
    print(f"{'':<18}{'prefill s':>10}{'ratio':>7}{'FLOPs exec':>11}{'theory':>7}{'saved/saved':>12}{'(theory)':>9}"
          f"{'decode ms':>10}{'ratio':>7}{'peak MiB':>9}{'ratio':>7}")
    print(f"{'vanilla':<18}{t[0].a:>10.3f}{1:>7.3f}{1:>11.3f}{1:>7.3f}{'':>21}"
          f"{d[0].a * 1e3:>10.2f}{1:>7.3f}{mem[0]:>9.1f}{1:>7.3f}")
    for name, tm, (fe, ft), dm, m in zip(specs, t, flops, d, mem[1:]):
        print(f"{name:<18}{tm.b:>10.3f}{tm.ratio:>7.3f}{fe:>11.3f}{ft:>7.3f}{(1 - tm.ratio) / (1 - fe):>12.3f}"
              f"{(1 - tm.ratio) / (1 - ft):>9.3f}{dm.b * 1e3:>10.2f}{dm.ratio:>7.3f}{m:>9.1f}{m / mem[0]:>7.3f}")
    print(f"vanilla decode ms in the pair of each method {[round(x.a * 1e3, 2) for x in d]}; saved/saved: time "
          f"saved / FLOPs saved (target >= 0.9). After the run: {bench.load_note()}")


if __name__ == "__main__":
    main()
