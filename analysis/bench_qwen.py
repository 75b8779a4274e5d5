"""The long-video prefill benchmark on Qwen-VL shapes (``experiments/bench_qwen_video.py``; docs/qwen.md, "Long-video
benchmark"): a random-weight model of a shipped config, one prompt around one video, the baseline, the skip operators
and ProxyV timed in rounds -- the whole prefill and, inside the same calls, the decoder alone -- beside their analytic
FLOPs and peak memory."""

from __future__ import annotations

import collections
import contextlib
import copy
import os
import statistics
import time

import torch

from . import frozen_rows
from .ablation import ablate
from .bench import load_note
from .flops import PrefillTokens, count_flops, load_config
from .host_reads import LayerReads
from .layout_qwen import QWEN_VL_MODEL_TYPES
from .models import attn_implementations, vlm_generation_class
from .proxyv import apply_proxyv, proxyv_shapes

OPS = ("skip_attn", "skip_ffn", "skip_attn_ffn")
# skip_attn_ffn with every input norm through HF's module (analysis.frozen_rows disabled): what its frozen-row
# norm cache saves, timed in the same rounds
MODULE_NORM = "skip_attn_ffn_hf_norm"
# skip_attn_ffn and ProxyV with their explicit-mask attention on SDPA's own GQA (transformers' switch
# TRANSFORMERS_SDPA_FORCE_GQA=1; under a mask it otherwise repeats the key / value heads): the same values and FLOPs,
# timed in the same rounds (experiments/bench_attention.py found that call 0.6-0.8x as long on an H200). sdpa only.
SDPA_GQA = {"skip_attn_ffn_sdpa_gqa": "skip_attn_ffn", "proxyv_sdpa_gqa": "proxyv"}
# Tokens of a Qwen3-VL timestamp "<4.5 seconds>": "<", "4", ".", "5", " seconds", ">" by the Qwen pre-tokenizer's
# one-digit split (one more from 10 s on); a stated constant, not checked against the real tokenizer (offline here).
STAMP_TOKENS = 6


