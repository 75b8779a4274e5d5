"""The runner and the lmms-eval plugin on Qwen-VL (issue 12, item 4): the model configs of the real Instruct
checkpoints (weights from the HF cache only; missing -> the exact ``hf download``), a tiny random-weight
Qwen2.5-VL saved like a hub checkpoint and run by the plugin and by ``experiments/run.py`` (a 2-run sweep through
the synthetic twins: records, FLOPs equal to the analytic count of every evaluated prompt, report; FastV and
PyramidDrop the same way), and the one-line refusal of VisionZip and ProxyV on Qwen-VL. Scores of random weights are
~0: not asserted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import composed_config as _compose

from analysis import tiny_qwen
from analysis.runner import ConfigError
from analysis.runner.spec import prepare

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
QWEN_MODELS = {  # conf/model name -> (hub id, model_type, pixels per LLM token side)
    "qwen2.5-vl-3b": ("Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_5_vl", 28),
    "qwen2.5-vl-7b": ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", 28),
    "qwen3-vl-8b": ("Qwen/Qwen3-VL-8B-Instruct", "qwen3_vl", 32),
}
# The tiny fixture's processor: 8 px per merged token; 4..64 tokens per image (the real configs' bounds are for 28/32 px)
TINY_PIXELS = ("model.min_pixels=256", "model.max_pixels=4096")
TASKS = ("synth_textvqa", "synth_docvqa", "synth_ocrbench", "synth_chartqa")


def run_runner(tmp_path, *args: str, name: str = "tiny-qwen") -> None:
    """`experiments/run.py <args>` on the tiny fixture's settings, into tmp_path/runs/<name>; asserts it exits 0."""
    cmd = [sys.executable, str(REPO / "experiments" / "run.py"), *args, *TINY_PIXELS, f"run.runs_dir={tmp_path / 'runs'}",
           f"run.reports_dir={tmp_path / 'reports'}", f"run.sweep_name={name}", "eval.limit=2", "run.threads=1",
           "run.progress=false", "run.latency_prompts=1", "run.latency_repeats=2", "run.latency_warmup=1"]
    out = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]


