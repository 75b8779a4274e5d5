"""Training-step check at LLaVA-1.5-7B shape (random weights): the baseline, then ProxyV-L12 on the same weights,
a few steps each through the Trainer path of experiments/train.py, bf16 autocast and gradient checkpointing.
Prints tokens/s, peak GPU memory and ProxyV's step time over the baseline's (medians after warm-up).

    python experiments/gpu_train_check.py                              # stage-1 groups (LLM frozen), one GPU
    python experiments/gpu_train_check.py --groups stage2 --batch 4    # LLM trained too (~120 GB: an H200)
    python experiments/gpu_train_check.py --deepspeed conf/deepspeed/zero3.json
    python experiments/gpu_train_check.py --tiny --batch 2 --steps 2   # CPU smoke test of the same code

Logic: analysis/training/step_check.py. Measured figures: docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="llava-1.5-7b", help="a name in analysis/configs (llava-v1.6-vicuna-7b: "
                   "LLaVA-NeXT, a 2x2-crop image, 2,928 vision tokens) or a config.json path")
    p.add_argument("--tiny", action="store_true", help="narrow widths (same classes, same token counts)")
    p.add_argument("--layers", type=int, help="override the number of decoder layers")
    p.add_argument("--start-layer", type=int, default=12)
    p.add_argument("--init", default="spatial", choices=["spatial", "learned", "none"])
    p.add_argument("--groups", default="stage1", choices=["stage1", "stage2"],
                   help="stage1: ProxyV + projector train (LLM frozen); stage2: the LLM too")
    p.add_argument("--batch", type=int, default=16, help="per device (official stage 1 at 7B: 16)")
    p.add_argument("--text", type=int, default=96, help="text tokens after the image")
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--no-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--deepspeed", help="a DeepSpeed JSON (one process: the env of a 1-process launch is set); "
                   "use with --variants proxyv (a ZeRO-3-partitioned baseline cannot be converted afterwards)")
    p.add_argument("--variants", default="baseline,proxyv", type=lambda s: s.split(","))
    p.add_argument("--out-dir", default="runs/gpu_train_check")
    p.add_argument("--json", help="also write the results here")
    opts = p.parse_args()
    if opts.deepspeed:
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511", "RANK": "0", "LOCAL_RANK": "0",
                           "WORLD_SIZE": "1"}.items():
            os.environ.setdefault(key, value)
    from analysis.training.step_check import check

    try:
        results = check(opts)
    except (FileNotFoundError, ValueError, TypeError) as error:
        sys.exit(f"error: {error}")
    text = json.dumps(results, indent=2)
    print(text)
    if opts.json:
        Path(opts.json).write_text(text)


if __name__ == "__main__":
    main()
