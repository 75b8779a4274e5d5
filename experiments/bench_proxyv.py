"""Benchmark: ProxyV vs the baseline on CPU -- prefill time, peak memory, decode-step time.

Random weights, a LLaVA-NeXT model with a Llama text model (width >= 1024) and a cheap vision
tower whose crops are 24x24 = 576 patches, as LLaVA-NeXT's at 336 px: one square image gives the
base crop + 2x2 high-res crops = 5 x 576 vision tokens (+ 48 newline tokens). Prints, does not
assert. Targets (issue 6): time saved / FLOPs saved >= 0.9, peak-memory ratio <= 1.0, decode-step
ratio <= 1.05. Baseline and ProxyV runs alternate so that machine load hits both alike; ratios are
medians of per-pair ratios.

Peak memory: in a fresh process per variant (this script, ``--memory-of``), the resident-set
high-water mark (VmHWM, reset through /proc/self/clear_refs) during one prefill after a warm-up,
minus the resident set before it; glibc is told from the start to serve every buffer >= 64 KiB by
its own mmap and return it when freed (mallopt), so the mark follows live tensors. It includes the
KV cache the prefill returns.

    .venv/bin/python experiments/bench_proxyv.py [--width 1024 --layers 8 --start-layer 2 --reduce 4 --repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from analysis import tiny
from analysis.proxyv import apply_proxyv, proxyv_shapes
from analysis.proxyv.cost import baseline_layer_flops, proxyv_layer_flops


def build(width: int, layers: int, grid: int):
    """Random-weight LLaVA-NeXT (Llama text model) with side x side = grid^2 patches per crop."""
    model = tiny.build_model(
        "llava_next", "llama", image_size=grid * 4, patch_size=4, hidden_size=width, num_layers=layers,
        num_heads=width // 64, intermediate_size=int(width * 2.6875), vision_kwargs={"hidden_size": 32},
    )
    with torch.no_grad():  # HF-like scale, so activations stay finite at this width
        for p in model.model.language_model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return model


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_mib(fn) -> float:
    """Peak resident-set growth (MiB) while ``fn()`` runs."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - before) / 1024


def measure_in_subprocess(variant: str) -> float:
    """Peak prefill memory (MiB) of ``variant``, measured by this script in a fresh process."""
    command = [sys.executable, __file__, *sys.argv[1:], "--memory-of", variant]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def prefill(model, batch):
    with torch.no_grad():
        return model(**batch, use_cache=True, logits_to_keep=1)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decode_ratio(base, proxyv, batch, steps: int) -> tuple[float, float, float]:
    """Greedy decode steps with each model's prefill cache, base and ProxyV steps alternating.

    Returns (median base seconds, median ProxyV seconds, median per-step ratio).
    """
    state = {}
    for name, model in (("base", base), ("proxyv", proxyv)):
        out = prefill(model, batch)
        state[name] = [model, out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), batch["attention_mask"]]
    times = {"base": [], "proxyv": []}
    with torch.no_grad():
        for _ in range(steps + 1):
            for name, entry in state.items():
                model, cache, ids, mask = entry
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                start = time.perf_counter()
                out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
                times[name].append(time.perf_counter() - start)
                entry[2:] = [out.logits[:, -1].argmax(-1, keepdim=True), mask]
    b, p = times["base"][1:], times["proxyv"][1:]  # the first step warms up
    return statistics.median(b), statistics.median(p), statistics.median(y / x for x, y in zip(b, p))


def theoretical_ratio(model, batch, start: int) -> float:
    """Decoder FLOPs ratio ProxyV / baseline, theoretical: causal pairs only, as sdpa's causal kernel runs."""
    shapes = proxyv_shapes(model.config, batch["input_ids"], batch["attention_mask"], batch.get("image_sizes"))
    n_layers = model.config.text_config.num_hidden_layers
    base = baseline_layer_flops(model.config, shapes.sample_vision[0] + shapes.sample_text[0])
    proxyv = start * base + sum(sum(proxyv_layer_flops(model.config, shapes, first=i == start, theoretical=True)
                                    .values()) for i in range(start, n_layers))
    return proxyv / (n_layers * base)


def decoder_flops(model, batch) -> int:
    """Executed matmul FLOPs of the language model (+ ProxyV modules) in the prefill, eager backend."""
    model.set_attn_implementation("eager")
    try:
        with FlopCounterMode(display=False) as counter:
            prefill(model, batch)
        counts = counter.get_flop_counts()
        return sum(sum(counts.get(f"{type(model).__name__}.model.{part}", {}).values())
                   for part in ("language_model", "proxyv"))
    finally:
        model.set_attn_implementation("sdpa")


