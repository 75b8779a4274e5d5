"""experiments/train.py (pinned entry): a ProxyV run and an op fine-tuning save loadable checkpoints; a re-run
resumes from the Trainer's last checkpoint; bad input is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def train(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(ROOT / "experiments" / "train.py"), "model=tiny", f"train.output_dir={out}",
            "train.per_device_train_batch_size=2", "data.twins_per_task=1", "train.logging_steps=1", *overrides]
    return subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, check=False)


def test_proxyv_run_saves_a_checkpoint_and_resumes(tmp_path):
    from analysis.proxyv import load_proxyv

    out = tmp_path / "pv"
    first = train(out, "variant=proxyv", "start_layer=16", "proxyv.init=learned", "train.max_steps=2",
                  "train.save_steps=1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    second = train(out, "variant=proxyv", "start_layer=16", "proxyv.init=learned", "train.max_steps=3",
                   "train.save_steps=1")
    assert second.returncode == 0, second.stderr[-3000:]
    record = json.loads((out / "model" / "training.json").read_text())
    assert record["resumed_from"].endswith("checkpoint-2")
    steps = [entry["step"] for entry in record["log"] if "loss" in entry]
    assert steps == [1, 2, 3] and (out / "checkpoints" / "checkpoint-3").is_dir()  # steps 1-2 restored, 3 new
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert [e["loss"] for e in state["log_history"] if "loss" in e] == \
        [e["loss"] for e in record["log"] if "loss" in e][:2]
    model = load_proxyv(out / "model")
    assert model.config.proxyv["start_layer"] == 16 and model.config.proxyv["init"] == "learned"


def test_op_fine_tuning_saves_a_plain_checkpoint(tmp_path):
    from transformers import LlavaForConditionalGeneration

    out = tmp_path / "op"
    done = train(out, "variant=skip_attn", "start_layer=16", "train.max_steps=1", "train.warmup=0")
    assert done.returncode == 0, done.stderr[-3000:]
    model = LlavaForConditionalGeneration.from_pretrained(out / "model")
    assert not hasattr(model.config, "proxyv")
    base = LlavaForConditionalGeneration.from_pretrained(ROOT / "checkpoints" / "tiny-llava")
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p.float(), base.state_dict()[n].float())]
    assert changed and not any("vision_tower" in n for n in changed)


@pytest.mark.parametrize("overrides, message", [
    (("variant=skip_everything",), "error: unknown op 'skip_everything'"),
    (("data.json=/nonexistent/train.json",), "error: "),
])
def test_bad_input_is_one_line(tmp_path, overrides, message):
    done = train(tmp_path / "bad", "train.max_steps=1", *overrides)
    assert done.returncode != 0 and done.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in done.stderr


def test_reduction_training_half_precision_save_and_continuing_a_proxyv_checkpoint(tmp_path):
    from safetensors import safe_open

    from analysis.proxyv import load_proxyv

    out = tmp_path / "pdrop"
    done = train(out, "variant=proxyv", "start_layer=16", "proxyv.init=learned", "train.max_steps=2",
                 "reduction={method:pdrop,layers:[8,16],keep:0.7}", "train.save_dtype=float16", "eval_twins=1")
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "model" / "training.json").read_text())
    assert record["config"]["reduction"]["method"] == "pdrop" and set(record["scores"]) >= {"mean"}
    assert "reduction={method:pdrop,layers:[8,16],keep:0.7}" in record["overrides"]
    with safe_open(out / "model" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118
    assert next(load_proxyv(out / "model", dtype=torch.float32).parameters()).dtype == torch.float32

    # stage 2: the ProxyV checkpoint as the model continues as ProxyV; other settings are one line
    again = train(tmp_path / "stage2", f"model.pretrained={out / 'model'}", "variant=proxyv", "start_layer=16",
                  "proxyv.init=learned", "train.max_steps=1")
    assert again.returncode == 0, again.stderr[-3000:]
    wrong = train(tmp_path / "wrong", f"model.pretrained={out / 'model'}", "variant=proxyv", "start_layer=12",
                  "train.max_steps=1")
    assert wrong.returncode != 0 and wrong.stderr.strip().splitlines()[-1].startswith(
        "error: the model is a ProxyV checkpoint with {'start_layer': 16")


def test_an_op_with_a_reduction_is_one_line(tmp_path):
    done = train(tmp_path / "bad", "variant=skip_attn", "reduction={method:fastv,start_layer:2,keep:0.5}",
                 "train.max_steps=1")
    assert done.returncode != 0 and "do not combine" in done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr
