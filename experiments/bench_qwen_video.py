"""Long-video prefill on a Qwen-VL shape: ProxyV and the skip operators, time saved against FLOPs saved, peak memory.

A random-weight Qwen2.5-VL / Qwen2-VL model of a shipped config (analysis/configs; the real tower and decoder
shapes), one prompt: text, one video of ``--blocks`` temporal blocks of ``--side`` x ``--side`` patches (merged
2x2: blocks * (side/2)^2 vision tokens), text. Each variant runs the whole prefill (tower included, the LM head on
the last row, as generate()'s prefill does) in rounds -- the baseline, then every variant -- so drift hits all
alike; a figure is the median over rounds, a ratio the median of per-round ratios. FLOPs are the analytic counts
(exact against torch's counter on tiny models of these classes). ``time saved / FLOPs saved`` near 1 means the
variant turns its FLOPs saving into wall-clock time. Peak memory: the largest allocation above the weights during
the call (CUDA), per variant.

    # one H100 / H200, bf16: Qwen2.5-VL-7B shape, 26 blocks of 36 x 36 patches = 8,424 vision tokens
    python experiments/bench_qwen_video.py --config qwen2.5-vl-7b --blocks 26 --side 36 --device cuda \
        --dtype bfloat16 --out docs/results/bench_qwen_video/qwen2.5-vl-7b.json
    # CPU smoke test at a toy shape
    python experiments/bench_qwen_video.py --config qwen2.5-vl-7b --layers 2 --width 256 --vision-depth 1 \
        --blocks 2 --side 8 --repeats 1
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis import ablate  # noqa: E402
from analysis.bench import load_note  # noqa: E402
from analysis.flops import PrefillTokens, count_flops, load_config  # noqa: E402
from analysis.models import vlm_generation_class  # noqa: E402
from analysis.proxyv import apply_proxyv, proxyv_shapes  # noqa: E402

OPS = ("skip_attn", "skip_ffn", "skip_attn_ffn")


def build_config(args):
    config = load_config(args.config)
    if config.model_type not in ("qwen2_vl", "qwen2_5_vl"):
        raise SystemExit(f"error: --config {args.config} is {config.model_type}; this benchmark builds Qwen2-VL / "
                         "Qwen2.5-VL prompts (Qwen3-VL videos need timestamp text between blocks)")
    text = config.text_config
    if args.layers:
        text.num_hidden_layers = args.layers
        if hasattr(text, "max_window_layers"):
            text.max_window_layers = args.layers
    if args.width:  # a toy width for smoke tests: heads of the same size
        head = text.hidden_size // text.num_attention_heads  # M-RoPE sections are sized for this head width
        if args.width % head:
            raise SystemExit(f"error: --width {args.width} must be a multiple of the head width {head}")
        text.num_attention_heads = args.width // head
        text.num_key_value_heads = min(text.num_key_value_heads, text.num_attention_heads)
        text.hidden_size, text.intermediate_size = args.width, 4 * args.width
        config.vision_config.out_hidden_size = args.width
    if args.vision_depth:
        config.vision_config.depth = args.vision_depth
        config.vision_config.fullatt_block_indexes = [args.vision_depth - 1]
    return config


def build_batch(config, args):
    """One prompt: text, <|vision_start|>, the video's tokens, <|vision_end|>, text; its pixels are random."""
    vision = config.vision_config
    merge = vision.spatial_merge_size
    if args.side % merge:
        raise SystemExit(f"error: --side {args.side} must be a multiple of spatial_merge_size={merge}")
    n_vision = args.blocks * (args.side // merge) ** 2
    half = args.text // 2
    filler = 1000  # any ordinary token id
    ids = [filler] * half + [config.vision_start_token_id] + [config.video_token_id] * n_vision
    ids += [config.vision_end_token_id] + [filler] * (args.text - half)
    input_ids = torch.tensor([ids])
    patches = args.blocks * args.side * args.side
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == config.video_token_id).long() * 2,
        "pixel_values_videos": torch.randn(patches, width, generator=generator),
        "video_grid_thw": torch.tensor([[args.blocks, args.side, args.side]]),
        "second_per_grid_ts": torch.tensor([1.0]),
    }, n_vision


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class DecoderClock:
    """The language model's share of a forward: CUDA events (or wall clock on CPU) at its forward pre-hook and hook,
    so the decoder -- the only part the operators and ProxyV change -- is timed inside the real call."""

    def __init__(self, model, device: str):
        self.cuda = device.startswith("cuda")
        self.marks = []
        lm = model.model.language_model
        lm.register_forward_pre_hook(lambda *a: self.marks.append(self._mark()))
        lm.register_forward_hook(lambda *a: self.marks.append(self._mark()))

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self) -> float:
        start, end = self.marks[-2:]
        self.marks.clear()
        return start.elapsed_time(end) / 1000 if self.cuda else end - start