def paired(fn, base, proxyv, repeats: int) -> tuple[float, float, float]:
    """(median base value, median proxyv value, median per-pair ratio proxyv / base); alternating runs."""
    fn(base), fn(proxyv)  # warm-up
    pairs = []
    for _ in range(repeats):
        b = fn(base)
        p = fn(proxyv)
        pairs.append((b, p))
    return (statistics.median(b for b, _ in pairs), statistics.median(p for _, p in pairs),
            statistics.median(p / b for b, p in pairs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--grid", type=int, default=24, help="patches per crop side (24 -> 576 per crop)")
    parser.add_argument("--start-layer", type=int, default=None, help="default: the middle layer")
    parser.add_argument("--reduce", type=int, default=4)
    parser.add_argument("--init", default="spatial", choices=["spatial", "learned"])
    parser.add_argument("--text", type=int, default=64, help="text tokens in the prompt")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="1: steadier on a shared machine (see docs)")
    parser.add_argument("--memory-of", choices=["base", "proxyv"], help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:
        # Every buffer >= 64 KiB is its own mmap, returned to the OS when freed: the resident set follows
        # live tensors. Set before anything is allocated; it slows allocation, so this process only measures.
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16), libc.mallopt(-1, 1 << 16)  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    args.start_layer = args.layers // 2 if args.start_layer is None else args.start_layer

    base = build(args.width, args.layers, args.grid)
    proxyv = apply_proxyv(copy.deepcopy(base), start_layer=args.start_layer, reduce_factor=args.reduce,
                          init=args.init, seed=0)
    side = args.grid * 4
    processor = tiny.build_processor("llava_next", image_size=side, patch_size=4)
    pixels = np.random.RandomState(0).randint(0, 255, (2 * side, 2 * side, 3), dtype=np.uint8)
    prompt = "USER: <image>\n" + "x" * max(args.text - 20, 1) + " ASSISTANT:"
    batch = processor(images=[Image.fromarray(pixels)], text=[prompt], return_tensors="pt")
    if args.memory_of:
        model = base if args.memory_of == "base" else proxyv
        del base, proxyv
        prefill(model, batch)  # warm-up
        print(f"peak MiB {peak_mib(lambda: prefill(model, batch)):.1f}")
        return
    n_vision = int((batch["input_ids"] == base.config.image_token_id).sum())
    print(f"LLaVA-NeXT, Llama width {args.width}, {args.layers} layers, {n_vision} image tokens (5 crops x "
          f"{args.grid ** 2} + newlines) + {batch['input_ids'].shape[1] - n_vision} text tokens; ProxyV "
          f"{args.init} from layer {args.start_layer}, reduce {args.reduce}; sdpa, {args.threads} threads, "
          f"median of {args.repeats}", flush=True)

    executed = decoder_flops(proxyv, batch) / decoder_flops(base, batch)
    flops = theoretical_ratio(proxyv, batch, args.start_layer)
    t_base, t_proxyv, t_ratio = paired(lambda m: timed(lambda: prefill(m, batch)), base, proxyv, args.repeats)
    d_base, d_proxyv, d_ratio = decode_ratio(base, proxyv, batch, args.decode_steps)
    m_base, m_proxyv = (measure_in_subprocess(variant) for variant in ("base", "proxyv"))
    m_ratio = m_proxyv / m_base
    print(f"{'':<22}{'baseline':>12}{'ProxyV':>12}{'ratio':>9}")
    print(f"{'prefill s':<22}{t_base:>12.3f}{t_proxyv:>12.3f}{t_ratio:>9.3f}")
    print(f"{'decoder FLOPs ratio':<22}{'':>12}{'':>12}{flops:>9.3f}   (theoretical: causal pairs; "
          f"executed, eager rectangle: {executed:.3f})")
    print(f"{'peak memory MiB':<22}{m_base:>12.1f}{m_proxyv:>12.1f}{m_ratio:>9.3f}   (target <= 1.0)")
    print(f"{'decode step ms':<22}{d_base * 1e3:>12.2f}{d_proxyv * 1e3:>12.2f}{d_ratio:>9.3f}   (target <= 1.05)")
    print(f"time saved / FLOPs saved: {(1 - t_ratio) / (1 - flops):.3f}   (target >= 0.9; "
          f"vs executed FLOPs: {(1 - t_ratio) / (1 - executed):.3f})")


if __name__ == "__main__":
    main()
