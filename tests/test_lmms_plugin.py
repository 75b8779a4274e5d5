"""Our lmms-eval model class (``--model llava_ablate``): registration through the entry point, the
CLI on a synthetic twin (one process, and data-parallel under torchrun), batched generation equal
to one-by-one, the variant applied and removed, clean() keeping the model, device placement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis import tiny, twins
from conftest import image
from analysis.lmms_model import LlavaAblate, pick_device
from analysis.variant import Variant, resolve_variant

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def _tiny(num_layers: int = 4):
    model = tiny.build_model("llava", "llama", image_size=64, patch_size=8, num_layers=num_layers, hidden_size=32,
                             num_heads=2, intermediate_size=64)
    return model, tiny.build_processor("llava", image_size=64, patch_size=8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt")
    for part in _tiny(num_layers=16):
        part.save_pretrained(path)
    return path


class Request:  # what lmms-eval hands a simple model: an object with .args
    def __init__(self, *args):
        self.args = args


def _requests(lm, n: int = 5):
    docs = twins.generate("synth_docvqa", "eval", n, seed=0)
    lm.task_dict = {"synth_docvqa": {"eval": docs}}
    gen = {"max_new_tokens": 6, "temperature": 0, "do_sample": False, "until": ["\n\n"]}
    # prompts of different lengths, so a batch is left-padded
    return [Request(d["question"] + " please" * (i % 3), dict(gen), lambda doc: [doc["image"]], i, "synth_docvqa",
                    "eval") for i, d in enumerate(docs)]


@pytest.fixture(scope="module")
def lm():
    model, processor = _tiny()
    return LlavaAblate(model=model, processor=processor, batch_size=3, progress=False)


def test_entry_point_registers_the_class():
    (ep,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "llava_ablate"]
    (manifest,) = ep.load()()
    assert manifest.model_id == "llava_ablate" and manifest.simple_class_path == "analysis.lmms_model.LlavaAblate"
    from lmms_eval.models import get_model

    assert get_model("llava_ablate") is LlavaAblate


def test_batched_equals_one_by_one_and_variant_is_scoped(lm):
    answers = {}
    for op, start in (("none", None), ("skip_ffn", 1)):
        lm.set_variant(op, start_layer=start)
        lm.batch_size_per_gpu = 3
        answers[op] = lm.generate_until(_requests(lm))
        layouts = list(lm.prompt_shapes)
        lm.batch_size_per_gpu = 1
        assert lm.generate_until(_requests(lm)) == answers[op], op
        assert len(layouts) == 5 and all(lay["mask"].count("v") == 64 and lay["vision"] == 64 for lay in layouts)
    lm.batch_size_per_gpu = 3
    lm.set_variant("skip_attn_ffn", start_layer=0)
    assert lm.generate_until(_requests(lm)) != answers["none"]  # the op changes a random model's answers ...
    assert not any("forward" in vars(layer) for layer in lm.model.model.language_model.layers)  # ... only inside
    lm.set_variant("none")
    assert lm.generate_until(_requests(lm)) == answers["none"]


def test_clean_keeps_the_model_and_latency(lm):
    lm.set_variant("skip_ffn", start_layer=2)
    lm.generate_until(_requests(lm, 2))
    lm.clean()  # lmms-eval calls this after every evaluation; the default would delete the model
    assert isinstance(lm.model, torch.nn.Module) and lm.generate_until(_requests(lm, 1))
    latency = lm.prefill_latency(prompts=1, repeats=3, warmup=1)
    assert latency["n"] == 3 and 0 < latency["min_ms"] <= latency["q1_ms"] <= latency["median_ms"] <= latency["q3_ms"]
    assert latency["q3_ms"] <= latency["max_ms"] and latency["threads"] == 1 and latency["cpus"] >= 1
    assert latency["device"] == "cpu"  # where the timings ran: the report compares only timings taken alike


def test_variant_validation_and_blind(lm):
    with pytest.raises(ValueError, match="unknown op 'skip'; known ops: drop_v2t, fastv, mask_v2v, none"):
        lm.set_variant("skip")
    with pytest.raises(ValueError, match="start_layer=4 is out of range: the model has 4 decoder layers"):
        lm.set_variant("skip_ffn", start_layer=4)
    assert lm.set_variant("skip_ffn", layers="1 3") == Variant("ablation", "skip_ffn", (1, 3))
    assert lm.set_variant("none", start_layer=3) == Variant("ablation", "none", ())
    assert lm.set_variant(resolve_variant("mask_v2v", 4, start_layer=2)).label == "mask_v2v L2–4"
    lm.set_variant("none", blind=True)
    doc = twins.generate("synth_ocrbench", "eval", 1, seed=0)[0]
    (image,) = lm._visuals(lambda d: [d["image"]], doc)
    pixels = np.asarray(image)
    assert image.size == doc["image"].size and (pixels == pixels[0, 0]).all()  # one colour: nothing to read
    lm.set_variant("none")


def test_method_parameters_are_model_args():
    """A token-reduction method takes its parameters as model_args (keep=...), batched like the ops."""
    model, processor = _tiny()
    lm = LlavaAblate(model=model, processor=processor, batch_size=3, progress=False, op="fastv", start_layer=1,
                     keep=0.5)
    assert lm.variant.label == "fastv L1–4 (keep=0.5)"
    batched = lm.generate_until(_requests(lm))
    lm.batch_size_per_gpu = 1
    assert lm.generate_until(_requests(lm)) == batched  # each sample ranks its own tokens
    assert all(shape["mask"].count("v") == 64 for shape in lm.prompt_shapes)
    with pytest.raises(TypeError, match=r"unknown model_args \['kep'\] \(op=fastv takes keep, proxyv\)"):
        LlavaAblate(model=model, processor=processor, op="fastv", start_layer=1, kep=0.5)
    with pytest.raises(TypeError, match=r"unknown model_args \['keep'\]$"):
        LlavaAblate(model=model, processor=processor, op="skip_ffn", start_layer=1, keep=0.5)


@pytest.mark.parametrize("init", ["spatial", "none"])
def test_proxyv_checkpoint_loads_with_its_modules(tmp_path, init):
    from analysis.proxyv import apply_proxyv

    model, processor = _tiny()
    apply_proxyv(model, start_layer=2, reduce_factor=2, init=init, seed=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    in_memory = LlavaAblate(model=model, processor=processor, batch_size=3, progress=False)
    loaded = LlavaAblate(str(tmp_path), batch_size=3, progress=False, device="cpu")
    assert hasattr(loaded.model.model, "proxyv")
    assert loaded.generate_until(_requests(loaded)) == in_memory.generate_until(_requests(in_memory))


def test_token_reduction_on_a_learned_proxyv_checkpoint(tmp_path):
    """op=fastv on a ProxyV checkpoint is the reduction on its ProxyV layers; its FLOPs count them."""
    from analysis.flops import mean_flops
    from analysis.proxyv import apply_proxyv

    model, processor = _tiny()
    apply_proxyv(model, start_layer=2, reduce_factor=2, init="learned", seed=0)
    lm = LlavaAblate(model=model, processor=processor, batch_size=3, progress=False, op="fastv", start_layer=1,
                     keep=0.5)
    assert lm.variant.label == "fastv L1–4 (keep=0.5, proxyv=2)" and lm.variant.options["proxyv"] == 2
    lm.generate_until(_requests(lm))
    on_proxyv = mean_flops(model.config, lm.prompt_shapes, lm.variant)
    plain = mean_flops(_tiny()[0].config, lm.prompt_shapes, resolve_variant("fastv", 4, start_layer=1,
                                                                             params={"keep": 0.5}))
    assert on_proxyv["baseline"] == plain["baseline"] and on_proxyv["total"] != plain["total"]
    with pytest.raises(ValueError, match="ProxyV checkpoint starting at layer 2, not proxyv=3"):
        lm.set_variant("fastv", start_layer=1, keep=0.5, proxyv=3)


def test_device_per_process(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pick_device("auto") == torch.device("cuda:1") and pick_device(None) == torch.device("cuda:1")
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")


def _results(out: Path) -> tuple[dict, list[dict]]:
    (result,) = out.rglob("*_results.json")
    (samples,) = out.rglob("*_samples_synth_ocrbench.jsonl")
    return json.loads(result.read_text()), [json.loads(line) for line in samples.read_text().splitlines()]


CLI_ARGS = ["--tasks", "synth_ocrbench", "--include_path", str(twins.TASKS_DIR), "--batch_size", "2", "--log_samples"]


@pytest.mark.slow
def test_lmms_eval_cli_on_a_twin(checkpoint, tmp_path):
    cli = Path(sys.executable).with_name("lmms-eval")
    args = f"pretrained={checkpoint},op=skip_ffn,start_layer=12"
    out = subprocess.run([str(cli), "--model", "llava_ablate", "--model_args", args, *CLI_ARGS,
                          "--limit", "4", "--output_path", str(tmp_path / "out")], cwd=tmp_path, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result, samples = _results(tmp_path / "out")
    assert result["config"]["model_args"] == args and "ocrbench_accuracy,none" in result["results"]["synth_ocrbench"]
    assert len(samples) == 4


@pytest.mark.slow
def test_lmms_eval_cli_bad_model_args_is_one_line_and_fails(checkpoint, tmp_path):
    cli = Path(sys.executable).with_name("lmms-eval")
    for args, message in ((f"pretrained={checkpoint},op=bogus", "llava_ablate: unknown op 'bogus'; known ops: "),
                          (f"pretrained={checkpoint},op=skip_ffn,start_layer=16",
                           "llava_ablate: start_layer=16 is out of range: the model has 16 decoder layers"),
                          (f"pretrained={tmp_path / 'missing'}", "llava_ablate: ")):
        out = subprocess.run([str(cli), "--model", "llava_ablate", "--model_args", args, *CLI_ARGS, "--limit", "1",
                              "--output_path", str(tmp_path / "out")], cwd=tmp_path, env=ENV, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode != 0, out.stderr[-2000:]
        assert "Traceback" not in out.stderr and out.stderr.strip().splitlines()[-1].startswith(message), out.stderr


@pytest.mark.slow
def test_lmms_eval_cli_refuses_a_video_task_on_llava_in_one_line(checkpoint, tmp_path):
    """A LLaVA checkpoint on a video task (synth_video hands the model .mp4 paths): one line and a non-zero exit,
    not lmms-eval's traceback and exit 0."""
    twins.ensure_eval_data(["synth_video"])
    cli = Path(sys.executable).with_name("lmms-eval")
    out = subprocess.run([str(cli), "--model", "llava_ablate", "--model_args", f"pretrained={checkpoint}", "--tasks",
                          "synth_video", "--include_path", str(twins.TASKS_DIR), "--limit", "1",
                          "--output_path", str(tmp_path / "out")], cwd=tmp_path, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out.stderr and last.startswith("llava_ablate: this task gives videos (") and \
        last.endswith("llava checkpoints take images only (videos run on Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints)")


@pytest.mark.slow
def test_data_parallel_under_torchrun(checkpoint, tmp_path):
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lmms_eval",
                          "--model", "llava_ablate", "--model_args", f"pretrained={checkpoint},op=drop_v2t,start_layer=4",
                          *CLI_ARGS, "--limit", "5", "--output_path", str(tmp_path / "out")], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result, samples = _results(tmp_path / "out")
    assert result["n-samples"]["synth_ocrbench"]["effective"] == 5
    assert sorted(s["doc_id"] for s in samples) == [0, 1, 2, 3, 4]  # both ranks' docs gathered on rank 0


