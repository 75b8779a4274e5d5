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

from analysis import results, runner, tiny
from analysis.runner import ConfigError, Evaluation


def _compose(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(runner.CONF_DIR), version_base="1.3"):
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
    choices = runner.group_choices(group)
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
        assert node["name"] == choice, f"conf/{group}/{choice}.yaml: name should be {choice!r}"
        if group == "model":
            assert {"pretrained", "hub_id", "how_to_get", "batch_size", "dtype"} <= set(node)
        if group == "eval":
            assert isinstance(node["tasks"], dict) and {"limit", "blind", "include_path"} <= set(node)


def test_op_configs_match_the_registry():
    from analysis.ops import OPERATORS

    assert set(OPERATORS) <= set(runner.group_choices("op"))


def test_default_sweep_and_the_users_command():
    cfg = _compose(hydra=True)
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.model.name == "tiny"
    params = cfg.hydra.sweeper.params
    assert set(params.op.split(",")) == {"mask_v2v", "skip_attn", "skip_ffn", "skip_attn_ffn", "drop_v2t"}
    from analysis.report import count_jobs

    assert count_jobs(cfg) == 5 * len(params.start_layer.split(","))
    cfg.hydra.overrides.task = ["op=skip_ffn", "start_layer=8,12,16"]
    assert count_jobs(cfg) == 3  # an override of a swept key replaces its values


def test_unknown_group_option_is_one_line():
    for argv, expected in ((["-m", "op=skip_ffn,skip_fn"], "unknown op 'skip_fn'; known: drop_v2t"),
                           (["model=llava-9b"], "unknown model 'llava-9b'; known: llava-1.5-13b"),
                           (["eval=lmm"], "unknown eval 'lmm'"),
                           (["hydra/launcher=slurm"], "unknown launcher 'slurm'; known: basic, submitit_local")):
        with pytest.raises(ConfigError, match=expected) as info:
            runner.check_overrides(argv)
        assert "\n" not in str(info.value)
    runner.check_overrides(["-m", "op=skip_ffn,drop_v2t", "start_layer=8,12", "model.pretrained=/x"])


def test_bad_configs_are_one_line_errors(tmp_path, config_only, monkeypatch):
    cases = [
        (("start_layer=32",), r"start_layer=32 is out of range: the model has 32 decoder layers \(valid 0..31\)"),
        (("start_layer=2", "end_layer=2"), "end_layer=2 must be in 3..32"),
        (("start_layer=abc",), "start_layer must be an integer or null, got 'abc'"),
        (("eval.limit=0",), "eval.limit must be a positive integer"),
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


# ----------------------------------------------------------------------------- bookkeeping

class FakeLM:
    def __init__(self, config):
        self.model = type("M", (), {"config": config})()


class Stub:
    """Replaces runner.evaluate: answers 'a' everywhere except where the variant is told to differ."""

    def __init__(self):
        self.calls = []
        self.fail = False

    def __call__(self, spec, session, baseline=False):
        self.calls.append("baseline" if baseline else spec.run_name)
        if self.fail:
            raise RuntimeError("boom\nsecond line")
        samples = [{"task": t, "doc_id": i, "prediction": "a" if baseline or i else "b", "target": "a",
                    "score": float(baseline or i > 0)} for t in spec.tasks for i in range(2)]
        scores = {t: sum(s["score"] for s in samples if s["task"] == t) / 2 for t in spec.tasks}
        return Evaluation(scores, samples, 1.0, [], dict(scores))


@pytest.fixture
def stubbed(monkeypatch, config_only):
    stub = Stub()
    monkeypatch.setattr(runner, "evaluate", stub)
    monkeypatch.setattr(runner, "mean_flops", lambda config, layouts, op, layers, proxyv=None: {
        "total": 100 - len(layers), "baseline": 100, "reduction": len(layers) / 100, "theoretical": 90})
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
    assert spec.op == "proxyv" and spec.layers == tuple(range(16, 32)) and spec.model.path == str(proxyv_config_only)
    assert spec.base.path == str(config_only) and spec.proxyv["reduce_factor"] == 4
    ablation = runner.prepare(_cfg(tmp_path, config_only, "op=skip_ffn", "start_layer=16", listed))
    assert spec.baseline_key == ablation.baseline_key and spec.key != ablation.key  # one baseline for both
    record = runner.run_one(_cfg(tmp_path, config_only, "op=proxyv", "start_layer=16", listed), session_factory=factory)
    assert record["status"] == "ok" and record["op"] == "proxyv" and record["proxyv"]["start_layer"] == 16
    assert record["model_path"] == str(proxyv_config_only) and record["baseline"]["score"] == 1.0
    with pytest.raises(ConfigError, match=r"no trained ProxyV checkpoint for start_layer=8 \(listed in model.proxyv: 16\b.*conf/model/tiny.yaml"):
        runner.prepare(_cfg(tmp_path, config_only, "op=proxyv", "start_layer=8", listed))
    with pytest.raises(ConfigError, match="is a ProxyV checkpoint: set model.baseline_model"):
        runner.prepare(_cfg(tmp_path, proxyv_config_only, "op=none"))
    with pytest.raises(ConfigError, match="run it with op=none"):
        runner.prepare(_cfg(tmp_path, proxyv_config_only, "op=skip_ffn", "+model.baseline_model=tiny"))


def test_agreement():
    ref = [{"task": "t", "doc_id": i, "prediction": p} for i, p in enumerate(["a", "b ", "c"])]
    out = [{"task": "t", "doc_id": i, "prediction": p} for i, p in enumerate([" a", "b", "x"])]
    assert runner.agreement(out, ref) == pytest.approx(2 / 3)
    assert runner.agreement(out, []) is None


def test_record_schema_documented():
    doc = results.__doc__
    for field in ("model", "op", "layers", "scores", "score", "relative_score", "flops", "latency_ms", "agreement",
                  "seed", "git_commit", "versions", "wall_time_s", "status", "samples.jsonl"):
        assert field in doc, field
    assert json.loads(json.dumps(results.package_versions()))["python"]