def assert_flops_of_evaluated_prompts(record: dict, lm, tasks, n: int) -> None:
    """The record's FLOPs == the mean analytic count of the prompts it evaluated: each task's first ``n`` docs as
    lmms-eval reads them (pictures or clips), encoded by the plugin and counted from the batch itself through the
    FLOPs package's Qwen-VL path (layout, grids, tower, merger; ProxyV's plan from the batch), with the run's own
    (the checkpoint's) config."""
    from analysis.flops import PrefillTokens, count_flops
    from analysis.proxyv import proxyv_shapes
    from analysis.twins import doc_to_visual, eval_docs
    from analysis.twins.tasks.utils import twin_doc_to_text
    from analysis.variant import Variant

    config = lm.model.config
    variant = Variant.from_record(record["variant"])
    reports = []
    for task in tasks:
        for doc in eval_docs(task, n):
            visuals = lm._visuals(doc_to_visual(task), doc)
            batch = lm.encode([lm._prompt(twin_doc_to_text(doc), visuals)], [visuals])
            options = {}
            if variant.family == "proxyv":
                options["shapes"] = proxyv_shapes(config, batch["input_ids"], batch["attention_mask"],
                                                  image_grid_thw=batch.get("image_grid_thw"),
                                                  video_grid_thw=batch.get("video_grid_thw"))
            reports.append(count_flops(config, PrefillTokens.from_batch(batch, config), variant, lm_head="last",
                                       **options))
    for key in ("total", "baseline", "theoretical", "lm_head", "vision"):
        expected = sum(getattr(r, key) for r in reports) / len(reports)
        assert record["flops"][key] == pytest.approx(expected, rel=1e-12), key
    assert record["flops"]["vision"] > 0 and set(record["flops"]["vision_parts"]) >= {"tower", "merger"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_qwen.save_checkpoint(tmp_path_factory.mktemp("qwen") / "tiny-qwen2.5-vl", "qwen2_5_vl", seed=0)


# ----------------------------------------------------------------------------- configs

@pytest.mark.parametrize("name", sorted(QWEN_MODELS))
def test_qwen_model_configs(name, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from analysis.flops.configs import load_config

    hub_id, model_type, factor = QWEN_MODELS[name]
    model = _compose(f"model={name}")["model"]
    assert model["pretrained"] == model["hub_id"] == hub_id and model["how_to_get"] == f"hf download {hub_id}"
    assert model["attn_implementation"] in ("sdpa", "eager") and model["download_gb"] > 0
    assert model["min_pixels"] == 256 * factor**2 and model["max_pixels"] == 1280 * factor**2
    shipped = load_config(model["flops_config"])  # the shipped FLOPs config describes the same checkpoint
    assert shipped.model_type == model_type
    assert shipped.vision_config.patch_size * shipped.vision_config.spatial_merge_size == factor
    # weights are never downloaded: an empty HF cache -> one line with the exact command and the size
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError) as error:
        prepare(_compose(f"model={name}", "op=skip_ffn", "start_layer=4", f"run.runs_dir={tmp_path}"))
    message = str(error.value)
    assert "\n" not in message and f"get them with: hf download {hub_id} (~{model['download_gb']} GB)" in message


@pytest.mark.parametrize("name", sorted(QWEN_MODELS))
def test_hub_ids_load_from_the_local_hf_cache(name, tmp_path, monkeypatch):
    """A real Instruct config finds its weights in the HF cache offline (what `hf download <hub id>` leaves): a
    snapshot of that repo, laid out as huggingface_hub writes it, holding a tiny checkpoint of the same class."""
    from huggingface_hub import constants

    hub_id, model_type, _ = QWEN_MODELS[name]
    repo = tmp_path / "hub" / ("models--" + hub_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tiny_qwen.save_checkpoint(repo / "snapshots" / commit, model_type, seed=0)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = prepare(_compose(f"model={name}", "op=skip_ffn", "start_layer=1", f"run.runs_dir={tmp_path / 'runs'}",
                            *TINY_PIXELS))
    assert spec.model.path == str(snapshot) and spec.num_layers == 3
    assert spec.variant.label == "skip_ffn L1–3"


@pytest.mark.parametrize("op, message", [
    ("visionzip", ("op=visionzip is not supported on Qwen-VL models (qwen2_5_vl): VisionZip picks dominant tokens by "
                   "the CLS token's attention and the Qwen-VL vision towers have no CLS token; use op=fastv or op=pdrop")),
    ("proxyv", "model qwen2.5-vl-3b has no trained proxyv checkpoint for start_layer=1 (listed in model.proxyv: none)"),
])
def test_visionzip_and_untrained_proxyv_refused_on_qwen(op, message, checkpoint, tmp_path):
    with pytest.raises(ConfigError) as error:
        prepare(_compose("model=qwen2.5-vl-3b", f"model.pretrained={checkpoint}", f"op={op}", "start_layer=1",
                         f"run.runs_dir={tmp_path}"))
    assert "\n" not in str(error.value) and message in str(error.value)


def test_token_reduction_is_prepared_on_qwen(checkpoint, tmp_path):
    """FastV and PyramidDrop run on Qwen-VL; PyramidDrop with positions='original' (M-RoPE: kept rows keep their own
    positions), which replaces the op group's LLaVA default 'renumber'."""
    common = ("model=qwen2.5-vl-3b", f"model.pretrained={checkpoint}", f"run.runs_dir={tmp_path}", *TINY_PIXELS)
    fastv = prepare(_compose(*common, "op=fastv", "start_layer=1"))
    assert fastv.variant.label == "fastv L1–3 (keep=0.5)"
    pdrop = prepare(_compose(*common, "op=pdrop", "op.layers=[1,2]"))
    assert pdrop.variant.layers == (1, 2) and pdrop.variant.options["positions"] == "original"
    assert pdrop.cfg["op"]["positions"] == "original"  # the record's config says what ran


def test_visionzip_on_qwen_is_one_line_from_the_command_line(checkpoint, tmp_path):
    cmd = [sys.executable, str(REPO / "experiments" / "run.py"), "model=qwen2.5-vl-3b", "op=visionzip",
           f"model.pretrained={checkpoint}", f"run.runs_dir={tmp_path / 'runs'}"]
    out = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert out.returncode != 0 and "Traceback" not in out.stdout + out.stderr
    assert lines == [("error: model qwen2.5-vl-3b: op=visionzip is not supported on Qwen-VL models (qwen2_5_vl): "
                      "VisionZip picks dominant tokens by the CLS token's attention and the Qwen-VL vision towers have "
                      "no CLS token; use op=fastv or op=pdrop")], lines
    assert not list((tmp_path / "runs").rglob("result.json"))


def test_operator_runs_are_prepared_with_the_pixel_bounds_in_their_identity(checkpoint, tmp_path):
    spec = prepare(_compose("model=qwen2.5-vl-3b", f"model.pretrained={checkpoint}", "op=skip_attn", "start_layer=1",
                            f"run.runs_dir={tmp_path}", *TINY_PIXELS))
    assert spec.num_layers == 3 and spec.variant.layers == (1, 2)
    other = prepare(_compose("model=qwen2.5-vl-3b", f"model.pretrained={checkpoint}", "op=skip_attn", "start_layer=1",
                             f"run.runs_dir={tmp_path}", "model.min_pixels=256", "model.max_pixels=1024"))
    assert spec.key != other.key  # other image sizes -> other vision tokens -> another result


@pytest.mark.parametrize("eval_name", ["lmms", "lmms_video"])
def test_real_task_names_are_lmms_evals(eval_name):
    """The real-benchmark eval configs (eval=lmms: the paper's four; eval=lmms_video: Video-MME for Qwen-VL) name
    tasks lmms-eval 0.7.3 indexes, each with a metric its task yaml (or the template it includes) declares."""
    from lmms_eval.tasks import TaskManager

    conf = _compose(f"eval={eval_name}")["eval"]
    index = TaskManager(verbosity="ERROR").task_index
    for task, metric in conf["tasks"].items():
        assert task in index, task
        path = Path(index[task]["yaml_path"])
        text = path.read_text()
        included = re.search(r"^include:\s*(\S+)", text, re.M)
        if included:
            text += (path.parent / included.group(1)).read_text()
        assert f"metric: {metric}" in text, (task, metric)
    assert conf["include_defaults"] is True and conf["include_path"] is None


# ----------------------------------------------------------------------------- the plugin

CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
           "qwen3_vl": "Qwen3VLForConditionalGeneration"}


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_plugin_loads_a_qwen_checkpoint_and_answers(kind, checkpoint, tmp_path):
    import numpy as np
    from PIL import Image

    from analysis.lmms_model import LlavaAblate

    path = checkpoint if kind == "qwen2_5_vl" else tiny_qwen.save_checkpoint(tmp_path / kind, kind, seed=0)
    lm = LlavaAblate(str(path), op="skip_ffn", start_layer=1, batch_size=2, progress=False, max_new_tokens=5,
                     min_pixels=256, max_pixels=1024)
    assert lm.qwen and type(lm.model).__name__ == CLASSES[kind]
    images = [[Image.fromarray(np.random.RandomState(s).randint(0, 255, (h, w, 3), dtype=np.uint8))]
              for s, h, w in ((0, 64, 96), (1, 120, 40))]
    prompt = lm._prompt("What is written here?", images[0])
    assert prompt == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is written here?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    prompts = [prompt, lm._prompt("Hi", images[1])]
    batched = lm._generate(prompts, images, {"until": ["\n\n"]})  # left-padded batch of two image sizes
    alone = [lm._generate([p], [ims], {"until": ["\n\n"]})[0] for p, ims in zip(prompts, images)]
    assert batched == alone and all(isinstance(a, str) for a in batched)
    grids = [shape["vision_grids"] for shape in lm.prompt_shapes[:2]]
    assert all(4 * 16 <= t * h * w * 16 <= 1024 for ((t, h, w),) in grids)  # within max_pixels: <= 16 tokens
    assert [s["vision"] for s in lm.prompt_shapes[:2]] == [t * h * w // 4 for ((t, h, w),) in grids]
    with pytest.raises(ValueError, match="^op=visionzip is not supported on Qwen-VL models"):
        lm.set_variant("visionzip", start_layer=1)
    with pytest.raises(ValueError, match="^op=proxyv runs a trained ProxyV checkpoint; .* is not one"):
        lm.set_variant("proxyv", start_layer=1)
    assert lm.variant.method == "skip_ffn"  # a refused variant leaves the current one
    with pytest.raises(ValueError, match="^op=pdrop positions=renumber on a Qwen-VL model: M-RoPE"):
        lm.set_variant("pdrop", layers=[1, 2], positions="renumber")
    assert lm.set_variant("pdrop", layers="1;2").options["positions"] == "original"
    lm.set_variant("fastv", start_layer=1, keep=0.5)  # token reduction runs: a padded batch equals each alone
    batched = lm._generate(prompts, images, {"until": ["\n\n"]})
    assert batched == [lm._generate([p], [ims], {"until": ["\n\n"]})[0] for p, ims in zip(prompts, images)]


def test_prompt_shapes_without_generating_equal_an_evaluations(checkpoint):
    """eval_bridge.twin_prompt_shapes (what experiments/match_flops.py counts: no generation) records, for a picture
    twin and the video twin, the shapes an evaluation of the same docs records while generating."""
    from analysis import twins
    from analysis.eval_bridge import twin_prompt_shapes
    from analysis.lmms_model import LlavaAblate

    lm = LlavaAblate(str(checkpoint), progress=False, batch_size=1, max_new_tokens=1, min_pixels=256, max_pixels=4096)
    tasks = ["synth_ocrbench", "synth_video"]
    lm.task_dict = {task: {"eval": twins.eval_docs(task, 2)} for task in tasks}
    requests = [Request(doc["question"], {"max_new_tokens": 1}, twins.doc_to_visual(task), i, task, "eval")
                for task in tasks for i, doc in enumerate(lm.task_dict[task]["eval"])]
    lm.generate_until(requests)
    evaluated = sorted(lm.prompt_shapes, key=lambda shape: shape["mask"])
    counted = sorted(twin_prompt_shapes(lm, tasks, 2), key=lambda shape: shape["mask"])
    assert len(counted) == 4 and counted == evaluated
    assert sorted(shape["vision_grids"][0][0] > 1 for shape in counted) == [False, False, True, True]  # 2 clips


class Request:  # what lmms-eval hands a simple model: an object with .args
    def __init__(self, *args):
        self.args = args


# ----------------------------------------------------------------------------- the runner, end to end

@pytest.mark.slow
def test_runner_sweep_on_tiny_qwen(checkpoint, tmp_path):
    """`experiments/run.py -m model=qwen2.5-vl-3b model.pretrained=<tiny> op=none,skip_ffn,fastv start_layer=1`, then
    `op=pdrop op.layers=[1,2]` into the same runs: a baseline, an operator, FastV and PyramidDrop through the four
    synthetic twins (2 samples each), records, FLOPs, report."""
    from analysis.lmms_model import LlavaAblate

    common = ["model=qwen2.5-vl-3b", f"model.pretrained={checkpoint}"]
    run_runner(tmp_path, "-m", "op=none,skip_ffn,fastv", "start_layer=1", *common)
    run_runner(tmp_path, "-m", "op=pdrop", "op.layers=[1,2]", *common)
    paths = sorted((tmp_path / "runs" / "tiny-qwen").glob("*/result.json"))
    records = {p.parent: json.loads(p.read_text()) for p in paths}
    labels = sorted(r["variant"]["label"] for r in records.values())
    assert labels == ["fastv L1–3 (keep=0.5)", "none", "pdrop L1–3 (keep=0.5, positions=original)",
                      "skip_ffn L1–3"], labels
    lm = LlavaAblate(str(checkpoint), progress=False, min_pixels=256, max_pixels=4096)
    for run_dir, record in records.items():
        assert record["status"] == "ok" and record["model"] == "qwen2.5-vl-3b" and record["num_layers"] == 3
        assert record["n_samples"] == 8 and record["n_per_task"] == dict.fromkeys(TASKS, 2)
        assert set(record["scores"]) == set(TASKS) and record["latency_ms"] > 0
        samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 8 and {s["task"] for s in samples} == set(TASKS)
        assert_flops_of_evaluated_prompts(record, lm, TASKS, 2)
        assert (record["flops"]["reduction"] > 0) == (record["op"] != "none")
    report = (tmp_path / "reports" / "tiny-qwen" / "report.md").read_text()
    assert "skip_ffn" in report and "fastv L1–3 (keep=0.5)" in report and "pdrop L1–3 (keep=0.5, positions=original)" in report


def save_proxyv_checkpoint(checkpoint: Path, path: Path) -> Path:
    """A ProxyV Qwen2.5-VL checkpoint of the tiny fixture (spatial proxies from layer 1, f = 2) with its processor."""
    from transformers import AutoProcessor

    from analysis.proxyv import apply_proxyv

    apply_proxyv(tiny_qwen.build_model("qwen2_5_vl", seed=0), 1, 2, seed=0).save_pretrained(path)
    AutoProcessor.from_pretrained(checkpoint).save_pretrained(path)
    return path


@pytest.mark.slow
def test_runner_on_a_tiny_qwen_proxyv_checkpoint(checkpoint, tmp_path):
    """A ProxyV Qwen2.5-VL checkpoint through `experiments/run.py model.pretrained=<tiny> +model.proxyv={1: <it>}
    op=proxyv start_layer=1`: a record whose FLOPs equal the analytic count of every evaluated prompt (ProxyV's
    shapes from the batch's own plan)."""
    from analysis.lmms_model import LlavaAblate

    path = save_proxyv_checkpoint(checkpoint, tmp_path / "tiny-qwen-proxyv")
    run_runner(tmp_path, "model=qwen2.5-vl-3b", f"model.pretrained={checkpoint}", f"+model.proxyv={{1:'{path}'}}",
               "op=proxyv", "start_layer=1", "op.reduce_factor=2", name="tiny-qwen-proxyv")
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "tiny-qwen-proxyv").glob("*/result.json")]
    assert record["status"] == "ok" and record["variant"]["family"] == "proxyv" and record["n_samples"] == 8
    assert_flops_of_evaluated_prompts(record, LlavaAblate(str(path), progress=False, min_pixels=256, max_pixels=4096),
                                      TASKS, 2)


