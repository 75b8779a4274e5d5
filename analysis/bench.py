"""Shared helpers of the CPU benchmarks (``experiments/bench_ops.py``, ``bench_proxyv.py``, ``bench_reduction.py``).

* **Paired timing** (:func:`paired`, :func:`paired_decode`): the two variants run interleaved, one
  pair at a time, so that drift in machine load hits both alike; each figure is a median, and the
  ratio is the median of the per-pair ratios (:func:`paired_rounds`: several variants against one
  baseline, a round = the baseline then each variant).
* **Peak memory** (:func:`peak_in_fresh_process`): in a fresh process per variant, the resident-set
  high-water mark (VmHWM, reset through /proc/self/clear_refs) during one call after a warm-up, minus
  the resident set before it (:func:`peak_mib`); glibc is told from the start to serve every buffer
  >= 64 KiB by its own mmap and return it when freed (:func:`mmap_every_buffer`), so the mark follows
  live tensors. That setting slows allocation: a measuring process only measures.
* **Machine** (:func:`set_threads`, :func:`load_note`): torch's thread count, and the load average
  to print beside the figures (a shared machine's figures scatter; say so with them).
* **Models** (:func:`bench_model`, :func:`bench_batch`): random-weight LLaVA / LLaVA-NeXT models
  with a Llama text model of a realistic width and a cheap vision tower, and a one-image prompt.
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import torch

from . import tiny

# ----------------------------------------------------------------------------- machine

def set_threads(threads: int) -> None:
    """Run torch's CPU kernels on ``threads`` threads (1: steadiest on a shared machine)."""
    torch.set_num_threads(threads)


def load_note() -> str:
    """The machine's load average, to print beside measured figures."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min) on {os.cpu_count()} CPUs"


# ----------------------------------------------------------------------------- timing

@dataclass(frozen=True)
class Paired:
    """Medians of interleaved pairs: ``a``, ``b``, and ``ratio`` (the median of the per-pair b / a)."""

    a: float
    b: float
    ratio: float


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn()`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired(measure_a: Callable[[], float], measure_b: Callable[[], float], repeats: int, warmup: int = 1) -> Paired:
    """``repeats`` interleaved (a, b) measurements after ``warmup`` unrecorded pairs."""
    return paired_rounds(measure_a, [measure_b], repeats, warmup)[0]


def prefill(model, batch: Mapping):
    """The prefill of ``generate()``: logits at the last position, the KV cache returned."""
    with torch.no_grad():
        return model(**batch, use_cache=True, logits_to_keep=1)


def prefill_seconds(model, batch: Mapping) -> float:
    """Seconds of one :func:`prefill`."""
    return timed(lambda: prefill(model, batch))


def paired_decode(model_a, model_b, batch: Mapping, steps: int) -> Paired:
    """Seconds of a greedy decode step, each model on its own prefill cache, the models' steps alternating.

    The first step warms up and is not recorded."""
    state = []
    for model in (model_a, model_b):
        out = prefill(model, batch)
        state.append([model, out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), batch["attention_mask"]])
    times: list[list[float]] = [[], []]
    with torch.no_grad():
        for _ in range(steps + 1):
            for i, entry in enumerate(state):
                model, cache, ids, mask = entry
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                start = time.perf_counter()
                out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
                times[i].append(time.perf_counter() - start)
                entry[2:] = [out.logits[:, -1].argmax(-1, keepdim=True), mask]
    a, b = times[0][1:], times[1][1:]
    return Paired(statistics.median(a), statistics.median(b), statistics.median(y / x for x, y in zip(a, b)))


# ----------------------------------------------------------------------------- peak memory

def mmap_every_buffer() -> None:
    """glibc: serve every buffer >= 64 KiB by its own mmap and return it when freed (call before allocating)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 16), libc.mallopt(-1, 1 << 16)  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_mib(fn: Callable[[], object]) -> float:
    """Peak resident-set growth (MiB) while ``fn()`` runs."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - before) / 1024


PEAK_PREFIX = "peak MiB"


def report_peak(fn: Callable[[], object]) -> None:
    """In a measuring process: warm up with ``fn()``, then print its :func:`peak_mib` for the parent."""
    fn()
    print(f"{PEAK_PREFIX} {peak_mib(fn):.1f}", flush=True)


def peak_in_fresh_process(argv: list[str]) -> float:
    """The peak a fresh ``python argv...`` reports with :func:`report_peak`."""
    out = subprocess.run([sys.executable, *argv], check=True, capture_output=True, text=True).stdout
    line = next(line for line in reversed(out.splitlines()) if line.startswith(PEAK_PREFIX))
    return float(line.split()[-1])


# ----------------------------------------------------------------------------- models

def bench_model(kind: str, width: int, layers: int, grid: int, std: float | None = None):
    """Random-weight ``kind`` ("llava" / "llava_next") with a Llama text model of ``width`` (heads of 64,
    FFN 2.6875 x width), ``layers`` layers, grid x grid patches per crop and a cheap vision tower;
    ``std``: re-draw the text model's matrices at that scale (0.02, as HF: finite activations at width)."""
    model = tiny.build_model(
        kind, "llama", image_size=grid * 4, patch_size=4, hidden_size=width, num_layers=layers,
        num_heads=width // 64, intermediate_size=int(width * 2.6875), vision_kwargs={"hidden_size": 32},
    )
    if std is not None:
        with torch.no_grad():
            for p in model.model.language_model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, std)
    return model


