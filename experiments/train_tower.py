"""Stage A of the embedded tiny LLaVA (transformers' Trainer): the CLIP tower learns each patch's glyph, then a
fresh tiny LLaVA around it is saved as the start of stage B. The whole base model, as shipped in
checkpoints/tiny-llava:

    python experiments/train_tower.py --out runs/train/base
    python experiments/train.py +recipe=tiny_base model.pretrained=runs/train/base/init train.output_dir=runs/train/base

Logic: analysis/training/tower.py. Re-running resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="stage-A checkpoints in OUT/tower, the stage-B start in OUT/init")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=0, help="data-loader processes")
    args = p.parse_args()
    from analysis.training.tower import train_tower

    init = train_tower(Path(args.out), args.steps, args.batch, args.lr, args.seed, args.threads, args.workers)
    print(f"saved {init}")


if __name__ == "__main__":
    main()