def call(model, clock, batch, variant, L, device):
    """Seconds (whole prefill, decoder alone) and peak extra MiB of one prefill of ``variant``."""
    context = ablate(model, variant, start_layer=L) if variant in OPS else torch.no_grad()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad(), context:
        model(**batch, logits_to_keep=1)
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
    return seconds, clock.seconds(), peak


def profile_table(model, batch, variant, L, device) -> str:
    """torch.profiler's table of one prefill of ``variant`` (top operators by device time, or CPU time on CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    context = ablate(model, variant, start_layer=L) if variant in OPS else torch.no_grad()
    with profile(activities=activities) as prof, torch.no_grad(), context:
        model(**batch, logits_to_keep=1)
        synchronize(device)
    key = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="qwen2.5-vl-7b")
    parser.add_argument("--layers", type=int, default=0, help="decoder layers (0: the config's)")
    parser.add_argument("--width", type=int, default=0, help="decoder width (0: the config's); for smoke tests")
    parser.add_argument("--vision-depth", type=int, default=0, help="tower blocks (0: the config's)")
    parser.add_argument("--blocks", type=int, default=26, help="temporal blocks of the video")
    parser.add_argument("--side", type=int, default=36, help="patches per side of each block (before the 2x2 merge)")
    parser.add_argument("--text", type=int, default=64, help="text tokens around the video")
    parser.add_argument("--start-layer", type=int, default=-1, help="ProxyV / op start layer (-1: half the layers)")
    parser.add_argument("--reduce-factor", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--profile", type=Path, help="write torch.profiler tables of one prefill per variant here")
    args = parser.parse_args()

    config = build_config(args)
    batch_cpu, n_vision = build_batch(config, args)
    layers = config.text_config.num_hidden_layers
    L = layers // 2 if args.start_layer < 0 else args.start_layer
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = vlm_generation_class(config.model_type)._from_config(config, dtype=dtype,
                                                                     attn_implementation=args.attn).eval()
    proxyv = apply_proxyv(copy.deepcopy(model), L, args.reduce_factor, seed=0)
    batch = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch_cpu.items()}
    batch["pixel_values_videos"] = batch["pixel_values_videos"].to(dtype)
    models = {"none": model, **{op: model for op in OPS}, "proxyv": proxyv}
    clocks = {id(m): DecoderClock(m, args.device) for m in (model, proxyv)}

    tokens = PrefillTokens.from_batch(batch_cpu, config)
    shapes = proxyv_shapes(proxyv.config, batch_cpu["input_ids"], batch_cpu["attention_mask"],
                           video_grid_thw=batch_cpu["video_grid_thw"])
    flops = {"none": count_flops(config, tokens, lm_head="last")}
    for op in OPS:
        flops[op] = count_flops(config, tokens, op, start_layer=L, lm_head="last")
    s = proxyv.config.proxyv
    flops["proxyv"] = count_flops(config, tokens, "proxyv", start_layer=L, reduce_factor=s["reduce_factor"],
                                  init=s["init"], light_width=s["light_width"], shapes=shapes, lm_head="last")

    for _ in range(args.warmup):
        for name, m in models.items():
            call(m, clocks[id(m)], batch, name, L, args.device)
    times = {name: [] for name in models}
    decoder_times = {name: [] for name in models}
    peaks = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, m in models.items():
            seconds, decoder, peak = call(m, clocks[id(m)], batch, name, L, args.device)
            times[name].append(seconds)
            decoder_times[name].append(decoder)
            peaks[name].append(peak)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        for name in ("none", "skip_ffn", "proxyv"):
            (args.profile / f"profile_{name}.txt").write_text(profile_table(models[name], batch, name, L, args.device))

    def total(report):
        return report.total + report.lm_head + report.vision

    base_time, base_flops = statistics.median(times["none"]), total(flops["none"])
    rows = []
    for name in models:
        ratio = statistics.median(t / b for t, b in zip(times[name], times["none"]))
        decoder_ratio = statistics.median(t / b for t, b in zip(decoder_times[name], decoder_times["none"]))
        f = total(flops[name])
        time_saved, flops_saved = 1 - ratio, 1 - f / base_flops
        decoder_saved = 1 - flops[name].total / flops["none"].total
        rows.append({
            "variant": name if name == "none" else f"{name}-L{L}", "median_s": statistics.median(times[name]),
            "time_ratio": ratio, "flops": f, "decoder_flops": flops[name].total, "time_saved": time_saved,
            "flops_saved": flops_saved, "decoder_flops_saved": decoder_saved,
            "saved_ratio": time_saved / flops_saved if flops_saved > 0 else None,
            "decoder_median_s": statistics.median(decoder_times[name]), "decoder_time_ratio": decoder_ratio,
            "decoder_time_saved": 1 - decoder_ratio,
            "decoder_saved_ratio": (1 - decoder_ratio) / decoder_saved if decoder_saved > 0 else None,
            "peak_extra_mib": max(peaks[name]),
        })
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({load_note()})"
    meta = {"config": args.config, "layers": layers, "width": config.text_config.hidden_size,
            "vision_depth": config.vision_config.depth, "blocks": args.blocks, "side": args.side,
            "vision_tokens": n_vision, "prompt_tokens": int(batch_cpu["input_ids"].shape[1]),
            "proxies": int(shapes.proxies), "start_layer": L, "reduce_factor": args.reduce_factor,
            "dtype": args.dtype, "attn": args.attn, "device": device, "repeats": args.repeats,
            "torch": torch.__version__, "baseline_s": base_time}
    print(f"{args.config}: {layers} layers, width {meta['width']}, {n_vision} vision tokens "
          f"({args.blocks} blocks of {args.side // 2}x{args.side // 2}) + {args.text} text, {meta['proxies']} proxies; "
          f"{args.dtype} {args.attn} on {device}; medians of {args.repeats} rounds")
    print("whole prefill (tower, decoder, LM head on the last row) | decoder alone (what the variants change)")
    print(f"{'variant':<18}{'s':>8}{'FLOPs saved':>12}{'time saved':>11}{'ratio':>6} |{'s':>8}{'FLOPs saved':>12}"
          f"{'time saved':>11}{'ratio':>6}{'peak MiB':>10}")

    def fmt(x):
        return "-" if x is None else f"{x:.2f}"

    for r in rows:
        print(f"{r['variant']:<18}{r['median_s']:>8.4f}{r['flops_saved']:>12.1%}{r['time_saved']:>11.1%}"
              f"{fmt(r['saved_ratio']):>6} |{r['decoder_median_s']:>8.4f}{r['decoder_flops_saved']:>12.1%}"
              f"{r['decoder_time_saved']:>11.1%}{fmt(r['decoder_saved_ratio']):>6}{r['peak_extra_mib']:>10.0f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
