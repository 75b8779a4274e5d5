"""Few query rows against a long prompt under an explicit mask: each way torch can compute the attention of the
ablated layers' text rows and of ProxyV's layers, timed and checked against an fp32 reference (analysis/bench_attention.py).

    # one H100 / H200, bf16, the Qwen2.5-VL-7B video shape of experiments/bench_qwen_video.py (8,490-token prompt)
    python experiments/bench_attention.py --config qwen2.5-vl-7b --device cuda --dtype bfloat16 --out result.json
    # CPU smoke test at a toy shape
    python experiments/bench_attention.py --config qwen2.5-vl-7b --prefix 3 --vision 40 --suffix 4 --proxies 6 \
        --repeats 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="qwen2.5-vl-7b", help="a shipped config: its text heads and head width")
    parser.add_argument("--prefix", type=int, default=33, help="text rows before the video")
    parser.add_argument("--vision", type=int, default=8424, help="vision tokens")
    parser.add_argument("--suffix", type=int, default=33, help="text rows after the video")
    parser.add_argument("--proxies", type=int, default=650, help="ProxyV proxy rows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = parser.parse_args(argv)
    for name in ("prefix", "vision", "suffix", "proxies", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")

    import torch

    from analysis.bench_attention import proxyv_rows, run, table, text_rows
    from analysis.flops import load_config

    config = load_config(args.config)
    text = getattr(config, "text_config", config)
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    shapes = [text_rows(args.prefix, args.vision, args.suffix),
              proxyv_rows(args.prefix, args.vision, args.suffix, args.proxies)]
    rows = run(shapes, heads, kv_heads, head_dim, args.device, getattr(torch, args.dtype), args.repeats, args.warmup)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"{args.config}: {heads} query heads, {kv_heads} key heads of {head_dim}; {args.dtype} on {device}; "
          f"torch {torch.__version__}; medians of {args.repeats} calls after {args.warmup}")
    print(table(rows))
    if args.out:
        meta = {"config": args.config, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                "dtype": args.dtype, "device": device, "torch": torch.__version__, "repeats": args.repeats}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
