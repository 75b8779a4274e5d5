"""experiments/train.py across processes and interruptions, on the tiny model (CPU):

* 2 processes (``torchrun --nproc_per_node 2``: DDP over gloo) at per-device batch 2 follow the same trajectory as
  1 process at batch 4: the same samples per step, the same losses and the same trained weights, within float
  tolerance (different padding per batch, different reduction order);
* a run killed after a checkpoint and started again resumes from it and ends where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
COMMON = ("model=tiny", "variant=proxyv", "start_layer=16", "proxyv.init=learned", "data.twins_per_task=3",
          "train.logging_steps=1", "train.warmup=0", "train.lr_scheduler_type=constant")


def command(out: Path, *overrides: str, processes: int = 1) -> list[str]:
    script = [str(ROOT / "experiments" / "train.py"), *COMMON, f"train.output_dir={out}", *overrides]
    if processes == 1:
        return [sys.executable, *script]
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # torchrun, as accelerate's multi-GPU launcher does; its --cpu mode runs several processes only under MPI
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(port), *script]


def run(cmd: list[str]) -> dict:
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((Path(cmd[cmd.index(next(a for a in cmd if a.startswith("train.output_dir=")))]
                            .split("=", 1)[1]) / "model" / "training.json").read_text())


def losses(record: dict) -> list[float]:
    return [entry["loss"] for entry in record["log"] if "loss" in entry]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "model.safetensors")


def test_two_processes_equal_one_process_at_the_same_global_batch(tmp_path):
    one = run(command(tmp_path / "one", "train.max_steps=3", "train.per_device_train_batch_size=4"))
    two = run(command(tmp_path / "two", "train.max_steps=3", "train.per_device_train_batch_size=2", processes=2))
    assert (one["world_size"], one["global_batch"]) == (1, 4)
    assert (two["world_size"], two["global_batch"]) == (2, 4)
    assert len(losses(one)) == len(losses(two)) == 3
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(one)), rtol=1e-5, atol=1e-6)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    moved = 0
    base = load_file(ROOT / "checkpoints" / "tiny-llava" / "model.safetensors")
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
        moved += name in base and not torch.equal(tensor.float(), base[name].float())
    assert moved > 0  # the runs trained: the comparison is not between two untouched models


def test_a_killed_run_resumes_where_it_stopped(tmp_path):
    steps = ("train.max_steps=6", "train.save_steps=2", "train.per_device_train_batch_size=2")
    straight = run(command(tmp_path / "straight", *steps))

    out = tmp_path / "killed"
    first = subprocess.Popen(command(out, *steps), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    saved = out / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    deadline = time.time() + 300
    while not saved.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    first.kill()
    first.wait()
    assert saved.exists() and not (out / "model").exists(), "the run was to be killed after its first checkpoint"
    # what a kill during a save leaves: a newer checkpoint without its trainer_state.json, to be passed over
    (out / "checkpoints" / "checkpoint-5").mkdir()

    resumed = run(command(out, *steps))
    step = int(Path(resumed["resumed_from"]).name.split("-")[1])
    assert step in (2, 4)
    assert len(losses(resumed)) == 6
    torch.testing.assert_close(torch.tensor(losses(resumed)), torch.tensor(losses(straight)), rtol=1e-5, atol=1e-6)
    for name, tensor in weights(tmp_path / "straight").items():
        torch.testing.assert_close(weights(out)[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
