"""The notebook works as documented: started from some directory with a relative ``RESULTS_DIR`` (its
kernel running in notebooks/, as under ``jupyter lab``), it finds the sweep, plots every group of
runs scored on the same samples inline (``image/png`` outputs), and is committed without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat

from analysis import results

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "accuracy_vs_flops.ipynb"
TASKS = ("synth_docvqa", "synth_ocrbench")
SAVED = {"none": 0.0, "skip_ffn": 0.5, "drop_v2t": 0.0}  # drop_v2t: mask-only, no executed FLOPs saved


def _record(op: str, start: int | None, rel: float, limit: int) -> dict:
    from analysis.variant import Variant

    layers = [] if start is None else list(range(start, 8))
    variant = Variant("ablation", op, tuple(layers))
    key = f"{op}{'' if start is None else start}-{limit}"
    scores = {t: 0.8 * rel for t in TASKS}
    return {
        "status": "ok", "error": None, "config_hash": key, "model": "tiny", "op": op, "layers": layers,
        "start_layer": start, "end_layer": 8 if layers else None, "num_layers": 8, "eval": "synthetic",
        "tasks": list(TASKS), "limit": limit, "blind": False, "seed": 0, "variant": variant.to_record(),
        "scores": scores, "score": 0.8 * rel, "relative_score": rel,
        "baseline": None if op == "none" else {"score": 0.8, "config_hash": f"none-{limit}", "path": "-"},
        "flops": {"total": 1e9 * (1 - SAVED[op] * len(layers) / 8), "baseline": 1e9,
                  "reduction": SAVED[op] * len(layers) / 8, "theoretical_reduction": 0.1 * len(layers) / 8},
        "latency_ms": 5.0, "latency": {"median_ms": 5.0, "q1_ms": 4.9, "q3_ms": 5.2, "n": 4, "load_1min": 0.1, "cpus": 2},
        "agreement": min(rel, 1.0), "n_samples": limit * len(TASKS), "n_per_task": {t: limit for t in TASKS},
        "finished_at": "2026-01-01T00:00:00+00:00",
    }


def _fake_sweep(root: Path) -> Path:
    """Two groups (limit 3 and 5), each: its baseline, skip_ffn and drop_v2t from layers 4 and 6."""
    for limit in (3, 5):
        results.write_record(root / f"none-{limit}", _record("none", None, 1.0, limit))
        for op in ("skip_ffn", "drop_v2t"):
            for start, rel in ((4, 0.97), (6, 1.0)):
                results.write_record(root / f"{op}-{start}-{limit}", _record(op, start, rel, limit))
    return root


def test_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert len([c for c in code if "plot" in c.metadata.get("tags", [])]) == 3


def test_user_path_is_taken_from_where_the_user_launched(tmp_path, monkeypatch):
    launched, elsewhere = tmp_path / "launched", tmp_path / "kernel"
    launched.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("PWD", str(launched))
    assert results.user_path("runs/x") == launched / "runs" / "x"
    assert results.user_path(tmp_path / "abs") == tmp_path / "abs"
    monkeypatch.setenv("PWD", str(tmp_path / "gone"))
    assert results.user_path("runs/x") == elsewhere / "runs" / "x"
    monkeypatch.delenv("PWD")
    assert results.user_path("runs/x") == elsewhere / "runs" / "x"


def test_notebook_plots_every_group_inline(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    launched = tmp_path / "launched"
    sweep = _fake_sweep(launched / "runs" / "fake")
    monkeypatch.setenv("RESULTS_DIR", "runs/fake")  # relative to where jupyter was started ...
    monkeypatch.setenv("PWD", str(launched))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",  # ... not to the kernel's folder
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for c in code for o in c.outputs)
    assert f"10 runs, 10 ok, from {sweep}; 2 group(s)" in printed
    shown = "".join(str(o.get("data", {}).get("text/markdown", "")) for c in code for o in c.outputs)
    assert "n = 3 samples per task × 2 tasks = 6 samples" in shown and "n = 5 samples per task" in shown
    plots = [c for c in code if "plot" in c.metadata.get("tags", [])]
    assert len(plots) == 3
    for cell in plots:  # one inline image per group in every plot cell
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert len(images) == 2, cell.source[:80]