def test_flops_of_a_llava_next_proxyv_checkpoint(tmp_path):
    """The runner's FLOPs path (layouts recorded per sample -> mean_flops) on LLaVA-NeXT ProxyV: newline
    tokens are text to ProxyV and unpadded AnyRes crops are not square, so it needs the recorded shapes;
    one sample's count equals torch's FlopCounterMode on the model's forward."""
    from analysis.flops import mean_flops
    from analysis.flops.measure import _module_names, _split, torch_flop_counter
    from analysis.proxyv import apply_proxyv

    grid = {"image_size": 32, "patch_size": 4}
    model = tiny.build_model("llava_next", "llama", seed=1, num_layers=4, hidden_size=32, num_heads=2,
                             intermediate_size=64, **grid)
    apply_proxyv(model, start_layer=2, reduce_factor=2, init="spatial", seed=0)
    model.save_pretrained(tmp_path)
    tiny.build_processor("llava_next", **grid).save_pretrained(tmp_path)
    lm = LlavaAblate(str(tmp_path), batch_size=3, progress=False, device="cpu")
    config = lm.model.config
    variant = lm.set_variant("none")  # a ProxyV checkpoint is its own variant
    assert (variant.family, variant.layers, variant.options["reduce_factor"]) == ("proxyv", (2, 3), 2)
    # non-square images (unpadded AnyRes crops, fewer cells than square grids), two images in one sample
    docs = [{"images": [image(0, 32, 48)]}, {"images": [image(2, 40, 40), image(3, 20, 70)]},
            {"images": [image(1, 64, 40)]}]
    lm.task_dict = {"t": {"eval": docs}}
    gen = {"max_new_tokens": 2, "temperature": 0, "do_sample": False}
    requests = [Request("Describe" + " it" * i, dict(gen), lambda doc: doc["images"], i, "t", "eval")
                for i in range(3)]
    lm.generate_until(requests)  # one left-padded batch
    layouts = list(lm.prompt_shapes)
    assert len(layouts) == 3 and all(lay["proxyv_shapes"] is not None for lay in layouts)
    # unpadded AnyRes crops: fewer cells than the crops' square grids imply
    assert any(lay["mask"].count("v") < sum(r * c for r, c in lay["crop_shapes"]) for lay in layouts)
    assert all(lay["newline"] > 0 and lay["mask"].count("v") == lay["vision"] - lay["newline"]
               == sum(lay["proxyv_shapes"].sample_vision) for lay in layouts)  # newline tokens are text
    flops = mean_flops(config, layouts, variant)
    assert flops["reduction"] > 0 and flops["theoretical_reduction"] > 0

    # one sample alone, unpadded: the recorded count is what torch counts on the forward
    request = requests[1]
    context, _, visual, doc_id, task, split = request.args
    images = lm._visuals(visual, lm.task_dict[task][split][doc_id])
    lm.prompt_shapes.clear()
    batch = lm.encode([lm._prompt(context, images)], [images])
    lm._record_prompt_shapes(batch)
    one = mean_flops(config, list(lm.prompt_shapes), variant)
    counter = torch_flop_counter()
    with torch.no_grad(), counter:
        lm.model(**batch, use_cache=False)
    counts = {name: sum(by_op.values()) for name, by_op in counter.get_flop_counts().items()}
    split = _split(counts, _module_names(lm.model, f"{type(lm.model).__name__}."), counter.get_total_flops(), "flops")
    assert one["total"] == split.decoder
