"""The runner's configs and bookkeeping, in process and fast: every config in conf/ composes, bad
configs give one-line errors, and run_one records, skips, retries and reuses the baseline as
documented. The evaluation itself is replaced by a stub here; test_runner_e2e.py runs real sweeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf

from analysis import flops, results, runner, sweep, tiny
from analysis.eval_bridge import Scores, agreement
from analysis.runner import ConfigError, job


def _compose(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(sweep.CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


@pytest.fixture(scope="module")
def config_only(tmp_path_factory) -> Path:
    """A checkpoint directory with only a config.json (32 layers, like the tiny default): enough for prepare()."""
    path = tmp_path_factory.mktemp("ckpt")
    tiny.build_config("llava", "llama", image_size=64, patch_size=8, num_layers=32).save_pretrained(path)
    return path


def _cfg(tmp: Path, ckpt: Path, *overrides: str):
    return _compose(f"model.pretrained={ckpt}", f"run.runs_dir={tmp / 'runs'}", "eval.limit=3", *overrides)


# ----------------------------------------------------------------------------- configs

@pytest.mark.filterwarnings("ignore:(?s).*validated against ConfigStore schema")  # on purpose, see experiments/run.py
@pytest.mark.parametrize("group", ["model", "op", "eval", "hydra/launcher"])
def test_every_config_composes(group):
    choices = sweep.group_choices(group)
    assert choices, group
    for choice in choices:
        cfg = _compose(f"{group}={choice}", hydra=True)
        if group == "hydra/launcher":
            assert get_class(cfg.hydra.launcher._target_)  # the launcher class imports
            continue
        plain = OmegaConf.to_container(cfg)
        plain.pop("hydra")
        plain = OmegaConf.to_container(OmegaConf.create(plain), resolve=True)  # every interpolation resolves
        node = plain[group]
        assert node["name"] == choice, f"{group}={choice}: name should be {choice!r}"
        if group == "model":
            assert {"pretrained", "hub_id", "how_to_get", "batch_size", "dtype"} <= set(node)
        if group == "eval":
            assert isinstance(node["tasks"], dict) and {"limit", "blind", "include_path"} <= set(node)


def test_op_group_is_the_variant_registry():
    from analysis.ops import OPERATORS
    from analysis.variant import methods

    assert set(sweep.group_choices("op")) == set(methods()) == {*OPERATORS, "proxyv", "fastv", "pdrop", "visionzip"}
    assert _compose("op=proxyv").op == {"name": "proxyv", "reduce_factor": None, "init": None, "light_width": None}
    assert not list((sweep.CONF_DIR / "op").glob("*.yaml"))  # registered once, in analysis/families.py


def test_default_sweep_is_ops_by_layers_plus_trained_proxyv():
    cfg = _compose(hydra=True)
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.model.name == "tiny"
    grids = cfg.hydra.sweeper.grids
    assert set(grids[0].op.split(",")) == {"mask_v2v", "skip_attn", "skip_ffn", "skip_attn_ffn", "drop_v2t"}
    assert grids[1].op == "proxyv" and grids[1].start_layer == "trained"


def test_ad_hoc_sweeps_get_their_own_folder():
    assert sweep.sweep_tag([]) == "" and sweep.sweep_tag(["run.threads=1", "hydra/launcher=submitit_local"]) == ""
    assert sweep.sweep_tag(["model=llava-1.5-7b", "eval=lmms"]) == ""  # already in the folder's name
    assert sweep.sweep_tag(["-m", "op=skip_ffn", "start_layer=8,12,16"]) == "-op=skip_ffn-start_layer=8,12,16"
    assert sweep.sweep_tag(["eval.limit=10"]) == "-eval.limit=10"
    long = sweep.sweep_tag(["-m", "op=" + ",".join(["skip_ffn"] * 20)])
    assert len(long) <= 70 and long == sweep.sweep_tag(["-m", "op=" + ",".join(["skip_ffn"] * 20)])
    cfg = _compose("run.sweep_tag='-op=skip_ffn'")
    assert cfg.run.sweep_name == "tiny-synthetic-op=skip_ffn"
    assert sweep.hydra_argv(["-m", "op=fastv,pdrop", "op.keep=0.5"]) == \
        ["-m", "op=fastv,pdrop", "++op.keep=0.5", "run.sweep_tag='-op=fastv,pdrop-op.keep=0.5'"]
    assert sweep.hydra_argv(["run.sweep_name=mine", "op=fastv"]) == ["run.sweep_name=mine", "op=fastv"]
    assert sweep.hydra_argv([]) == []


def test_unknown_group_option_is_one_line():
    for argv, expected in ((["-m", "op=skip_ffn,skip_fn"], "unknown op 'skip_fn'; known: drop_v2t"),
                           (["model=llava-9b"], "unknown model 'llava-9b'; known: llava-1.5-13b"),
                           (["eval=lmm"], "unknown eval 'lmm'"),
                           (["hydra/launcher=slurm"], "unknown launcher 'slurm'; known: basic, submitit_local")):
        with pytest.raises(ConfigError, match=expected) as info:
            sweep.check_overrides(argv)
        assert "\n" not in str(info.value)
    sweep.check_overrides(["-m", "op=skip_ffn,drop_v2t", "start_layer=8,12", "model.pretrained=/x"])


def test_bad_configs_are_one_line_errors(tmp_path, config_only, monkeypatch):
    cases = [
        (("start_layer=32",), r"start_layer=32 is out of range: the model has 32 decoder layers \(valid 0..31\)"),
        (("start_layer=2", "end_layer=2"), "end_layer=2 must be in 3..32"),
        (("start_layer=abc",), "start_layer must be an integer or null, got 'abc'"),
        (("eval.limit=0",), "eval.limit must be a positive integer"),
        (("op=skip_ffn", "+op.keep=0.5"), r"op 'skip_ffn' takes no parameter\(s\) \['keep'\]"),
        (("model.pretrained=/nonexistent/dir",), "weights not found"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            runner.prepare(_cfg(tmp_path, config_only, *overrides))
        assert "\n" not in str(info.value)
    # A real checkpoint that is neither a directory nor in the HF cache: the error says how to get it.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError) as info:
        runner.prepare(_compose("model=llava-1.5-7b"))
    assert str(info.value) == (
        "model llava-1.5-7b: weights not found (no directory 'llava-hf/llava-1.5-7b-hf' and "
        "llava-hf/llava-1.5-7b-hf is not in the HF cache); get them with: hf download llava-hf/llava-1.5-7b-hf "
        "(~14 GB), or set model.pretrained=/path/to/checkpoint")


def test_token_reduction_variants_from_the_config(tmp_path, config_only):
    """The next family registered in one place (analysis/families.py) reaches the runner with nothing else."""
    fastv = runner.prepare(_cfg(tmp_path, config_only, "op=fastv", "start_layer=2", "op.keep=0.25")).variant
    assert (fastv.family, fastv.layers, fastv.options, fastv.label) == \
        ("reduction", tuple(range(2, 32)), {"keep": 0.25}, "fastv L2–32 (keep=0.25)")
    pdrop = runner.prepare(_cfg(tmp_path, config_only, "op=pdrop")).variant  # start_layer (16) is not its axis
    assert pdrop.layers == (8, 16, 24) and pdrop.options == {"keep": 0.5, "positions": "renumber"}
    custom = runner.prepare(_cfg(tmp_path, config_only, "op=pdrop", "op.layers=[4,12]", "op.positions=original"))
    assert custom.variant.label == "pdrop L4,12 (keep=0.5, positions=original)"
    for overrides, message in ((("op=fastv", "op.keep=1.5"), r"fastv: keep must be in \(0, 1\]"),
                               (("op=fastv", "start_layer=0"), "fastv: start_layer must be in 1..31"),
                               (("op=pdrop", "op.layers=[16,8]"), "boundaries must be strictly increasing"),
                               (("op=visionzip", "op.dominant=0"), "visionzip: dominant must be an integer >= 1, got 0"),
                               (("op=visionzip", "op.dominant=61", "op.contextual=4"),
                                "visionzip: dominant \\+ contextual = 65 exceeds the 64 image tokens per image")):
        with pytest.raises(ConfigError, match=message) as info:
            runner.prepare(_cfg(tmp_path, config_only, *overrides))
        assert "\n" not in str(info.value)
    # VisionZip is counted (FLOPs of the tower's extras and the shortened prefill): prepare() accepts it
    zipped = runner.prepare(_cfg(tmp_path, config_only, "op=visionzip", "op.dominant=6", "op.contextual=2")).variant
    assert (zipped.family, zipped.method, zipped.layers) == ("reduction", "visionzip", ())
    assert zipped.options == {"dominant": 6, "contextual": 2}
    assert runner.prepare(_cfg(tmp_path, config_only, "op=visionzip")).variant.options == {"dominant": 54,
                                                                                        "contextual": 10}


# ----------------------------------------------------------------------------- bookkeeping

class FakeLM:
    def __init__(self, config):
        self.model = type("M", (), {"config": config})()


class Stub:
    """Replaces the eval bridge's score_variant: answers 'a' everywhere except where the variant differs."""

    def __init__(self):
        self.calls = []
        self.fail = False

    def __call__(self, spec, session, variant):
        baseline = variant.is_baseline
        self.calls.append("baseline" if baseline else spec.run_name)
        if self.fail:
            raise RuntimeError("boom\nsecond line")
        samples = [{"task": t, "doc_id": i, "prediction": "a" if baseline or i else "b", "target": "a",
                    "score": float(baseline or i > 0)} for t in spec.tasks for i in range(2)]
        scores = {t: sum(s["score"] for s in samples if s["task"] == t) / 2 for t in spec.tasks}
        latency = {"median_ms": 1.0, "q1_ms": 0.9, "q3_ms": 1.1, "min_ms": 0.8, "max_ms": 1.5, "n": 4}
        return Scores(scores, samples, latency, [], dict(scores))