def build_config(args):
    """The shipped config, cut to ``--layers`` / ``--width`` / ``--vision-depth``. Qwen3-VL's DeepStack taps spread
    over a shorter tower as over the full one (tap i of ``depth`` blocks becomes i * vision_depth // depth), so the
    toy keeps their number; a tower too shallow for distinct taps is a ValueError."""
    config = load_config(args.config)
    if config.model_type not in QWEN_VL_MODEL_TYPES:
        raise ValueError(f"--config {args.config} is {config.model_type}; this benchmark builds Qwen2-VL / "
                         "Qwen2.5-VL / Qwen3-VL video prompts")
    text, vision = config.text_config, config.vision_config
    if args.layers:
        text.num_hidden_layers = args.layers
        if hasattr(text, "max_window_layers"):
            text.max_window_layers = args.layers
    if args.width:  # a toy width for smoke tests: heads of the same size
        head = text.hidden_size // text.num_attention_heads  # M-RoPE sections are sized for this head width
        if args.width % head:
            raise ValueError(f"--width {args.width} must be a multiple of the head width {head}")
        text.num_attention_heads = args.width // head
        text.num_key_value_heads = min(text.num_key_value_heads, text.num_attention_heads)
        text.hidden_size, text.intermediate_size = args.width, 4 * args.width
        vision.out_hidden_size = args.width
    if args.vision_depth:
        depth, vision.depth = vision.depth, args.vision_depth
        if config.model_type != "qwen3_vl":
            vision.fullatt_block_indexes = [args.vision_depth - 1]
        else:
            taps = [i * args.vision_depth // depth for i in vision.deepstack_visual_indexes]
            if len(set(taps)) < len(taps):
                raise ValueError(f"--vision-depth {args.vision_depth} is too shallow for the config's DeepStack taps "
                                 f"{vision.deepstack_visual_indexes} of {depth} blocks (they become {taps})")
            vision.deepstack_visual_indexes = taps
    return config


def video_ids(config, blocks: int, per_block: int, stamp_tokens: int, filler: int) -> list[int]:
    """The video's tokens as the processor writes them. Qwen2(.5)-VL: ``<|vision_start|>``, all blocks' pads,
    ``<|vision_end|>``. Qwen3-VL (transformers 5.x): inside the chat template's outer start ... end, per block its
    timestamp ``<x.x seconds>`` (``stamp_tokens`` ``filler`` ids), ``<|vision_start|>``, pads, ``<|vision_end|>``."""
    start, end, pad = config.vision_start_token_id, config.vision_end_token_id, config.video_token_id
    if config.model_type != "qwen3_vl":
        return [start] + [pad] * (blocks * per_block) + [end]
    block = [filler] * stamp_tokens + [start] + [pad] * per_block + [end]
    return [start] + block * blocks + [end]


def build_batch(config, args, stamp_tokens: int = STAMP_TOKENS):
    """One prompt: text, the video (:func:`video_ids`), text; its pixels are random. Text and timestamps are
    ordinary ids: FLOPs are counted from this batch, so they count exactly the tokens it holds."""
    vision = config.vision_config
    merge = vision.spatial_merge_size
    if args.side % merge:
        raise ValueError(f"--side {args.side} must be a multiple of spatial_merge_size={merge}")
    n_vision = args.blocks * (args.side // merge) ** 2
    half = args.text // 2
    filler = 1000  # any ordinary token id
    ids = [filler] * half + video_ids(config, args.blocks, n_vision // args.blocks, stamp_tokens, filler)
    ids += [filler] * (args.text - half)
    input_ids = torch.tensor([ids])
    patches = args.blocks * args.side * args.side
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "mm_token_type_ids": (input_ids == config.video_token_id).long() * 2,
             "pixel_values_videos": torch.randn(patches, width, generator=generator),
             "video_grid_thw": torch.tensor([[args.blocks, args.side, args.side]])}
    if config.model_type != "qwen3_vl":  # Qwen3-VL dates its blocks by the timestamp text instead
        batch["second_per_grid_ts"] = torch.tensor([1.0])
    return batch, n_vision


@contextlib.contextmanager
def forced_sdpa_gqa():
    """transformers' sdpa attention uses SDPA's own GQA (``enable_gqa=True``) also under an attention mask, for the
    block's duration (it reads the switch at every call); the environment is restored after."""
    name = "TRANSFORMERS_SDPA_FORCE_GQA"
    before = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


@contextlib.contextmanager
def variant_context(model, variant: str, L: int):
    """The block a prefill of ``variant`` runs in: ``ablate`` from layer ``L`` for an operator (and for
    :data:`MODULE_NORM` the frozen-row norm cache disabled; for an :data:`SDPA_GQA` control its base variant's block
    under :func:`forced_sdpa_gqa`); nothing for the baseline and ProxyV (its model is already converted). Entered
    where it is used, so every variant's setup is inside its timing alike."""
    if variant in SDPA_GQA:
        with forced_sdpa_gqa(), variant_context(model, SDPA_GQA[variant], L):
            yield
    elif variant == MODULE_NORM:
        with ablate(model, "skip_attn_ffn", start_layer=L), frozen_rows.disabled():
            yield
    elif variant in OPS:
        with ablate(model, variant, start_layer=L):
            yield
    else:
        yield


def prefill(model, batch, variant: str, L: int) -> None:
    """One prefill of ``variant`` (in its :func:`variant_context`, no gradients, the LM head on the last row as
    generate()'s prefill): what every measurement here runs."""
    with torch.no_grad(), variant_context(model, variant, L):
        model(**batch, logits_to_keep=1)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class SpanClock:
    """The share of a forward spent in ``module`` (the vision tower, the language model): CUDA events (or wall clock
    on CPU) at its forward pre-hook and hook, inside the real call. On a GPU the span is the device's: from when the
    device reaches the module's first kernel to its last, idle gaps included (a host that launches too slowly shows
    here, not as missing FLOPs)."""

    def __init__(self, module, device: str):
        self.cuda = device.startswith("cuda")
        self.marks = []
        module.register_forward_pre_hook(lambda *a: self.marks.append(self._mark()))
        module.register_forward_hook(lambda *a: self.marks.append(self._mark()))

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


def clocks_of(model, device: str) -> dict[str, SpanClock]:
    """The tower's and the decoder's clocks on ``model``."""
    core = model.model
    return {"tower": SpanClock(core.visual, device), "decoder": SpanClock(core.language_model, device)}


def call(model, clocks, batch, variant, L, device):
    """{"whole", "tower", "decoder": seconds, "peak": extra MiB} of one prefill of ``variant``."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    synchronize(device)
    start = time.perf_counter()
    prefill(model, batch, variant, L)
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
    return {"whole": seconds, **{name: clock.seconds() for name, clock in clocks.items()}, "peak": peak}


def layer_reads(model, batch, variant, L) -> dict:
    """How often and where the layers from ``L`` on read device values back to the host in one prefill of
    ``variant`` (:mod:`analysis.host_reads`; an untimed call): {"count": n, "where": ["op at file:line xN", ...]}."""
    lm = model.model.language_model
    spy = LayerReads(lm, lm.layers, L)
    try:
        prefill(model, batch, variant, L)
    finally:
        spy.remove()
    counts = collections.Counter(f"{r.op} at {r.where}" for r in spy.reads)
    return {"count": len(spy.reads), "where": [f"{k} x{n}" if n > 1 else k for k, n in counts.items()]}


def profile_table(model, batch, variant, L, device) -> str:
    """torch.profiler's table of the decoder alone (the language model's forward, the part the variants change) in
    one prefill of ``variant``: operators by self device time (CPU time on CPU), and their total against the span."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
    marks = []

    def on(*args):
        synchronize(device)
        prof.start()
        marks.append(time.perf_counter())

    def off(*args):
        synchronize(device)
        marks.append(time.perf_counter())
        prof.stop()

    lm = model.model.language_model
    handles = [lm.register_forward_pre_hook(on), lm.register_forward_hook(off)]
    try:
        prefill(model, batch, variant, L)
    finally:
        for handle in handles:
            handle.remove()
    averages = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    # as torch's own table totals it: on a GPU the kernels' rows (device events), never their launching operators
    kernels = [e for e in averages if not cuda or (e.device_type == torch.autograd.DeviceType.CUDA
                                                   and not getattr(e, "is_user_annotation", False))]
    busy = sum(getattr(e, key) for e in kernels) / 1e6
    span = marks[1] - marks[0]
    head = (f"{variant}: decoder span {span:.4f} s (profiled), operators' self {'device' if cuda else 'CPU'} time "
            f"{busy:.4f} s ({busy / span:.0%} of the span)\n")
    return head + averages.table(sort_by=key, row_limit=30)


def run(args) -> tuple[dict, list[dict]]:
    """(meta, rows) of the benchmark for the parsed options ``args`` (see the script's ``--help``)."""
    config = build_config(args)
    batch_cpu, n_vision = build_batch(config, args)
    layers = config.text_config.num_hidden_layers
    L = layers // 2 if args.start_layer < 0 else args.start_layer
    dtype = getattr(torch, args.dtype)
    vision_attn = args.vision_attn or args.attn
    implementation = attn_implementations(args.attn, vision_attn, torch.device(args.device).type)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = vlm_generation_class(config.model_type)._from_config(config, dtype=dtype,
                                                                     attn_implementation=implementation).eval()
    proxyv = apply_proxyv(copy.deepcopy(model), L, args.reduce_factor, seed=0)
    batch = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch_cpu.items()}
    batch["pixel_values_videos"] = batch["pixel_values_videos"].to(dtype)
    models = {"none": model, **{op: model for op in OPS}, MODULE_NORM: model, "proxyv": proxyv}
    if args.attn == "sdpa":
        models.update({name: models[base] for name, base in SDPA_GQA.items()})
    clocks = {id(m): clocks_of(m, args.device) for m in (model, proxyv)}

    tokens = PrefillTokens.from_batch(batch_cpu, config)
    shapes = proxyv_shapes(proxyv.config, batch_cpu["input_ids"], batch_cpu["attention_mask"],
                           video_grid_thw=batch_cpu["video_grid_thw"])
    flops = {"none": count_flops(config, tokens, lm_head="last")}
    for op in OPS:
        flops[op] = count_flops(config, tokens, op, start_layer=L, lm_head="last")
    flops[MODULE_NORM] = flops["skip_attn_ffn"]
    s = proxyv.config.proxyv
    flops["proxyv"] = count_flops(config, tokens, "proxyv", start_layer=L, reduce_factor=s["reduce_factor"],
                                  init=s["init"], light_width=s["light_width"], shapes=shapes, lm_head="last")
    flops.update({name: flops[base] for name, base in SDPA_GQA.items()})  # controls: the same computation

    for _ in range(args.warmup):
        for name, m in models.items():
            call(m, clocks[id(m)], batch, name, L, args.device)
    calls = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, m in models.items():
            calls[name].append(call(m, clocks[id(m)], batch, name, L, args.device))
    reads = {name: layer_reads(m, batch, name, L) for name, m in models.items()}
    times = {name: [c["whole"] for c in cs] for name, cs in calls.items()}
    decoder_times = {name: [c["decoder"] for c in cs] for name, cs in calls.items()}
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        for name in models:
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
        # the same count with attention over the allowed (query, key) pairs only: the causal triangle that sdpa's
        # causal kernel computes in HF's own layers, where the executed count (torch's counter) has the rectangle
        pairs_saved = 1 - flops[name].theoretical / flops["none"].theoretical
        rows.append({
            "variant": label(name, L), "median_s": statistics.median(times[name]),
            "time_ratio": ratio, "flops": f, "decoder_flops": flops[name].total, "time_saved": time_saved,
            "flops_saved": flops_saved, "decoder_flops_saved": decoder_saved,
            "saved_ratio": time_saved / flops_saved if flops_saved > 0 else None,
            "decoder_median_s": statistics.median(decoder_times[name]), "decoder_time_ratio": decoder_ratio,
            "decoder_time_saved": 1 - decoder_ratio,
            "decoder_saved_ratio": (1 - decoder_ratio) / decoder_saved if decoder_saved > 0 else None,
            "decoder_pairs_flops_saved": pairs_saved,
            "decoder_pairs_saved_ratio": (1 - decoder_ratio) / pairs_saved if pairs_saved > 0 else None,
            "tower_median_s": statistics.median(c["tower"] for c in calls[name]),
            "peak_extra_mib": max(c["peak"] for c in calls[name]),
            "layer_host_reads": reads[name],
        })
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({load_note()})"
    meta = {"config": args.config, "layers": layers, "width": config.text_config.hidden_size,
            "vision_depth": config.vision_config.depth, "blocks": args.blocks, "side": args.side,
            "vision_tokens": n_vision, "text_tokens": args.text, "prompt_tokens": int(batch_cpu["input_ids"].shape[1]),
            "proxies": int(shapes.proxies), "start_layer": L, "reduce_factor": args.reduce_factor,
            "dtype": args.dtype, "attn": args.attn, "vision_attn": vision_attn, "device": device,
            "repeats": args.repeats, "torch": torch.__version__, "baseline_s": base_time}
    if config.model_type == "qwen3_vl":  # how its prompt was built: tokens per timestamp
        meta["stamp_tokens"] = STAMP_TOKENS
    return meta, rows