def bench_batch(kind: str, grid: int, text: int, crops_per_side: int = 1):
    """One prompt of about ``text`` text tokens and one square random image of ``crops_per_side``²
    crop-sized tiles (LLaVA-NeXT: 2 -> base + 2x2 high-res crops)."""
    import numpy as np
    from PIL import Image

    side = grid * 4
    processor = tiny.build_processor(kind, image_size=side, patch_size=4)
    size = crops_per_side * side
    pixels = np.random.RandomState(0).randint(0, 255, (size, size, 3), dtype=np.uint8)
    prompt = "USER: <image>\n" + "x" * max(text - 20, 1) + " ASSISTANT:"
    return processor(images=[Image.fromarray(pixels)], text=[prompt], return_tensors="pt")


def paired_rounds(measure_a: Callable[[], float], measures_b: list[Callable[[], float]], repeats: int,
                  warmup: int = 1) -> list[Paired]:
    """As :func:`paired` for several b's against one a: each round runs a, then every b in turn
    (``warmup`` rounds unrecorded); per b, the medians and the median of its per-round b / a."""
    for _ in range(warmup):
        measure_a(), [m() for m in measures_b]
    rounds = [(measure_a(), [m() for m in measures_b]) for _ in range(repeats)]
    return [Paired(statistics.median(a for a, _ in rounds), statistics.median(bs[i] for _, bs in rounds),
                   statistics.median(bs[i] / a for a, bs in rounds)) for i in range(len(measures_b))]


# ----------------------------------------------------------------------------- benchmarked variants

@dataclass(frozen=True)
class Setting:
    """One benchmarked variant: ProxyV from layer ``proxyv`` (learned proxies, fresh random parameters) or
    none, with ``ablate(model, method, **where, **params)`` or nothing; ``newline_tokens`` as ablate() takes it."""

    proxyv: int | None = None
    method: str | None = None
    where: Mapping = dataclass_field(default_factory=dict)
    params: Mapping = dataclass_field(default_factory=dict)
    newline_tokens: str = "vision"

    def build(self, base, copy: bool = True):
        """The model it runs on: ``base`` (a deep copy if ``copy``), with ProxyV applied if it has one."""
        import copy as copying

        from .proxyv import apply_proxyv

        model = copying.deepcopy(base) if copy or self.proxyv is not None else base
        return model if self.proxyv is None else apply_proxyv(model, start_layer=self.proxyv, init="learned", seed=0)

    def block(self, model):
        """The context in which ``model`` computes it."""
        import contextlib

        from .ablation import ablate

        if self.method is None:
            return contextlib.nullcontext()
        return ablate(model, self.method, newline_tokens=self.newline_tokens, **self.where, **self.params)

    def flops(self, model, batch) -> tuple[float, float]:
        """Executed and theoretical decoder FLOPs of the prefill of ``batch`` relative to the baseline (a ProxyV
        model's config counts its ProxyV layers under a reduction)."""
        from .flops import PrefillTokens, count_flops
        from .variant import resolve_variant

        layers = model.config.text_config.num_hidden_layers
        tokens = PrefillTokens.from_batch(batch, model.config, newline_tokens=self.newline_tokens)
        if self.method is None:
            settings = model.config.proxyv if self.proxyv is not None else {}
            variant = resolve_variant("proxyv" if settings else "none", layers, start_layer=self.proxyv,
                                      params={k: settings[k] for k in ("reduce_factor", "init") if k in settings})
        else:
            variant = resolve_variant(self.method, layers, **self.where, params=dict(self.params))
        report = count_flops(model.config, tokens, variant)
        return report.total / report.baseline, report.theoretical / report.theoretical_baseline