@pytest.mark.slow
def test_runner_fastv_on_a_tiny_learned_qwen_proxyv_checkpoint(checkpoint, tmp_path):
    """`experiments/run.py ... +model.proxyv={2: <learned checkpoint>} op=fastv start_layer=1 op.proxyv=2`: FastV on
    the ProxyV checkpoint's layers; a record whose FLOPs equal the analytic count of every evaluated prompt (the
    ProxyV config counts its layers on the block alive at its start layer)."""
    from transformers import AutoProcessor

    from analysis.lmms_model import LlavaAblate
    from analysis.proxyv import apply_proxyv

    path = tmp_path / "tiny-qwen-proxyv-learned"
    apply_proxyv(tiny_qwen.build_model("qwen2_5_vl", seed=0), 2, 2, init="learned", learned_proxies=3,
                 seed=0).save_pretrained(path)
    AutoProcessor.from_pretrained(checkpoint).save_pretrained(path)
    run_runner(tmp_path, "model=qwen2.5-vl-3b", f"model.pretrained={checkpoint}", f"+model.proxyv={{2:'{path}'}}",
               "op=fastv", "start_layer=1", "op.proxyv=2", name="tiny-qwen-proxyv-fastv")
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "tiny-qwen-proxyv-fastv").glob("*/result.json")]
    assert record["status"] == "ok" and record["variant"]["method"] == "fastv" and record["n_samples"] == 8
    assert record["flops"]["total"] < record["flops"]["baseline"]
    assert_flops_of_evaluated_prompts(record, LlavaAblate(str(path), progress=False, min_pixels=256, max_pixels=4096),
                                      TASKS, 2)