def label(name: str, L: int) -> str:
    """A variant's row label: ``none``, ``<variant>-L<start>`` (:data:`MODULE_NORM`: ``skip_attn_ffn-L<start> HF
    norm``; an :data:`SDPA_GQA` control: ``<base>-L<start> SDPA GQA``)."""
    if name == "none":
        return name
    if name in SDPA_GQA:
        return f"{SDPA_GQA[name]}-L{L} SDPA GQA"
    return f"skip_attn_ffn-L{L} HF norm" if name == MODULE_NORM else f"{name}-L{L}"


def table(meta: dict, rows: list[dict]) -> str:
    """The benchmark's figures as the script prints them."""
    side = meta["side"] // 2
    vision_attn = meta.get("vision_attn", meta["attn"])
    tower = f" (tower: {vision_attn})" if vision_attn != meta["attn"] else ""
    lines = [(f"{meta['config']}: {meta['layers']} layers, width {meta['width']}, {meta['vision_tokens']} vision tokens "
              f"({meta['blocks']} blocks of {side}x{side}) + {meta['text_tokens']} text, {meta['proxies']} proxies; "
              f"{meta['dtype']} {meta['attn']}{tower} on {meta['device']}; medians of {meta['repeats']} rounds"),
             "whole prefill (tower, decoder, LM head on the last row) | tower | decoder alone (what the variants "
             "change); ratio = time saved / FLOPs saved, FLOPs as torch's counter (attention over full rectangles); "
             "pairs: FLOPs saved and ratio with attention over allowed pairs only (the causal triangle); host reads in "
             "the variant's layers",
             (f"{'variant':<26}{'s':>8}{'FLOPs saved':>12}{'time saved':>11}{'ratio':>7} |{'s':>7} |{'s':>8}"
              f"{'FLOPs saved':>12}{'time saved':>11}{'ratio':>7}{'pairs':>7}{'ratio':>7}{'peak MiB':>10}{'reads':>6}")]

    def fmt(x):
        return "-" if x is None else f"{x:.2f}"

    for r in rows:
        lines.append(f"{r['variant']:<26}{r['median_s']:>8.4f}{r['flops_saved']:>12.1%}{r['time_saved']:>11.1%}"
                     f"{fmt(r['saved_ratio']):>7} |{r['tower_median_s']:>7.3f} |{r['decoder_median_s']:>8.4f}"
                     f"{r['decoder_flops_saved']:>12.1%}{r['decoder_time_saved']:>11.1%}"
                     f"{fmt(r['decoder_saved_ratio']):>7}"
                     f"{r['decoder_pairs_flops_saved']:>7.1%}{fmt(r['decoder_pairs_saved_ratio']):>7}"
                     f"{r['peak_extra_mib']:>10.0f}{r['layer_host_reads']['count']:>6}")
    for r in rows:
        for read in r["layer_host_reads"]["where"]:
            lines.append(f"  host read in {r['variant']}'s layers: {read}")
    return "\n".join(lines)