@pytest.fixture
def stubbed(monkeypatch, config_only):
    stub = Stub()
    monkeypatch.setattr(job, "score_variant", stub)
    monkeypatch.setattr(flops, "mean_flops", lambda config, prompts, variant: {
        "total": 100 - len(variant.layers), "baseline": 100, "reduction": len(variant.layers) / 100,
        "theoretical": 90})
    config = tiny.build_config("llava", "llama", image_size=64, patch_size=8, num_layers=32)
    session = type("S", (), {"lm": FakeLM(config)})()
    return stub, (lambda spec, model: session)


def test_run_one_records_skips_retries_and_reuses_the_baseline(tmp_path, config_only, stubbed):
    stub, factory = stubbed
    cfg_a = _cfg(tmp_path, config_only, "op=skip_ffn", "start_layer=2")
    stub.fail = True
    failed = runner.run_one(cfg_a, session_factory=factory)  # a crash is recorded, not raised
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: boom"
    assert "Traceback" in failed["traceback"] and stub.calls == ["baseline"]

    stub.fail = False
    done = runner.run_one(cfg_a, session_factory=factory)  # a failed run is redone
    assert done["status"] == "ok" and stub.calls[1:] == ["baseline", done["path"].split("/")[-2]]
    assert done["layers"] == list(range(2, 32)) and done["start_layer"] == 2 and done["end_layer"] == 32
    assert done["score"] == 0.5 and done["relative_score"] == 0.5 and done["agreement"] == 0.5
    assert done["flops"]["reduction"] == 0.3 and done["baseline"]["score"] == 1.0
    assert done["variant"]["label"] == "skip_ffn L2–32" and done["variant"]["family"] == "ablation"
    assert done["latency_ms"] == 1.0 and done["latency"]["q3_ms"] == 1.1
    assert done["n_per_task"] == {t: 2 for t in done["scores"]}
    assert set(done["scores"]) == {"synth_textvqa", "synth_docvqa", "synth_ocrbench", "synth_chartqa"}
    assert done["git_commit"] and done["versions"]["torch"] and done["seed"] == 0
    assert len(results.read_samples(Path(done["path"]).parent)) == 8
    before = Path(done["path"]).read_bytes()

    calls = len(stub.calls)
    again = runner.run_one(_cfg(tmp_path, config_only, "op=skip_ffn", "start_layer=2", "run.batch_size=3"),
                           session_factory=factory)  # run.* is not part of the identity
    assert len(stub.calls) == calls and again["path"] == done["path"] and Path(done["path"]).read_bytes() == before

    other = runner.run_one(_cfg(tmp_path, config_only, "op=drop_v2t", "start_layer=5"), session_factory=factory)
    assert stub.calls[-1] != "baseline" and stub.calls.count("baseline") == 2  # the baseline is reused
    assert other["baseline"]["config_hash"] == done["baseline"]["config_hash"]

    base = runner.run_one(_cfg(tmp_path, config_only, "op=none", "start_layer=5"), session_factory=factory)
    assert base["relative_score"] == 1.0 and base["layers"] == [] and stub.calls.count("baseline") == 2

    limited = runner.prepare(_cfg(tmp_path, config_only, "op=skip_ffn", "start_layer=2", "eval.limit=4"))
    assert limited.key != runner.prepare(cfg_a).key and limited.baseline_key != runner.prepare(cfg_a).baseline_key

    table = results.records_table(results.load_records(tmp_path / "runs" / "tiny-synthetic"))
    assert sorted(table["op"]) == ["drop_v2t", "none", "skip_ffn"] and set(table["status"]) == {"ok"}


