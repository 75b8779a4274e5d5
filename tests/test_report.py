"""The report reads result records only: its table equals the records, its summary is right, it draws
its figures, and neither it nor analysis.results imports torch. Records here are written through
analysis.results with made-up numbers (a sweep of known shape); test_runner.py runs real sweeps."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from analysis import report, results

REPO = Path(__file__).resolve().parents[1]
TASKS = ("synth_chartqa", "synth_docvqa", "synth_ocrbench", "synth_textvqa")
NUM_LAYERS = 32
STARTS = (0, 8, 16, 24)
# relative score per (op, start): skip_ffn keeps >= 0.99 from 8 on; skip_attn_ffn only from 24 on;
# drop_v2t dips at 16 (so its earliest *safe* start is 24, not 8).
RELATIVE = {
    "skip_ffn": {0: 0.90, 8: 0.995, 16: 1.0, 24: 1.0},
    "skip_attn_ffn": {0: 0.40, 8: 0.80, 16: 0.97, 24: 0.992},
    "drop_v2t": {0: 0.50, 8: 0.99, 16: 0.95, 24: 1.0},
}
SAVED = {"skip_ffn": 0.6, "skip_attn_ffn": 0.9, "drop_v2t": 0.0}  # FLOPs share saved when ablating every layer


def _record(op: str, start: int | None, rel: float, key: str, status: str = "ok") -> dict:
    base = 0.8
    layers = [] if start is None else list(range(start, NUM_LAYERS))
    fraction = len(layers) / NUM_LAYERS
    scores = {t: round(base * rel + 0.01 * i, 6) for i, t in enumerate(TASKS)}
    score = sum(scores.values()) / len(scores)
    return {
        "status": status, "error": None if status == "ok" else "RuntimeError: boom", "config_hash": key,
        "model": "tiny", "op": op, "layers": layers, "start_layer": start,
        "end_layer": NUM_LAYERS if layers else None, "num_layers": NUM_LAYERS, "eval": "synthetic",
        "blind": False, "scores": scores if status == "ok" else None, "score": score if status == "ok" else None,
        "relative_score": rel if status == "ok" else None,
        "flops": {"total": 1e9 * (1 - SAVED.get(op, 0) * fraction), "baseline": 1e9,
                  "reduction": SAVED.get(op, 0) * fraction, "theoretical_reduction": SAVED.get(op, 0.05) * fraction},
        "latency_ms": 10.0 * (1 - 0.5 * SAVED.get(op, 0) * fraction), "agreement": min(1.0, rel),
        "n_samples": 8, "finished_at": f"2026-01-01T00:00:{len(layers):02d}+00:00",
    }


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs") / "tiny-synthetic"
    results.write_record(root / "none", _record("none", None, 1.0, "base"))
    for op, by_start in RELATIVE.items():
        for start, rel in by_start.items():
            results.write_record(root / f"{op}_{start}", _record(op, start, rel, f"{op}{start}"),
                                 [{"task": "synth_ocrbench", "doc_id": 0, "prediction": "x", "score": 1.0}])
    results.write_record(root / "failed", _record("skip_attn", 8, 0, "bad", status="failed"))
    return root


@pytest.fixture(scope="module")
def built(sweep, tmp_path_factory) -> Path:
    return report.write_report(sweep, tmp_path_factory.mktemp("reports") / "tiny-synthetic")


def _markdown_rows(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, [c.strip() for c in line.strip("|").split("|")])) for line in lines[2:]]


def test_report_table_equals_records(sweep, built):
    rows = _markdown_rows(built.read_text())
    records = results.load_records(sweep)
    assert len(rows) == len(records) == 1 + 12 + 1
    by_key = {(r["op"], r["layers [start, end)"]): r for r in rows}
    for record in records:
        layers = record["layers"]
        row = by_key[(record["op"], f"{layers[0]}–{layers[-1] + 1}" if layers else "–")]
        if record["status"] != "ok":
            assert row["status"].startswith("**failed**") and "boom" in row["status"]
            continue
        assert row["status"] == "ok"
        for task in TASKS:
            assert float(row[task]) == pytest.approx(record["scores"][task], abs=5e-4)
        assert float(row["score"]) == pytest.approx(record["score"], abs=5e-4)
        assert float(row["relative"]) == pytest.approx(record["relative_score"], abs=5e-4)
        assert float(row["FLOPs saved"].rstrip("%")) == pytest.approx(100 * record["flops"]["reduction"], abs=0.051)
        assert float(row["prefill ms"]) == pytest.approx(record["latency_ms"], abs=0.051)
        assert float(row["agreement"]) == pytest.approx(record["agreement"], abs=5e-4)


def test_report_figures_and_summary(built):
    text = built.read_text()
    for name in ("pareto.png", "heatmap.png", "mask_ratio.png"):
        assert (built.parent / name).stat().st_size > 5_000
        assert f"]({name})" in text
    assert re.search(r"`skip_ffn`: from layer \*\*8\*\*", text)
    assert re.search(r"`skip_attn_ffn`: from layer \*\*24\*\*", text)
    assert re.search(r"`drop_v2t`: from layer \*\*24\*\*", text)  # 16 dips below 0.99, so 8 is not safe
    assert "ProxyV can start" in text and "1 run(s) failed" in text


def test_earliest_safe_start_and_pareto():
    table = results.records_table([_record("skip_ffn", s, r, str(s)) for s, r in RELATIVE["skip_ffn"].items()])
    assert report.earliest_safe_start(table)["skip_ffn"]["start_layer"] == 8
    assert report.earliest_safe_start(table, threshold=1.0)["skip_ffn"]["start_layer"] == 16
    assert report.earliest_safe_start(table, threshold=1.01)["skip_ffn"] is None
    points = [(0.0, 1.0), (0.2, 0.99), (0.1, 0.95), (0.5, 0.5), (0.4, 0.3)]
    assert report.pareto_front(points) == [0, 1, 3]


def test_report_cli(sweep, tmp_path):
    assert report.main([str(sweep), "--out", str(tmp_path / "r"), "--threshold", "0.9"]) == 0
    assert "`skip_attn_ffn`: from layer **16**" in (tmp_path / "r" / "report.md").read_text()
    assert report.main([str(tmp_path / "missing")]) == 2


def test_records_roundtrip_and_atomic_write(tmp_path):
    path = results.write_record(tmp_path / "run", {"status": "ok", "score": float("nan"), "x": (1, 2)},
                                [{"task": "t", "doc_id": 1, "prediction": "a"}])
    record = json.loads(path.read_text())
    assert record["schema"] == results.SCHEMA_VERSION and record["score"] is None and record["x"] == [1, 2]
    assert results.read_samples(tmp_path / "run") == [{"task": "t", "doc_id": 1, "prediction": "a"}]
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
    assert results.config_hash({"a": 1, "b": [1, 2]}) == results.config_hash({"b": [1, 2], "a": 1})
    assert results.config_hash({"a": 1}) != results.config_hash({"a": 2})


def test_report_and_results_do_not_import_torch():
    code = "import sys, analysis.report, analysis.results; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
