"""The main job end to end, as a user runs it: `python experiments/run.py -m ...` in a subprocess, on a
tiny random-weight 32-layer LLaVA saved like a hub checkpoint, scored by lmms-eval on the synthetic
twins (2 samples per task). Covers the user's own command, SIGKILL mid-sweep and resume, the report
written at the end of the sweep, the submitit_local launcher, two identical sweeps at once, and
one-line errors for bad overrides (every swept value checked before the first job)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analysis import results, tiny
from analysis.sweep import sweep_tag

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
USER_SWEEP = ["-m", "op=skip_ffn", "start_layer=8,12,16"]  # the user's command, as written


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny random-weight checkpoint (the default's shape: 64 px images, 8 px patches, 32 layers, but
    narrow) saved with save_pretrained, and a baselines directory shared by the sweeps below."""
    root = tmp_path_factory.mktemp("e2e")
    model = tiny.build_model("llava", "llama", image_size=64, patch_size=8, num_layers=32, hidden_size=32,
                             num_heads=2, intermediate_size=64)
    model.save_pretrained(root / "ckpt")
    tiny.build_processor("llava", image_size=64, patch_size=8).save_pretrained(root / "ckpt")
    return root


def _command(workdir: Path, runs: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "experiments" / "run.py"), *overrides, f"model.pretrained={workdir / 'ckpt'}",
            f"run.runs_dir={runs}", f"run.baselines_dir={workdir / 'baselines'}",
            f"run.reports_dir={runs.parent / 'reports'}", "eval.limit=2", "run.threads=1", "run.progress=false",
            "run.latency_prompts=1", "run.latency_repeats=2", "run.latency_warmup=1"]


def _sweep_name(cmd: list[str]) -> str:
    """The folder experiments/run.py gives the sweep of ``cmd`` (an ad-hoc sweep is named after its overrides)."""
    return "tiny-synthetic" + sweep_tag(cmd[2:])


def _run(cmd: list[str], cwd: Path, log: Path, timeout: float = 400, env=ENV) -> subprocess.CompletedProcess:
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, log.read_text())


def _snapshot(*roots: Path) -> dict[str, tuple[bytes, int]]:
    files = [p for root in roots for name in (results.RESULT_FILE, results.SAMPLES_FILE) for p in root.rglob(name)]
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def _table_rows(markdown: str) -> list[dict]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, [c.strip() for c in line.strip("|").split("|")])) for line in lines[2:]]


def _tracked_changes() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                          text=True).stdout


