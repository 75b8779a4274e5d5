"""Train the embedded default tiny LLaVA on the synthetic twins (CPU, resumable).

Reproduces the shipped checkpoint:
    .venv/bin/python experiments/train_tiny.py --out checkpoints/tiny-llava
ProxyV variants, fine-tuned from it (see README, "ProxyV on the tiny model"):
    .venv/bin/python experiments/train_tiny.py --proxyv-start 12 --init-from checkpoints/tiny-llava \
        --out checkpoints/tiny-llava-proxyv-L12 --work runs/train_proxyv_L12 --steps 400 --lr 3e-4
Re-running the same command resumes from --work after an interruption.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis.proxyv import apply_proxyv  # noqa: E402
from analysis.training import evaluate as ev  # noqa: E402
from analysis.training.stages import initial_model, reduction_context, ship_checkpoint, train_llava  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="checkpoints/tiny-llava")
    p.add_argument("--work", default="runs/train_tiny", help="checkpoints and logs while training")
    p.add_argument("--tower-steps", type=int, default=600)
    p.add_argument("--tower-batch", type=int, default=64)
    p.add_argument("--tower-lr", type=float, default=2e-3)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-n", type=int, default=40, help="eval samples per twin during training")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--init-from", help="start from this checkpoint (skips stage A; stage B fine-tunes it)")
    p.add_argument("--proxyv-start", type=int, help="train a ProxyV model from this decoder layer on")
    p.add_argument("--proxyv-init", default="spatial", choices=["spatial", "learned", "none"])
    p.add_argument("--proxyv-reduce", type=int, default=4)
    p.add_argument("--with-reduction", metavar="OP:K=V,...", help="train and evaluate under a token reduction, "
                   "e.g. 'pdrop:layers=8/16,keep=0.7211' or 'fastv:start_layer=2,keep=0.6251'")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    started = time.time()

    model, processor = initial_model(args.init_from, work / "tower", args.tower_steps, args.tower_batch,
                                     args.tower_lr, args.seed)
    if args.proxyv_start is not None:
        apply_proxyv(model, start_layer=args.proxyv_start, reduce_factor=args.proxyv_reduce, init=args.proxyv_init,
                     seed=args.seed)
    context = reduction_context(model, args.with_reduction)
    model = train_llava(model, processor, work / "llava", args.steps, args.batch, args.lr, args.seed,
                        evaluate=lambda m: ev.score_twins(m, processor, n=args.eval_n), eval_every=args.eval_every,
                        context=context)

    with (context or contextlib.nullcontext)():
        final = {"scores": ev.score_twins(model, processor)}
    if args.proxyv_start is None:  # the blind check is about the base model reading the image at all
        final["blind"] = ev.score_twins(model, processor, blind=True)
    record = {"command": " ".join(sys.argv), "args": vars(args), "seed": args.seed, "wall_s": time.time() - started,
              "torch": torch.__version__, "python": platform.python_version(), **final}
    ship_checkpoint(model, processor, work, out, record)
    print(json.dumps(final, indent=2))


if __name__ == "__main__":
    main()
