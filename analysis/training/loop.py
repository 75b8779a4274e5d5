"""A small resumable training loop: AdamW, warmup + cosine, clipping, JSONL log, tqdm, checkpoints."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm


def cosine_lr(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Multiplier of the base learning rate: linear warmup, cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """Runs ``loss_fn(step) -> (loss, metrics)`` for ``total`` steps; resumes from ``out/state.pt``."""

    def __init__(self, out: Path, params: list[dict], total: int, warmup: int, clip: float = 1.0,
                 save_every: int = 200, log_every: int = 20):
        self.out, self.total, self.warmup, self.clip = Path(out), total, warmup, clip
        self.save_every, self.log_every = save_every, log_every
        self.out.mkdir(parents=True, exist_ok=True)
        self.optimizer = torch.optim.AdamW(params, betas=(0.9, 0.98), weight_decay=0.01)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.step = 0

    @property
    def state_path(self) -> Path:
        return self.out / "state.pt"

    def resume(self, modules: dict[str, torch.nn.Module]) -> bool:
        if not self.state_path.exists():
            return False
        state = torch.load(self.state_path, weights_only=False)
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        torch.set_rng_state(state["rng"])
        return True

    def save(self, modules: dict[str, torch.nn.Module]) -> None:
        state = {"modules": {n: m.state_dict() for n, m in modules.items()}, "optimizer": self.optimizer.state_dict(),
                 "step": self.step, "rng": torch.get_rng_state()}
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.state_path)

    def log(self, record: dict) -> None:
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def run(self, loss_fn, modules: dict[str, torch.nn.Module], params_to_clip, evaluate=None, eval_every=0,
            desc="train"):
        bar = tqdm(total=self.total, initial=self.step, desc=desc, dynamic_ncols=True)
        start, done = time.time(), 0
        while self.step < self.total:
            factor = cosine_lr(self.step, self.total, self.warmup)
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * factor
            loss, metrics = loss_fn(self.step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params_to_clip, self.clip)
            self.optimizer.step()
            self.step += 1
            done += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if self.step % self.log_every == 0 or self.step == self.total:
                self.log({"step": self.step, "loss": loss.item(), "grad_norm": float(norm),
                          "lr_factor": factor, "steps_per_s": done / (time.time() - start), **metrics})
            if evaluate and eval_every and (self.step % eval_every == 0 or self.step == self.total):
                self.log({"step": self.step, "eval": evaluate()})
            if self.step % self.save_every == 0 or self.step == self.total:
                self.save(modules)
        bar.close()
