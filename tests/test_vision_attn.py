"""The vision tower on its own attention backend (``vision_attn_implementation``), the decoder on eager / sdpa:
what transformers' per-sub-config ``attn_implementation`` allows, so that Qwen2.5-VL's windowed tower can run
flash_attention_2 on a GPU (one varlen call per block instead of one call per window under sdpa) while the
operators, token reduction and ProxyV keep their explicit-mask decoder. On this CPU the tower runs eager against
an sdpa decoder: the split is real (each part reads its own backend), the results equal the one-backend model's,
and every way it cannot run is one line, in the library, the plugin and the runner."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import composed_config as _compose
from PIL import Image

from analysis import ablate, tiny_qwen
from analysis.models import attn_implementations
from analysis.runner import ConfigError
from analysis.runner.spec import prepare

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_qwen.save_checkpoint(tmp_path_factory.mktemp("qwen") / "tiny-qwen2.5-vl", "qwen2_5_vl", seed=0)


def test_the_backend_map():
    assert attn_implementations("sdpa") == "sdpa" == attn_implementations("sdpa", "sdpa")
    assert attn_implementations("sdpa", "eager") == {"": "sdpa", "text_config": "sdpa", "vision_config": "eager"}
    with pytest.raises(ValueError, match=r"^vision_attn_implementation='flex' is not one of eager, sdpa, "
                                         r"flash_attention_2$"):
        attn_implementations("sdpa", "flex")


def test_flash_attention_needs_its_package_and_a_gpu(monkeypatch):
    real = importlib.util.find_spec

    def installed(yes: bool):
        return lambda name, *args: (object() if yes else None) if name == "flash_attn" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", installed(False))
    with pytest.raises(ValueError, match=r"^vision_attn_implementation='flash_attention_2' needs the flash-attn "
                                         r"package; install it on a CUDA machine with: .venv/bin/pip install -c "
                                         r"constraints.txt '\.\[gpu\]'$"):
        attn_implementations("sdpa", "flash_attention_2", "cuda")
    monkeypatch.setattr(importlib.util, "find_spec", installed(True))
    with pytest.raises(ValueError, match=r"^vision_attn_implementation='flash_attention_2' runs on a CUDA GPU, "
                                         r"not on cpu$"):
        attn_implementations("sdpa", "flash_attention_2", "cpu")
    assert attn_implementations("sdpa", "flash_attention_2", "cuda")["vision_config"] == "flash_attention_2"


def test_a_tower_on_its_own_backend_gives_the_same_results(checkpoint, monkeypatch):
    """load_llava with the tower on eager: the tower's attention runs eager (one call per window), the decoder's
    sdpa; logits with and without an operator equal those of the all-sdpa model (max |delta| <= 1e-5, fp32)."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

    from analysis.lmms_model import load_llava

    eager_calls = []
    eager = modeling_qwen2_5_vl.eager_attention_forward
    monkeypatch.setattr(modeling_qwen2_5_vl, "eager_attention_forward",
                        lambda module, *a, **k: eager_calls.append(type(module).__name__) or eager(module, *a, **k))

    both, processor = load_llava(checkpoint, "cpu", "float32", "sdpa")
    split, _ = load_llava(checkpoint, "cpu", "float32", "sdpa", vision_attn_implementation="eager")
    assert split.config.vision_config._attn_implementation == "eager"
    assert split.config.text_config._attn_implementation == "sdpa"
    assert split.model.visual.blocks[0].attn.config._attn_implementation == "eager"
    assert split.model.language_model.layers[0].self_attn.config._attn_implementation == "sdpa"
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 96, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
        reference = both(**batch).logits
        assert eager_calls == []
        torch.testing.assert_close(split(**batch).logits, reference, atol=1e-5, rtol=0)
        assert eager_calls and set(eager_calls) == {"Qwen2_5_VLVisionAttention"}  # the tower only
        with ablate(split, "skip_attn_ffn", start_layer=1):
            ablated = split(**batch).logits
        with ablate(both, "skip_attn_ffn", start_layer=1):
            torch.testing.assert_close(ablated, both(**batch).logits, atol=1e-5, rtol=0)


def test_the_runner_keeps_the_tower_backend_in_the_identity(checkpoint, tmp_path):
    """Set, it is part of the run's identity (another tower backend, other numerics: another record); unset, the
    hash is what it was before the key existed. A value that cannot run is one ConfigError line, before any work."""
    common = ("model=qwen2.5-vl-3b", f"model.pretrained={checkpoint}", "op=skip_attn", "start_layer=1",
              f"run.runs_dir={tmp_path}", "run.device=cpu", "model.min_pixels=256", "model.max_pixels=4096")
    plain = prepare(_compose(*common))
    eager = prepare(_compose(*common, "model.vision_attn_implementation=eager"))
    assert "vision_attn_implementation" not in plain.model.identity
    assert eager.model.identity["vision_attn_implementation"] == "eager" and eager.key != plain.key
    without_key = _compose(*common)
    del without_key["model"]["vision_attn_implementation"]
    assert prepare(without_key).key == plain.key
    assert prepare(_compose(*common, "model.vision_attn_implementation=sdpa")).key == plain.key  # = the decoder's
    with pytest.raises(ConfigError, match=r"^model qwen2.5-vl-3b: vision_attn_implementation='flex' is not one of "):
        prepare(_compose(*common, "model.vision_attn_implementation=flex"))


def test_the_plugin_refuses_a_bad_tower_backend_in_one_line(checkpoint):
    """lmms-eval's command line: a bad model_args value ends the process with one line and a non-zero exit."""
    code = ("from analysis.lmms_model import LlavaAblate\n"
            f"LlavaAblate.create_from_arg_string('pretrained={checkpoint},device=cpu,vision_attn_implementation=flex')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == ("llava_ablate: vision_attn_implementation='flex' is not one of "
                                                   "eager, sdpa, flash_attention_2")