def test_user_sweep_killed_resumed_reported(workdir, tmp_path):
    clean_before = _tracked_changes() == ""  # a developer's tree may be dirty already; CI's clone is not
    runs = tmp_path / "runs"
    cmd = _command(workdir, runs, *USER_SWEEP)
    sweep = runs / _sweep_name(cmd)
    assert sweep.name.startswith("tiny-synthetic-op=skip_ffn-start_layer=8,12,16")  # not the main job's folder

    # 1. Start the sweep and SIGKILL it (the whole process group) as soon as one variant has finished.
    with open(tmp_path / "killed.log", "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + 400
        while not list(sweep.glob(f"skip_ffn_*/{results.RESULT_FILE}")):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no variant finished in time"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finished = _snapshot(sweep, workdir / "baselines")
    done_before = [Path(p).parent.name for p in finished if p.endswith(results.RESULT_FILE) and str(sweep) in p]
    assert 1 <= len(done_before) < 3 and proc.returncode == -signal.SIGKILL

    # 2. Re-run the same command: finished runs are skipped byte for byte, the rest complete.
    rerun = _run(cmd, tmp_path, tmp_path / "rerun.log")
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert _snapshot(sweep, workdir / "baselines").items() >= finished.items()  # nothing finished was rewritten
    assert f"sweep: 3 runs ({len(done_before)} finished before)" in rerun.stdout
    assert rerun.stdout.count(": finished before") == 0 and "computing the baseline" not in rerun.stdout
    assert len([line for line in rerun.stdout.splitlines() if line.strip()]) <= 3 + 3 - len(done_before) + 1
    records = results.load_records(sweep)
    variants = [r for r in records if r["op"] == "skip_ffn"]
    assert sorted(r["start_layer"] for r in variants) == [8, 12, 16]
    for r in variants:
        assert r["status"] == "ok" and r["end_layer"] == 32 and r["num_layers"] == 32 and r["n_samples"] == 8
        assert set(r["scores"]) == {"synth_textvqa", "synth_docvqa", "synth_ocrbench", "synth_chartqa"}
        assert 0 < r["flops"]["total"] < r["flops"]["baseline"] and r["latency_ms"] == r["latency"]["median_ms"] > 0
        assert r["latency"]["n"] == 2 and r["latency"]["threads"] == 1 and r["latency"]["device"] == "cpu"
        assert r["n_per_task"] == {t: 2 for t in r["scores"]}
        assert r["variant"]["label"] == f"skip_ffn L{r['start_layer']}–32"
        assert 0 <= r["agreement"] <= 1 and r["git_commit"] and r["versions"]["lmms_eval"] == "0.7.3"
        assert len(results.read_samples(Path(r["path"]).parent)) == 8
    if clean_before:  # running sweeps changes no tracked file, so the records say the tree was clean
        assert _tracked_changes() == "" and all(r["git_dirty"] is False for r in records)
    reductions = [r["flops"]["reduction"] for r in sorted(variants, key=lambda r: r["start_layer"])]
    assert reductions == sorted(reductions, reverse=True)  # ablating more layers saves more

    # 3. The sweep wrote the report; its table is the records.
    report = tmp_path / "reports" / sweep.name / "report.md"
    rows = _table_rows(report.read_text())
    assert len(rows) == len(records) == 4  # baseline + 3 variants
    for record in records:
        row = next(r for r in rows if r["variant"] == record["variant"]["label"])
        assert row["status"] == "ok" and float(row["score"]) == pytest.approx(record["score"], abs=5e-4)
        assert float(row["agreement"]) == pytest.approx(record["agreement"], abs=5e-4)
        assert float(row["FLOPs saved"].rstrip("%")) == pytest.approx(100 * record["flops"]["reduction"], abs=0.051)
        for task, value in record["scores"].items():
            assert float(row[task]) == pytest.approx(value, abs=5e-4)
    assert "n = 2 samples per task × 4 tasks = 8 samples" in report.read_text()


def test_sweep_through_submitit_local(workdir, tmp_path):
    runs = tmp_path / "runs"
    cmd = _command(workdir, runs, "-m", "op=skip_attn,drop_v2t", "start_layer=20", "hydra/launcher=submitit_local")
    out = _run(cmd, tmp_path, tmp_path / "submitit.log")
    assert out.returncode == 0, out.stdout[-3000:]
    sweep = runs / _sweep_name(cmd)
    records = [r for r in results.load_records(sweep) if r["op"] != "none"]
    assert sorted(r["op"] for r in records) == ["drop_v2t", "skip_attn"]
    assert all(r["status"] == "ok" and r["layers"] == list(range(20, 32)) for r in records)
    assert list((sweep / ".hydra").glob("*/.submitit"))  # the jobs ran through submitit
    assert (tmp_path / "reports" / sweep.name / "report.md").exists()


def test_two_identical_sweeps_at_once_compute_each_run_once(workdir, tmp_path):
    runs = tmp_path / "runs"
    cmd = _command(workdir, runs, "-m", "op=mask_v2v", "start_layer=24,28")
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    computed = sum(out.count("mask_v2v L") - out.count("finished by another sweep") for out in outs)
    assert computed == 2, outs  # each of the two runs once, whichever sweep got there first
    assert sum(out.count("computing the baseline") for out in outs) <= 1


def test_bad_overrides_fail_with_one_line(workdir, tmp_path):
    env = {**ENV, "HF_HUB_CACHE": str(tmp_path / "empty-hub-cache")}
    cases = {
        "op": (["op=skip_fn"], "error: unknown op 'skip_fn'; known: drop_v2t, fastv, mask_v2v, none, pdrop, proxyv, skip_attn"),
        "depth": (["-m", "op=skip_ffn", "start_layer=8,40"],  # the valid job first: nothing may run before the check
                  "error: start_layer=40 is out of range: the model has 32 decoder layers (valid 0..31)"),
        "weights": (["model=llava-1.5-13b"], "error: model llava-1.5-13b: weights not found (no directory "
                    "'llava-hf/llava-1.5-13b-hf' and llava-hf/llava-1.5-13b-hf is not in the HF cache); get them "
                    "with: hf download llava-hf/llava-1.5-13b-hf"),
    }
    procs = {}
    for name, (args, _) in cases.items():
        cmd = _command(workdir, tmp_path / "runs", *args)
        if name == "weights":
            cmd = [c for c in cmd if not c.startswith("model.pretrained=")]
        procs[name] = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        errors = [line for line in (stdout + stderr).splitlines() if "error" in line.lower()]
        assert proc.returncode != 0 and len(errors) == 1, (name, stdout, stderr)
        assert errors[0].startswith(cases[name][1]), (name, errors)
        assert "Traceback" not in stdout + stderr
    assert not list((tmp_path / "runs").rglob(results.RESULT_FILE))  # nothing ran


def test_token_reduction_in_a_sweep(workdir, tmp_path):
    """The reduction family, registered once, runs through the whole main job: records, FLOPs, report."""
    runs = tmp_path / "runs"
    cmd = _command(workdir, runs, "-m", "op=fastv,pdrop", "start_layer=2", "op.keep=0.5")
    out = _run(cmd, tmp_path, tmp_path / "reduction.log")
    assert out.returncode == 0, out.stdout[-3000:]
    records = {r["variant"]["label"]: r for r in results.load_records(runs / _sweep_name(cmd)) if r["op"] != "none"}
    assert sorted(records) == ["fastv L2–32 (keep=0.5)", "pdrop L8,16,24 (keep=0.5, positions=renumber)"]
    for record in records.values():
        assert record["status"] == "ok" and record["variant"]["family"] == "reduction"
        assert 0 < record["flops"]["reduction"] < 1 and record["n_samples"] == 8
    report = (tmp_path / "reports" / _sweep_name(cmd) / "report.md").read_text()
    assert "fastv L2–32 (keep=0.5)" in report and "ProxyV vs token reduction" not in report  # no ProxyV rows here