@pytest.mark.slow
def test_runner_on_the_video_twin(checkpoint, tmp_path):
    """Video through the runner: `eval=synthetic_video` (synth_video's .mp4 clips, decoded and sampled by the plugin)
    with the baseline, an operator, FastV and PyramidDrop, and a ProxyV checkpoint (proxies per temporal block):
    records with n = 2, every sample a video prompt, FLOPs equal to the analytic count of every evaluated clip (the
    tower on (t, h, w) grids with t = the clip's blocks), and the report."""
    from analysis.lmms_model import LlavaAblate
    from analysis.twins import doc_to_visual, eval_docs

    common = ["model=qwen2.5-vl-3b", f"model.pretrained={checkpoint}", "eval=synthetic_video"]
    run_runner(tmp_path, "-m", "op=none,skip_attn_ffn,fastv", "start_layer=1", *common, name="video")
    run_runner(tmp_path, "-m", "op=pdrop", "op.layers=[1,2]", *common, name="video")
    path = save_proxyv_checkpoint(checkpoint, tmp_path / "tiny-qwen-proxyv")
    run_runner(tmp_path, *common, f"+model.proxyv={{1:'{path}'}}", "op=proxyv", "start_layer=1", "op.reduce_factor=2",
               name="video")
    records = {p.parent: json.loads(p.read_text()) for p in (tmp_path / "runs" / "video").glob("*/result.json")}
    assert sorted(r["variant"]["method"] for r in records.values()) == ["fastv", "none", "pdrop", "proxyv",
                                                                      "skip_attn_ffn"]
    base = LlavaAblate(str(checkpoint), progress=False, min_pixels=256, max_pixels=4096)
    proxyv = LlavaAblate(str(path), progress=False, min_pixels=256, max_pixels=4096)
    for run_dir, record in records.items():
        assert record["status"] == "ok" and record["n_per_task"] == {"synth_video": 2}
        assert set(record["scores"]) == {"synth_video"}
        samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 2 and {s["task"] for s in samples} == {"synth_video"}
        lm = proxyv if record["variant"]["family"] == "proxyv" else base
        assert_flops_of_evaluated_prompts(record, lm, ["synth_video"], 2)
    for doc in eval_docs("synth_video", 2):  # every frame of a 2 fps clip sampled: one temporal block per character
        (video,) = base._visuals(doc_to_visual("synth_video"), doc)
        assert len(video.frames) == 2 * len(doc["answer"]) and video.indices == tuple(range(len(video.frames)))
        batch = base.encode([base._prompt(doc["question"], [video])], [[video]])
        assert batch["video_grid_thw"].tolist() == [[len(doc["answer"]), 16, 16]]  # 64 px frames, 4 px patches
    report = (tmp_path / "reports" / "video" / "report.md").read_text()
    assert "synth_video" in report and "proxyv" in report


