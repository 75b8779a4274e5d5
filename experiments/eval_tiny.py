"""Score a LLaVA checkpoint on the twins' eval splits directly (greedy), optionally blind.

    .venv/bin/python experiments/eval_tiny.py checkpoints/tiny-llava [--n 200] [--blind] [--record]
    .venv/bin/python experiments/eval_tiny.py checkpoints/tiny-llava --op skip_attn --start-layer 12   # training-free

A ProxyV checkpoint loads with its modules; one fine-tuned under an op or a token reduction (its
``training.json`` says) is scored under it. ``--blind`` replaces every image with a blank one; ``--record`` stores the scores
in the checkpoint's ``training.json`` under ``eval_n<N>`` / ``blind_n<N>`` (the test suite checks
the shipped checkpoint against ``eval_n24``). The runner scores through lmms-eval (``eval.blind=true``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis.training.evaluate import load_checkpoint, score_twins, trained_context  # noqa: E402
from analysis.training.run import twin_names  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", default="checkpoints/tiny-llava")
    p.add_argument("--n", type=int, default=200, help="eval samples per twin")
    p.add_argument("--blind", action="store_true")
    p.add_argument("--record", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--op", help="score under this ablation op, training-free (e.g. skip_attn)")
    p.add_argument("--start-layer", type=int, default=12, help="with --op: its first layer")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = load_checkpoint(args.checkpoint)
    path = Path(args.checkpoint) / "training.json"
    record = json.loads(path.read_text()) if path.exists() else None
    context = trained_context(model, record) if record else None
    names = twin_names(record["config"]) if record else None  # the twins it was trained on (NeXT: the 128 px ones)
    if args.op:
        from analysis.ablation import ablate

        context = lambda: ablate(model, args.op, start_layer=args.start_layer)  # noqa: E731
    scores = score_twins(model, processor, n=args.n, blind=args.blind, names=names,
                         **({"context": context} if context else {}))
    print(json.dumps(scores, indent=2))
    if args.record and not args.op:
        record = json.loads(path.read_text())
        record[f"{'blind' if args.blind else 'eval'}_n{args.n}"] = scores
        path.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