def test_corrupt_record_is_reported_and_recomputed(tmp_path, config_only, stubbed, caplog):
    stub, factory = stubbed
    cfg = _cfg(tmp_path, config_only, "op=skip_attn", "start_layer=4")
    first = runner.run_one(cfg, session_factory=factory)
    path = Path(first["path"])
    path.write_text(path.read_text()[:40])  # truncated, e.g. a disk that filled up
    calls = len(stub.calls)
    with caplog.at_level("WARNING", logger="analysis.runner"):
        again = runner.run_one(cfg, session_factory=factory)
    assert f"unreadable record {path}" in caplog.text
    assert again["status"] == "ok" and len(stub.calls) == calls + 1 and results.read_record(path) is not None


def test_finished_runs_are_read_without_write_access(tmp_path, config_only, stubbed, monkeypatch):
    stub, factory = stubbed
    cfg = _cfg(tmp_path, config_only, "op=mask_v2v", "start_layer=4")
    runner.run_one(cfg, session_factory=factory)

    def no_lock(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(results, "file_lock", no_lock)  # any lock (a write) would fail now
    assert runner.run_one(cfg, session_factory=factory)["status"] == "ok"
    with pytest.raises(ConfigError, match=r"^cannot write to .*permission denied; make the runs dir writable or set "
                                          r"run.runs_dir=") as info:
        runner.run_one(_cfg(tmp_path, config_only, "op=mask_v2v", "start_layer=6"), session_factory=factory)
    assert "\n" not in str(info.value)


def test_two_identical_jobs_at_once_compute_once(tmp_path, config_only, stubbed):
    import threading
    import time

    stub, factory = stubbed
    cfg = _cfg(tmp_path, config_only, "op=skip_attn_ffn", "start_layer=8")
    runner.run_one(_cfg(tmp_path, config_only, "op=none"), session_factory=factory)  # the baseline first
    slow = stub.__call__

    def slowly(*args):
        time.sleep(0.5)
        return slow(*args)

    job.score_variant = slowly
    out = []
    threads = [threading.Thread(target=lambda: out.append(runner.run_one(cfg, session_factory=factory)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [c for c in stub.calls if c != "baseline"].count(runner.prepare(cfg).run_name) == 1
    assert out[0]["config_hash"] == out[1]["config_hash"] and out[0]["status"] == out[1]["status"] == "ok"


def test_a_run_finished_in_another_sweep_is_reused(tmp_path, config_only, stubbed):
    stub, factory = stubbed
    first = runner.run_one(_cfg(tmp_path, config_only, "op=drop_v2t", "start_layer=20"), session_factory=factory)
    calls = len(stub.calls)
    again = runner.run_one(_cfg(tmp_path, config_only, "op=drop_v2t", "start_layer=20", "run.sweep_tag=-other"),
                           session_factory=factory)
    assert len(stub.calls) == calls and again["reused_from"] == str(Path(first["path"]).parent)
    assert again["sweep"] == "tiny-synthetic-other" and again["score"] == first["score"]
    assert len(results.read_samples(Path(again["path"]).parent)) == len(results.read_samples(Path(first["path"]).parent))


@pytest.fixture(scope="module")
def proxyv_config_only(tmp_path_factory) -> Path:
    """A config.json as a ProxyV checkpoint from layer 16 saves it (prepare() reads only the config)."""
    path = tmp_path_factory.mktemp("proxyv16")
    config = tiny.build_config("llava", "llama", image_size=64, patch_size=8, num_layers=32)
    config.proxyv = {"start_layer": 16, "reduce_factor": 4, "init": "spatial", "light_width": 16, "format": 1}
    config.save_pretrained(path)
    return path


def test_proxyv_runs_beside_the_ops(tmp_path, config_only, proxyv_config_only, stubbed):
    stub, factory = stubbed
    listed = f"model.proxyv={{16:{proxyv_config_only}}}"
    spec = runner.prepare(_cfg(tmp_path, config_only, "op=proxyv", "start_layer=16", listed))
    v = spec.variant
    assert (v.family, v.method, v.layers) == ("proxyv", "proxyv", tuple(range(16, 32)))
    assert spec.model.path == str(proxyv_config_only) == v.checkpoint
    assert spec.base.path == str(config_only) and v.options == {"reduce_factor": 4, "init": "spatial", "light_width": 16}
    assert v.label == "proxyv L16–32 (init=spatial, reduce_factor=4)"
    with pytest.raises(ConfigError, match=r"no trained proxyv checkpoint for start_layer=16 has op.reduce_factor=2: "
                                          r".* has reduce_factor=4"):
        runner.prepare(_cfg(tmp_path, config_only, "op=proxyv", "start_layer=16", listed, "op.reduce_factor=2"))
    ablation = runner.prepare(_cfg(tmp_path, config_only, "op=skip_ffn", "start_layer=16", listed))
    assert spec.baseline_key == ablation.baseline_key and spec.key != ablation.key  # one baseline for both
    record = runner.run_one(_cfg(tmp_path, config_only, "op=proxyv", "start_layer=16", listed), session_factory=factory)
    assert record["status"] == "ok" and record["op"] == "proxyv" and record["proxyv"]["start_layer"] == 16
    assert record["model_path"] == str(proxyv_config_only) and record["baseline"]["score"] == 1.0
    with pytest.raises(ConfigError, match=r"(?i)no trained ProxyV checkpoint for start_layer=8 \(listed in model.proxyv: [0-9, ]*\b16\b.*conf/model/tiny.yaml"):
        runner.prepare(_cfg(tmp_path, config_only, "op=proxyv", "start_layer=8", listed))
    with pytest.raises(ConfigError, match="is a ProxyV checkpoint: set model.baseline_model"):
        runner.prepare(_cfg(tmp_path, proxyv_config_only, "op=none"))
    own = runner.prepare(_cfg(tmp_path, proxyv_config_only, "op=none", "+model.baseline_model=tiny")).variant
    assert own == v  # a ProxyV checkpoint as the model: the same variant, its settings included
    with pytest.raises(ConfigError, match="run it with op=none"):
        runner.prepare(_cfg(tmp_path, proxyv_config_only, "op=skip_ffn", "+model.baseline_model=tiny"))


def test_agreement():
    ref = [{"task": "t", "doc_id": i, "prediction": p} for i, p in enumerate(["a", "b ", "c"])]
    out = [{"task": "t", "doc_id": i, "prediction": p} for i, p in enumerate([" a", "b", "x"])]
    assert agreement(out, ref) == pytest.approx(2 / 3)
    assert agreement(out, []) is None


def test_record_schema_documented():
    doc = results.__doc__
    for field in ("model", "op", "layers", "scores", "score", "relative_score", "flops", "latency_ms", "agreement",
                  "seed", "git_commit", "versions", "wall_time_s", "status", "samples.jsonl"):
        assert field in doc, field
    assert json.loads(json.dumps(results.package_versions()))["python"]


def test_the_main_job_writes_only_ignored_files():
    """Records and reports land in git-ignored folders, so running the main job leaves every tracked file as it
    was (else each later record would claim git_dirty)."""
    import subprocess

    paths = ["runs/tiny-synthetic/skip_ffn_L0-32_0123456789/result.json", "reports/tiny-synthetic/report.md",
             "reports/tiny-synthetic/pareto.png", "runs/baselines/tiny-synthetic_0123456789/samples.jsonl"]
    out = subprocess.run(["git", "check-ignore", *paths], cwd=results.REPO_ROOT, capture_output=True, text=True)
    assert sorted(out.stdout.split()) == sorted(paths)
    tracked = subprocess.run(["git", "ls-files", "runs", "reports"], cwd=results.REPO_ROOT, capture_output=True,
                             text=True).stdout.split()
    assert tracked == []


def test_unwritable_runs_dir_is_one_line_unless_everything_is_finished(tmp_path, config_only, stubbed, monkeypatch):
    """(Root ignores permission bits, so the check itself is stubbed: what is tested is what the sweep does.)"""
    stub, factory = stubbed
    cfg = _cfg(tmp_path, config_only, "op=skip_ffn", "start_layer=28")
    runner.run_one(cfg, session_factory=factory)
    finished, unfinished = runner.prepare(cfg), runner.prepare(_cfg(tmp_path, config_only, "op=skip_ffn",
                                                                   "start_layer=30"))
    monkeypatch.setattr(sweep, "_writable", lambda path: False)
    sweeper = sweep.VariantSweeper()
    assert sweeper.check_writable([finished]) == []  # all finished: read, nothing to write
    with pytest.raises(SystemExit) as info:
        sweeper.check_writable([finished, unfinished])
    message = str(info.value)
    assert message.startswith(f"error: the runs dir {unfinished.sweep_root} is not writable and 1 of 2 runs are not "
                              "finished; make it writable or set run.runs_dir=") and "\n" not in message


def test_dry_run_lists_every_run_and_baseline_with_its_state(tmp_path, config_only, stubbed, capsys):
    """run.dry_run=true: the sweep's runs, validated as for a real sweep, each finished or to run, and the baseline
    they need; nothing evaluated, nothing written."""
    stub, factory = stubbed
    cfg = _cfg(tmp_path, config_only, "op=skip_ffn", "start_layer=28")
    runner.run_one(cfg, session_factory=factory)  # finishes this run and its baseline
    finished, unfinished = runner.prepare(cfg), runner.prepare(_cfg(tmp_path, config_only, "op=skip_attn",
                                                                   "start_layer=30"))
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert sweep.VariantSweeper.plan([finished, unfinished]) == []
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sweep (dry run): 2 runs, 1 finished, 1 to run -> ")
    assert lines[1].split()[:3] == ["finished", "skip_ffn", "L28–32"] and lines[1].endswith(finished.run_dir.name)
    assert lines[2].split()[:4] == ["to", "run", "skip_attn", "L30–32"] and lines[2].endswith(unfinished.run_dir.name)
    assert lines[3].split()[:4] == ["finished", "baseline", "of", "tiny"] and len(lines) == 4  # one shared baseline
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == written


def test_dry_run_from_the_command_line_stops_before_any_work(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(results.REPO_ROOT / "experiments" / "run.py"), "-m", "op=skip_ffn",
                          "start_layer=24,28", "run.dry_run=true", f"run.runs_dir={tmp_path / 'runs'}",
                          f"run.reports_dir={tmp_path / 'reports'}"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == ("sweep (dry run): 2 runs, 0 finished, 2 to run -> "
                        "runs/tiny-synthetic-op=skip_ffn-start_layer=24,28")
    assert [line.split()[2:4] for line in lines[1:]] == [["skip_ffn", "L24–32"], ["skip_ffn", "L28–32"],
                                                          ["baseline", "of"]]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "reports").exists()


@pytest.fixture(scope="module")
def learned_config_only(tmp_path_factory) -> Path:
    """A config.json as a learned-proxy ProxyV checkpoint from layer 16 saves it."""
    path = tmp_path_factory.mktemp("proxyv16learned")
    config = tiny.build_config("llava", "llama", image_size=64, patch_size=8, num_layers=32)
    config.proxyv = {"start_layer": 16, "reduce_factor": 4, "init": "learned", "light_width": 16, "format": 1}
    config.save_pretrained(path)
    return path


def test_token_reduction_runs_on_the_learned_proxyv_checkpoint(tmp_path, config_only, proxyv_config_only,
                                                                learned_config_only):
    listed = f"model.proxyv={{16:[{proxyv_config_only},{learned_config_only}]}}"
    first = runner.prepare(_cfg(tmp_path, config_only, "op=proxyv", "start_layer=16", listed))
    assert first.model.path == str(proxyv_config_only)  # the first listed, as the default sweep takes it
    learned = runner.prepare(_cfg(tmp_path, config_only, "op=proxyv", "start_layer=16", listed, "++op.init=learned"))
    assert learned.model.path == str(learned_config_only) and learned.variant.options["init"] == "learned"
    with pytest.raises(ConfigError, match="has op.init='none'"):  # no init='none' checkpoint listed for layer 16
        runner.prepare(_cfg(tmp_path, config_only, "op=proxyv", "start_layer=16", listed, "++op.init=none"))
    light = tmp_path / "proxyv16none"  # the paper's Table 2 light-MLP variant: a checkpoint like the others
    config = tiny.build_config("llava", "llama", image_size=64, patch_size=8, num_layers=32)
    config.proxyv = {"start_layer": 16, "reduce_factor": 4, "init": "none", "light_width": 16, "format": 1}
    config.save_pretrained(light)
    three = f"model.proxyv={{16:[{proxyv_config_only},{learned_config_only},{light}]}}"
    none = runner.prepare(_cfg(tmp_path, config_only, "op=proxyv", "start_layer=16", three, "++op.init=none"))
    assert none.model.path == str(light) and none.variant.options["init"] == "none"
    fastv = runner.prepare(_cfg(tmp_path, config_only, "op=fastv", "start_layer=2", "op.keep=0.5", "op.proxyv=16",
                                listed))
    v = fastv.variant
    assert (v.family, v.method, v.options) == ("reduction", "fastv", {"keep": 0.5, "proxyv": 16})
    assert fastv.model.path == str(learned_config_only) == v.checkpoint and fastv.base.path == str(config_only)
    assert v.label == f"fastv L2–32 (keep=0.5, proxyv=16) on {learned_config_only.name}"
    assert fastv.baseline_key == first.baseline_key
    with pytest.raises(ConfigError, match=r"pdrop drops vision tokens before layer 24, after ProxyV's start layer 16"):
        runner.prepare(_cfg(tmp_path, config_only, "op=pdrop", "op.keep=0.5", "op.proxyv=16", listed))
    with pytest.raises(ConfigError, match=r"has op.init='learned': .* has init='spatial'"):
        runner.prepare(_cfg(tmp_path, config_only, "op=fastv", "start_layer=2", "op.keep=0.5", "op.proxyv=16",
                            f"model.proxyv={{16:{proxyv_config_only}}}"))


def test_two_fine_tunes_of_one_architecture_are_different_weights(tmp_path):
    """Same config.json, same file sizes, different weights: a run of one is never reused for the other."""
    for name, seed in (("a", 0), ("b", 1), ("a_moved", 0)):
        tiny.build_model("llava", "llama", num_layers=2, seed=seed).save_pretrained(tmp_path / name)
    a, b, moved = (results.weights_fingerprint(tmp_path / n) for n in ("a", "b", "a_moved"))
    sizes = {n: (tmp_path / n / "model.safetensors").stat().st_size for n in ("a", "b")}
    assert sizes["a"] == sizes["b"] and (tmp_path / "a" / "config.json").read_text() == \
        (tmp_path / "b" / "config.json").read_text()
    assert a != b and a == moved


def test_reduction_on_a_next_proxyv_checkpoint_is_refused_before_evaluating(tmp_path, config_only):
    """Its FLOPs are not counted (unpadded AnyRes crops), so the runner says so before any evaluation."""
    path = tmp_path / "next16"
    config = tiny.build_config("llava_next", "llama", num_layers=32)
    config.proxyv = {"start_layer": 16, "reduce_factor": 4, "init": "learned", "light_width": 16, "format": 1}
    config.save_pretrained(path)
    with pytest.raises(ConfigError, match=r"op=fastv on a LLaVA-NeXT ProxyV checkpoint executes, but its FLOPs are "
                                          r"not counted"):
        runner.prepare(_cfg(tmp_path, config_only, "op=fastv", "start_layer=2", "op.keep=0.5", "op.proxyv=16",
                            f"model.proxyv={{16:{path}}}"))