@pytest.mark.slow
def test_lmms_eval_cli_on_qwen3_vl(tmp_path):
    """lmms-eval's own CLI with the plugin on a saved Qwen3-VL fixture (pixel bounds as model_args); op=visionzip on
    it is the one-line SystemExit that ends the CLI."""
    from analysis import twins
    from analysis.lmms_model import LlavaAblate

    path = tiny_qwen.save_checkpoint(tmp_path / "ckpt", "qwen3_vl", seed=0)
    twins.ensure_eval_data(["synth_video"])
    cli = [str(Path(sys.executable).with_name("lmms-eval")), "--model", "llava_ablate", "--tasks",
           "synth_ocrbench,synth_video", "--include_path", str(twins.TASKS_DIR), "--batch_size", "2", "--log_samples"]
    args = f"pretrained={path},op=skip_attn,start_layer=1,min_pixels=256,max_pixels=4096,fps=2,max_num_frames=8"
    out = subprocess.run([*cli, "--model_args", args, "--limit", "3", "--output_path", str(tmp_path / "out")],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    (result,) = (tmp_path / "out").rglob("*_results.json")
    results = json.loads(result.read_text())["results"]
    assert "ocrbench_accuracy,none" in results["synth_ocrbench"] and "exact_match,none" in results["synth_video"]
    for task in ("synth_ocrbench", "synth_video"):  # a picture task and a video task (Qwen3-VL: timestamped blocks)
        (samples,) = (tmp_path / "out").rglob(f"*_samples_{task}.jsonl")
        assert len(samples.read_text().splitlines()) == 3
    # a refused op: the one line the CLI prints (LlavaAblate.create_from_arg_string is what the CLI calls), in process
    with pytest.raises(SystemExit, match="^llava_ablate: op=visionzip is not supported on Qwen-VL models") as error:
        LlavaAblate.create_from_arg_string(f"pretrained={path},op=visionzip")
    assert "\n" not in str(error.value)


def test_plugin_runs_token_reduction_on_a_learned_qwen_proxyv_checkpoint(checkpoint, tmp_path):
    """op=fastv / op=pdrop on a saved tiny ProxyV Qwen2.5-VL checkpoint (learned proxies from layer 2): the reduction
    runs on its ProxyV layers (tests/test_proxyv_reduction_qwen.py); a padded batch answers as each prompt alone; the
    FLOPs of the recorded prompts count ProxyV's layers (they differ from the plain checkpoint's)."""
    import numpy as np
    from PIL import Image
    from transformers import AutoConfig, AutoProcessor

    from analysis.lmms_model import LlavaAblate
    from analysis.proxyv import apply_proxyv
    from analysis.runner.counting import run_flops
    from analysis.variant import resolve_variant

    path = tmp_path / "tiny-qwen-proxyv-learned"
    apply_proxyv(tiny_qwen.build_model("qwen2_5_vl", seed=0), 2, 2, init="learned", learned_proxies=3,
                 seed=0).save_pretrained(path)
    AutoProcessor.from_pretrained(checkpoint).save_pretrained(path)
    lm = LlavaAblate(str(path), op="fastv", start_layer=1, keep=0.5, batch_size=2, progress=False, max_new_tokens=5,
                     min_pixels=256, max_pixels=1024)
    assert lm.variant.method == "fastv" and lm.variant.options["proxyv"] == 2
    images = [[Image.fromarray(np.random.RandomState(s).randint(0, 255, (h, w, 3), dtype=np.uint8))]
              for s, h, w in ((0, 64, 96), (1, 120, 40))]
    prompts = [lm._prompt("What is written here?", images[0]), lm._prompt("Hi", images[1])]
    for op, where in (("fastv", {"start_layer": 1, "keep": 0.5}), ("pdrop", {"layers": "1;2", "keep": 0.6})):
        lm.set_variant(op, **where)
        lm.prompt_shapes.clear()
        batched = lm._generate(prompts, images, {"until": ["\n\n"]})
        assert batched == [lm._generate([p], [ims], {"until": ["\n\n"]})[0] for p, ims in zip(prompts, images)]
        on_proxyv = run_flops(lm.model.config, lm.prompt_shapes, lm.variant)
        layers = {"start_layer": 1} if op == "fastv" else {"layers": [1, 2]}
        plain = run_flops(AutoConfig.from_pretrained(checkpoint), lm.prompt_shapes,
                          resolve_variant(op, 3, **layers, params={"keep": where["keep"]}))
        assert on_proxyv["baseline"] == plain["baseline"] and on_proxyv["total"] != plain["total"]
    with pytest.raises(ValueError, match="ProxyV checkpoint starting at layer 2, not proxyv=1"):
        lm.set_variant("fastv", start_layer=1, keep=0.5, proxyv=1)
