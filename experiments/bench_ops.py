"""Benchmark: prefill wall time of each operator vs vanilla at a realistic shape, on CPU.

Prints (does not assert) time ratios beside FLOPs ratios. Targets (issue 2): `none` with hooks
<= 1.01x vanilla; each skip op saves >= 0.9x the share of FLOPs it removes.

    .venv/bin/python experiments/bench_ops.py [--width 1024 --layers 8 --grid 32 --text 64 --repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from analysis import ablate, tiny
from analysis.flops import TokenLayout, count_flops


def build(width: int, layers: int, grid: int):
    """Random-weight LLaVA with a Llama text model of the given width and a cheap vision tower."""
    return tiny.build_model(
        "llava", "llama", image_size=grid * 4, patch_size=4, hidden_size=width, num_layers=layers,
        num_heads=width // 64, intermediate_size=int(width * 2.6875), vision_kwargs={"hidden_size": 32},
    )


def decoder_flops(model, batch, op, layers) -> tuple[int, int]:
    """(executed, theoretical) decoder FLOPs of the variant, from the analytic model (exact vs torch's counter)."""
    layout = TokenLayout.from_batch(batch, model.config)
    report = count_flops(model.config, layout, op, layers)
    return report.total, report.theoretical


def _timed(model, batch, op, layers) -> float:
    with torch.no_grad(), (ablate(model, op, layers=layers) if op else contextlib.nullcontext()):
        start = time.perf_counter()
        model(**batch)
        return time.perf_counter() - start


def prefill_ratio(model, batch, op, layers, repeats: int) -> tuple[float, float]:
    """(median seconds of ``op``, median of per-pair time ratios op / vanilla).

    Vanilla and op runs alternate so that drift in machine load hits both alike.
    """
    _timed(model, batch, op, layers), _timed(model, batch, None, layers)  # warm-up
    pairs = [(_timed(model, batch, op, layers), _timed(model, batch, None, layers)) for _ in range(repeats)]
    return statistics.median(t for t, _ in pairs), statistics.median(t / v for t, v in pairs)


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
    torch.set_num_threads(args.threads)

    model = build(args.width, args.layers, args.grid)
    processor = tiny.build_processor("llava", image_size=args.grid * 4, patch_size=4)
    prompt = "USER: <image>\n" + "x" * max(args.text - 20, 1) + " ASSISTANT:"
    batch = processor(images=[tiny_image(args.grid * 4)], text=[prompt], return_tensors="pt")
    n_vision = int((batch["input_ids"] == model.config.image_token_id).sum())
    layers = range(args.start_layer, args.layers)
    print(f"Llama width {args.width}, {args.layers} layers, {n_vision} vision + "
          f"{batch['input_ids'].shape[1] - n_vision} text tokens, ops on layers {layers.start}..{layers.stop - 1}, "
          f"sdpa, {args.threads} threads, median of {args.repeats}")

    base, base_theory = decoder_flops(model, batch, "none", layers)
    print(f"{'variant':<15}{'prefill s':>10}{'time':>8}{'FLOPs':>8}{'theory':>8}{'efficiency':>12}{'vs theory':>11}")
    for op in ["none", "skip_ffn", "skip_attn", "skip_attn_ffn", "mask_v2v", "drop_v2t"]:
        seconds, ratio = prefill_ratio(model, batch, op, layers, args.repeats)
        executed, theory = decoder_flops(model, batch, op, layers)
        flops = executed / base
        theory = theory / base_theory
        efficiency = f"{(1 - ratio) / (1 - flops):.2f}" if flops < 0.999 else "-"
        vs_theory = f"{(1 - ratio) / (1 - theory):.2f}" if flops < 0.999 else "-"
        print(f"{op:<15}{seconds:>10.3f}{ratio:>8.3f}{flops:>8.3f}{theory:>8.3f}{efficiency:>12}{vs_theory:>11}",
              flush=True)
    print("time, FLOPs, theory: ratios to vanilla. FLOPs: executed (attention as the full rectangle); theory: "
          "allowed (causal) pairs only, closer to what sdpa's causal kernel does. efficiency: saved time / saved "
          "FLOPs (executed; vs theory: theoretical)")


def tiny_image(size: int):
    from PIL import Image
    import numpy as np
    return Image.fromarray(np.random.RandomState(0).randint(0, 255, (size, size, 3), dtype=np.uint8))


if __name__ == "__main__":
    main()
