"""Long-video prefill on a Qwen-VL shape: ProxyV and the skip operators, time saved against FLOPs saved, peak memory.

A random-weight Qwen2.5-VL / Qwen2-VL / Qwen3-VL model of a shipped config (analysis/configs; the real tower and
decoder shapes), one prompt: text, one video of ``--blocks`` temporal blocks of ``--side`` x ``--side`` patches
(merged 2x2: blocks * (side/2)^2 vision tokens), text. Qwen3-VL's video is laid out as its processor writes it:
per block a timestamp (6 ordinary tokens, analysis.bench_qwen.STAMP_TOKENS), <|vision_start|>, the block,
<|vision_end|>. Each variant runs the whole prefill (tower included, the LM head on the last row, as generate()'s
prefill does) in rounds -- the baseline, then every variant -- so drift hits all alike; a figure is the median over
rounds, a ratio the median of per-round ratios. FLOPs are the analytic counts (exact against torch's counter on
tiny models of these classes). ``time saved / FLOPs saved`` near 1 means the variant turns its FLOPs saving into
wall-clock time. Peak memory: the largest allocation above the weights during the call (CUDA), per variant. The row
"skip_attn_ffn-L<start> HF norm" is a control: skip_attn_ffn with every input norm through HF's module
(analysis.frozen_rows disabled), so that the frozen-row norm cache's saving is timed in the same rounds; the rows
"... SDPA GQA" (sdpa only) are skip_attn_ffn and ProxyV with their explicit-mask attention on SDPA's own GQA instead
of repeated key / value heads (the same values and FLOPs; experiments/bench_attention.py times that call alone).

    # one H100 / H200, bf16: Qwen2.5-VL-7B shape, 26 blocks of 36 x 36 patches = 8,424 vision tokens
    python experiments/bench_qwen_video.py --config qwen2.5-vl-7b --blocks 26 --side 36 --device cuda \
        --dtype bfloat16 --out docs/results/bench_qwen_video/qwen2.5-vl-7b.json
    # Qwen3-VL-8B shape, 26 blocks of 36 x 36 patches (16 px) = 8,424 vision tokens; start layer 18 of 36
    python experiments/bench_qwen_video.py --config qwen3-vl-8b --blocks 26 --side 36 --device cuda \
        --dtype bfloat16 --out docs/results/bench_qwen_video/qwen3-vl-8b.json
    # CPU smoke tests at a toy shape (Qwen3-VL: start at or after its 3 DeepStack layers)
    python experiments/bench_qwen_video.py --config qwen2.5-vl-7b --layers 2 --width 256 --vision-depth 1 \
        --blocks 2 --side 8 --repeats 1
    python experiments/bench_qwen_video.py --config qwen3-vl-8b --layers 4 --width 256 --vision-depth 3 \
        --blocks 2 --side 8 --repeats 1 --start-layer 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis.bench_qwen import run, table


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
    parser.add_argument("--vision-attn", default=None, choices=["sdpa", "eager", "flash_attention_2"],
                        help="the tower's own attention backend (default: --attn); flash_attention_2 needs flash-attn")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--profile", type=Path,
                        help="write torch.profiler tables of the decoder (one prefill per variant) here")
    args = parser.parse_args()
    try:
        meta, rows = run(args)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    print(table(meta, rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
