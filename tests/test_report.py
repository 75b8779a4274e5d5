"""The report reads result records only: its table equals the records, runs scored on other samples or
against another baseline never share a section, duplicates are shown and never averaged, its summary
follows from the rules it states, it draws its figures (with n) without touching pyplot, it is
byte-identical when rebuilt, and neither it nor analysis.results imports torch, the runner or Hydra.
Records here are written through analysis.results with made-up numbers (a sweep of known shape);
test_runner.py runs real sweeps."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from analysis import report, results
from analysis.variant import Variant

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
SAVED = {"skip_ffn": 0.6, "skip_attn_ffn": 0.9, "drop_v2t": 0.0, "proxyv": 1.0}  # FLOPs share saved, every layer
PROXYV_PARAMS = {"init": "spatial", "reduce_factor": 4}


def _variant(op: str, start: int | None, blind: bool = False) -> Variant:
    layers = () if start is None else tuple(range(start, NUM_LAYERS))
    if op == "proxyv":
        return Variant("proxyv", op, layers, tuple(sorted(PROXYV_PARAMS.items())), blind, f"ckpt-l{start}")
    return Variant("ablation", op, layers, (), blind)


def _record(op: str, start: int | None, rel: float, key: str, status: str = "ok", *, limit: int = 2,
            base_key: str = "base", finished: str | None = None, legacy: bool = False, spread: float = 0.1) -> dict:
    """A record as the runner writes it (``legacy``: as it wrote it before variant, n_per_task, latency)."""
    base = 0.8
    layers = [] if start is None else list(range(start, NUM_LAYERS))
    fraction = len(layers) / NUM_LAYERS
    scores = {t: round(base * rel + 0.01 * i, 6) for i, t in enumerate(TASKS)}
    score = sum(scores.values()) / len(scores)
    median = 10.0 * (1 - 0.5 * SAVED.get(op, 0) * fraction)
    ok = status == "ok"
    record = {
        "status": status, "error": None if ok else "RuntimeError: boom", "config_hash": key,
        "model": "tiny", "op": op, "layers": layers, "start_layer": start,
        "end_layer": NUM_LAYERS if layers else None, "num_layers": NUM_LAYERS, "eval": "synthetic",
        "blind": False, "scores": scores if ok else None, "score": score if ok else None,
        "relative_score": rel if ok else None,
        "flops": {"total": 1e9 * (1 - SAVED.get(op, 0) * fraction), "baseline": 1e9,
                  "reduction": SAVED.get(op, 0) * fraction, "theoretical_reduction": SAVED.get(op, 0.05) * fraction},
        "latency_ms": median, "agreement": min(1.0, rel),
        "n_samples": limit * len(TASKS), "finished_at": finished or f"2026-01-01T00:00:{len(layers):02d}+00:00",
    }
    if legacy:
        return record if ok else {k: v for k, v in record.items() if k not in ("scores", "score", "relative_score")}
    record.update(tasks=list(TASKS), limit=limit, seed=0, variant=_variant(op, start).to_record(),
                  n_per_task={t: limit for t in TASKS},
                  latency={"median_ms": median, "q1_ms": median * (1 - spread / 2), "q3_ms": median * (1 + spread / 2),
                           "min_ms": median * 0.9, "max_ms": median * 1.2, "n": 8, "warmup": 1, "threads": 1,
                           "load_1min": 0.5, "cpus": 2})
    if op == "none":
        record["baseline"] = None  # a baseline record names no baseline: its own hash is the reference
    elif ok:
        record["baseline"] = {"score": 0.815, "scores": {}, "latency_ms": 10.0, "config_hash": base_key,
                              "path": f"../baselines/{base_key}/result.json"}
    else:  # the runner records a failed run without its baseline
        record.pop("n_per_task")
    return record


def _write_sweep(root: Path, legacy: bool = False) -> Path:
    results.write_record(root / "none", _record("none", None, 1.0, "base", legacy=legacy))
    for op, by_start in RELATIVE.items():
        for start, rel in by_start.items():
            results.write_record(root / f"{op}_{start}", _record(op, start, rel, f"{op}{start}", legacy=legacy),
                                 [{"task": "synth_ocrbench", "doc_id": 0, "prediction": "x", "score": 1.0}])
    results.write_record(root / "failed", _record("skip_attn", 8, 0, "bad", status="failed", legacy=legacy))
    return root


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    return _write_sweep(tmp_path_factory.mktemp("runs") / "tiny-synthetic")


@pytest.fixture(scope="module")
def built(sweep, tmp_path_factory) -> Path:
    return report.write_report(sweep, tmp_path_factory.mktemp("reports") / "tiny-synthetic")


def _markdown_rows(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, [c.strip() for c in line.strip("|").split("|")])) for line in lines[2:]
            if not line.startswith("| variant")]


def _sections(text: str) -> dict[str, str]:
    """Markdown of each ``## `` section, by heading."""
    chunks = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    return {chunk.split("\n", 1)[0]: chunk for chunk in chunks}


def test_report_table_equals_records(sweep, built):
    rows = _markdown_rows(built.read_text())
    records = results.load_records(sweep)
    assert len(rows) == len(records) == 1 + 12 + 1
    by_key = {(r["variant"], r["layers [start, end)"]): r for r in rows}
    for record in records:
        layers = record["layers"]
        row = by_key[(record["variant"]["label"], record["variant"]["layer_text"])]
        assert row["layers [start, end)"] == (f"{layers[0]}–{layers[-1] + 1}" if layers else "–")
        if record["status"] != "ok":
            assert row["status"].startswith("**failed**") and "boom" in row["status"]
            continue
        assert row["status"] == "ok"
        for task in TASKS:
            assert float(row[task]) == pytest.approx(record["scores"][task], abs=5e-4)
        assert float(row["score"]) == pytest.approx(record["score"], abs=5e-4)
        assert float(row["relative"]) == pytest.approx(record["relative_score"], abs=5e-4)
        assert float(row["FLOPs saved"].rstrip("%")) == pytest.approx(100 * record["flops"]["reduction"], abs=0.051)
        median, iqr = re.fullmatch(r"([\d.]+) \[([\d.]+–[\d.]+)\]", row["prefill ms"]).groups()
        assert float(median) == pytest.approx(record["latency"]["median_ms"], abs=0.051)
        assert [float(x) for x in iqr.split("–")] == pytest.approx(
            [record["latency"]["q1_ms"], record["latency"]["q3_ms"]], abs=0.051)
        assert float(row["agreement"]) == pytest.approx(record["agreement"], abs=5e-4)


def test_report_figures_and_summary(built):
    text = built.read_text()
    for name in ("pareto.png", "heatmap.png", "mask_ratio.png"):
        assert (built.parent / name).stat().st_size > 5_000
        assert f"]({name})" in text
    assert re.search(r"`skip_ffn`: from layer \*\*8\*\* on", text)
    assert re.search(r"`skip_attn_ffn`: from layer \*\*24\*\* on", text)
    assert re.search(r"`drop_v2t`: from layer \*\*24\*\* on", text)  # 16 dips below 0.99, so 8 is not safe
    assert "keeping ≥ 99%: 8, 24." in text  # ... though 8 itself keeps it
    assert "ProxyV can start" in text and "1 run(s) failed" in text
    assert "n = 2 samples per task × 4 tasks = 8 samples" in text
    assert len(_sections(text)) == 1  # the failed run (no baseline named) joins the one group of its samples


def test_earliest_safe_start_and_pareto():
    table = results.records_table([_record("skip_ffn", s, r, str(s)) for s, r in RELATIVE["skip_ffn"].items()])
    assert report.earliest_safe_start(table)["skip_ffn"]["start_layer"] == 8
    assert report.earliest_safe_start(table, threshold=1.0)["skip_ffn"]["start_layer"] == 16
    assert report.earliest_safe_start(table, threshold=1.01)["skip_ffn"] is None
    points = [(0.0, 1.0), (0.2, 0.99), (0.1, 0.95), (0.5, 0.5), (0.4, 0.3)]
    assert report.pareto_front(points) == [0, 1, 3]


def test_report_cli(sweep, tmp_path):
    assert report.main([str(sweep), "--out", str(tmp_path / "r"), "--threshold", "0.9"]) == 0
    assert "`skip_attn_ffn`: from layer **16** on" in (tmp_path / "r" / "report.md").read_text()
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


# ----------------------------------------------------------------------------- groups

MIXED = {10: {"skip_ffn": {16: 1.015, 24: 1.0}, "drop_v2t": {16: 0.98, 24: 1.0}},
         50: {"skip_ffn": {16: 0.966, 24: 0.995}, "drop_v2t": {16: 0.90, 24: 0.99}}}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, Path]:
    """The same variants at limit 10 and 50, each against its own baseline."""
    root = tmp_path_factory.mktemp("mixed") / "sweep"
    for limit, by_op in MIXED.items():
        results.write_record(root / f"none_{limit}", _record("none", None, 1.0, f"base{limit}", limit=limit))
        for op, by_start in by_op.items():
            for start, rel in by_start.items():
                results.write_record(root / f"{op}_{start}_{limit}",
                                     _record(op, start, rel, f"{op}{start}n{limit}", limit=limit,
                                             base_key=f"base{limit}"))
    return root, report.write_report(root, tmp_path_factory.mktemp("mixed-report"))


def test_mixed_limits_are_separate_groups(mixed):
    root, built = mixed
    groups = report.group_records(results.load_records(root))
    assert [(g.limit, g.baseline_hash, len(g.records)) for g in groups] == [(10, "base10", 5), (50, "base50", 5)]
    for group in groups:
        assert set(group.table["limit"]) == {group.limit} and group.baseline["config_hash"] == f"base{group.limit}"
        grid = report.heatmap_grid(group)  # one run per cell: the numbers of this limit, nothing averaged
        assert grid.loc["skip_ffn", 16] == MIXED[group.limit]["skip_ffn"][16]
    text = built.read_text()
    sections = _sections(text)
    assert list(sections) == ["tiny on synthetic, limit 10, seed 0", "tiny on synthetic, limit 50, seed 0"]
    for (heading, body), limit, suffix in zip(sections.items(), (10, 50), ("-1", "-2")):
        assert f"n = {limit} samples per task × 4 tasks = {4 * limit} samples" in body
        assert f"Baseline `base{limit}`" in body and f"base{60 - limit}" not in body
        rows = _markdown_rows(body)
        assert len(rows) == 5 and {r["variant"] for r in rows} == {"none", "skip_ffn L16–32", "skip_ffn L24–32",
                                                                   "drop_v2t L16–32", "drop_v2t L24–32"}
        for stem in report.FIGURE_STEMS:
            assert f"]({stem}{suffix}.png)" in body and (built.parent / f"{stem}{suffix}.png").exists()
        captions = [line for line in body.splitlines() if line.startswith("*n = ")]
        assert len(captions) == 3 and all(f"= {4 * limit} samples" in c for c in captions)
    skip16 = [r["relative"] for r in _markdown_rows(text) if r["variant"] == "skip_ffn L16–32"]
    assert skip16 == ["1.015", "0.966"]  # never their mean (0.99)
    assert "`skip_ffn`: from layer **16** on" in sections["tiny on synthetic, limit 10, seed 0"]
    assert "`skip_ffn`: from layer **24** on" in sections["tiny on synthetic, limit 50, seed 0"]


def test_another_baseline_is_another_group(tmp_path):
    """A retrained model (same name, samples and settings) has another baseline hash: its own group."""
    root = tmp_path / "runs"
    for base in ("old", "new"):
        results.write_record(root / f"none_{base}", _record("none", None, 1.0, base))
        results.write_record(root / f"skip_{base}", _record("skip_ffn", 16, 0.9, f"s{base}", base_key=base))
    groups = report.group_records(results.load_records(root))
    assert sorted(g.baseline_hash for g in groups) == ["new", "old"] and all(len(g.records) == 2 for g in groups)
    headings = report.group_headings(groups)
    assert len(set(headings)) == 2 and all("baseline `" in h for h in headings)


def test_summary_states_consistent_rules(tmp_path):
    """ProxyV keeps >= 99% at 16 but not at the later 24: it has no safe start, and the largest saving
    among the runs that keep >= 99% may still be ProxyV at 16 -- both sentences say which rule they use."""
    root = tmp_path / "runs"
    results.write_record(root / "none", _record("none", None, 1.0, "base"))
    results.write_record(root / "p16", _record("proxyv", 16, 1.002, "p16"))
    results.write_record(root / "p24", _record("proxyv", 24, 0.98, "p24"))
    results.write_record(root / "f16", _record("skip_ffn", 16, 0.995, "f16"))
    results.write_record(root / "f24", _record("skip_ffn", 24, 1.0, "f24"))
    text = report.write_report(root, tmp_path / "out").read_text()
    series = "proxyv (init=spatial, reduce_factor=4)"
    assert (f"`{series}`: no start from which every later tested start keeps ≥ 99% (the latest, 24, has relative "
            "0.980); tested starts: 16, 24; keeping ≥ 99%: 16.") in text
    assert "Largest executed-FLOPs saving among the runs that keep ≥ 99% (any layers): " \
           "`proxyv L16–32 (init=spatial, reduce_factor=4)` (50.0% saved, relative 1.002)." in text
    assert "`skip_ffn`: from layer **16** on, every tested start keeps ≥ 99%" in text
    assert "Rule: a start layer *keeps* the score" in text
    # the chosen row is one the per-variant lines list as keeping the threshold
    group = report.group_records(results.load_records(root))[0]
    best = report.largest_saving_keeping(group.table)
    assert int(best["start_layer"]) in report.start_layer_findings(group.table)[best["series"]]["keeping"]


def test_duplicates_are_listed_and_the_latest_drawn(tmp_path):
    root = tmp_path / "runs"
    results.write_record(root / "none", _record("none", None, 1.0, "base"))
    results.write_record(root / "a", _record("skip_ffn", 16, 0.95, "hashA", finished="2026-01-01T00:00:00+00:00"))
    results.write_record(root / "b", _record("skip_ffn", 16, 1.01, "hashB", finished="2026-01-02T00:00:00+00:00"))
    results.write_record(root / "c", _record("skip_ffn", 24, 1.0, "hashC"))
    built = report.write_report(root, tmp_path / "out")
    text = built.read_text()
    rows = [r for r in _markdown_rows(text) if r["variant"] == "skip_ffn L16–32"]
    assert [(r["relative"], r["status"]) for r in rows] == [("0.950", "ok · duplicate, not drawn"),
                                                            ("1.010", "ok · duplicate, drawn")]
    assert "Duplicate: 2 records of `skip_ffn L16–32` in this group" in text
    assert text.count("Duplicate records (`skip_ffn L16–32` ×2): the latest finished ok one of each is drawn.") == 3
    group = report.group_records(results.load_records(root))[0]
    assert report.heatmap_grid(group).loc["skip_ffn", 16] == 1.01  # the latest, not the mean 0.98
    assert "`skip_ffn`: from layer **16** on" in text


def test_a_method_has_one_colour_in_every_group_and_figure(tmp_path):
    """Two groups with different methods: ``skip_ffn`` has the same colour in both, in every figure (the
    variant registry's order, not the group's); a method the registry does not know comes after its methods."""
    import matplotlib

    from analysis.variant import methods

    root = tmp_path / "runs"
    for limit, ops in ((2, ("drop_v2t", "skip_ffn")), (4, ("skip_attn", "proxyv", "skip_ffn"))):
        results.write_record(root / f"none_{limit}", _record("none", None, 1.0, f"base{limit}", limit=limit))
        for op in ops:
            for start in (16, 24):
                results.write_record(root / f"{op}_{start}_{limit}", _record(op, start, 1.0, f"{op}{start}n{limit}",
                                                                             limit=limit, base_key=f"base{limit}"))
    groups = report.group_records(results.load_records(root))
    assert [set(g.table["method"]) for g in groups] == [{"none", "drop_v2t", "skip_ffn"},
                                                        {"none", "skip_attn", "proxyv", "skip_ffn"}]
    colors = [report.group_colors(g) for g in groups]
    assert colors[0]["skip_ffn"] == colors[1]["skip_ffn"] and colors[0]["none"] == colors[1]["none"]
    for group, color in zip(groups, colors):
        fig = report.new_figure(6, 4)
        report.draw_pareto(fig, group)
        drawn = {c.get_label(): tuple(c.get_facecolor()[0]) for ax in fig.axes for c in ax.collections
                 if not c.get_label().startswith("_")}
        assert drawn["skip_ffn"] == pytest.approx(color["skip_ffn"])
        fig = report.new_figure(6, 4)
        report.draw_mask_ratio(fig, group)
        line = next(line for line in fig.axes[0].lines if line.get_label() == "skip_ffn")
        assert matplotlib.colors.to_rgba(line.get_color()) == pytest.approx(color["skip_ffn"])
        # the baseline is its own point; a series joins its measured points only (one start layer: one marker)
        lines = {line.get_label(): line for line in fig.axes[0].lines if not line.get_label().startswith("_")}
        assert list(lines.pop("baseline").get_xdata()) == [0.0]
        measured = report.through_end(group.table).groupby("series").size()
        assert {label: len(line.get_xdata()) for label, line in lines.items()} == measured.to_dict()
        assert all(0.0 not in list(line.get_xdata()) for line in lines.values())
    cmap, known = matplotlib.colormaps["tab10"], list(methods())
    unknown = report.method_colors(["zz_gone", "skip_ffn", "aa_gone"])
    assert list(unknown) == ["skip_ffn", "aa_gone", "zz_gone"]
    assert unknown["aa_gone"] == cmap(len(known) % 10) and unknown["skip_ffn"] == cmap(known.index("skip_ffn"))


# ----------------------------------------------------------------------------- files

def test_corrupt_record_is_named_once(tmp_path, caplog):
    root = _write_sweep(tmp_path / "runs")
    bad = root / "skip_ffn_16" / results.RESULT_FILE
    bad.write_text(bad.read_text()[:100])  # truncated
    assert results.read_record(bad) is None
    with caplog.at_level(logging.WARNING):
        built = report.write_report(root, tmp_path / "out")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("analysis")]
    assert len(warnings) == 1 and str(bad) in warnings[0].getMessage()
    text = built.read_text()
    assert f"**1 unreadable record**: `{report.display_path(bad)}`" in text
    assert "skip_ffn L16–32" not in text


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_get_the_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert results.current_umask() == umask
        run = tmp_path / "runs" / "none"
        results.write_record(run, _record("none", None, 1.0, "base"), [{"task": "t", "doc_id": 0}])
        results.write_record(tmp_path / "runs" / "f16", _record("skip_ffn", 16, 1.0, "f16"))
        built = report.write_report(tmp_path / "runs", tmp_path / "out")
    finally:
        os.umask(old)
    for path in (run / results.RESULT_FILE, run / results.SAMPLES_FILE, built, built.parent / "pareto.png"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_report_is_byte_identical_when_rebuilt(sweep, built, tmp_path):
    first = built.read_bytes()
    again = report.write_report(sweep, built.parent)
    assert again.read_bytes() == first
    elsewhere = report.write_report(sweep, tmp_path / "elsewhere")
    assert elsewhere.read_bytes() == first
    assert not re.search(rb"\d{4}-\d\d-\d\dT\d\d:\d\d", first)  # no timestamp
    assert (tmp_path / "elsewhere" / "pareto.png").read_bytes() == (built.parent / "pareto.png").read_bytes()


def test_report_names_runs_relative_to_the_repository(tmp_path):
    assert report.display_path(REPO / "runs" / "tiny-synthetic") == "runs/tiny-synthetic"
    assert report.display_path(tmp_path) == str(tmp_path)


def test_figures_state_n_and_mark_mask_only_runs(sweep):
    group = report.group_records(results.load_records(sweep))[0]
    for draw in (report.draw_pareto, report.draw_heatmap, report.draw_mask_ratio):
        fig = report.new_figure(6, 4)
        assert draw(fig, group)
        assert "n = 2/task × 4 tasks = 8" in fig._suptitle.get_text()
    fig = report.new_figure(6, 4)
    report.draw_pareto(fig, group)
    strip, main = fig.axes
    assert "0% executed FLOPs saved" in strip.get_title()
    assert sorted(t.get_text() for t in strip.texts) == ["0", "16", "24", "8"]  # drop_v2t, by start layer
    assert any(t.get_text() == "99% of baseline" for t in main.texts)


def test_legacy_records_report(tmp_path):
    """Records written before ``variant``, ``n_per_task``, ``latency`` and ``baseline``: one group, labels
    built from op and layers, latency as the plain median."""
    root = _write_sweep(tmp_path / "runs", legacy=True)
    built = report.write_report(root, tmp_path / "out")
    text = built.read_text()
    rows = _markdown_rows(text)
    assert len(_sections(text)) == 1 and len(rows) == 14
    assert {r["variant"] for r in rows} >= {"none", "skip_ffn L8–32", "skip_attn L8–32"}
    assert next(r for r in rows if r["variant"] == "none")["prefill ms"] == "10.0"
    assert "n = 8 samples in total" in text and "`skip_ffn`: from layer **8** on" in text


def test_noisy_latency_is_marked(tmp_path):
    root = tmp_path / "runs"
    results.write_record(root / "none", _record("none", None, 1.0, "base"))
    results.write_record(root / "f16", _record("skip_ffn", 16, 1.0, "f16", spread=0.4))
    loaded = _record("skip_ffn", 24, 1.0, "f24")
    loaded["latency"]["load_1min"] = 3.5  # above its 2 CPUs
    results.write_record(root / "f24", loaded)
    text = report.write_report(root, tmp_path / "out").read_text()
    cells = {r["variant"]: r["prefill ms"] for r in _markdown_rows(text)}
    assert cells["skip_ffn L16–32"].endswith(" †") and cells["skip_ffn L24–32"].endswith(" †")
    assert not cells["none"].endswith("†") and "† noisy timing" in text


def test_latency_timed_elsewhere_than_the_baseline_is_marked(tmp_path):
    """A baseline record is reused by every later sweep: a variant timed on another host, device or thread count is
    marked, with where each was timed; timings taken alike are not."""
    root = tmp_path / "runs"
    alike = {"hostname": "box", "device": "cpu", "threads": 2}

    def timed(record, hostname, device, threads):
        record["hostname"] = hostname
        record["latency"].update(device=device, threads=threads)
        return record

    results.write_record(root / "none", timed(_record("none", None, 1.0, "base"), *alike.values()))
    results.write_record(root / "f16", timed(_record("skip_ffn", 16, 1.0, "f16"), *alike.values()))
    results.write_record(root / "f24", timed(_record("skip_ffn", 24, 1.0, "f24"), "box", "cuda:0 (NVIDIA H100)", 2))
    results.write_record(root / "a24", timed(_record("skip_attn", 24, 1.0, "a24"), "other", "cpu", 2))
    results.write_record(root / "a16", timed(_record("skip_attn", 16, 1.0, "a16"), "box", "cpu", 16))
    text = report.write_report(root, tmp_path / "out").read_text()
    cells = {r["variant"]: r["prefill ms"] for r in _markdown_rows(text)}
    assert not cells["none"].endswith("‡") and not cells["skip_ffn L16–32"].endswith("‡")
    for label in ("skip_ffn L24–32", "skip_attn L24–32", "skip_attn L16–32"):
        assert cells[label].endswith(" ‡"), label
    assert ("‡ timed elsewhere than the baseline (box · cpu · 2 threads): box · cpu · 16 threads; "
            "box · cuda:0 (NVIDIA H100) · 2 threads; other · cpu · 2 threads.") in text
    assert "prefill 10.0 ms (timed on box · cpu · 2 threads)." in text


def test_latency_is_compared_on_what_both_records_say(tmp_path):
    root = tmp_path / "runs"  # a baseline recorded before timings named their device, reused by a newer sweep
    old_baseline = _record("none", None, 1.0, "base")
    old_baseline["hostname"] = "box"
    results.write_record(root / "none", old_baseline)
    same_box = _record("skip_ffn", 16, 1.0, "f16")
    same_box["hostname"] = "box"
    same_box["latency"]["device"] = "cpu"
    results.write_record(root / "f16", same_box)
    results.write_record(root / "f24", _record("skip_ffn", 24, 1.0, "f24"))  # says no host: nothing to compare
    text = report.write_report(root, tmp_path / "out").read_text()
    assert "‡" not in text


def test_runs_from_different_code_are_named(tmp_path):
    """Runs are reused by config hash whatever the code: a group whose finished runs come from more than one
    commit, or from a tree with local changes, says which and how many; runs from one clean commit say nothing."""
    root = tmp_path / "runs"

    def at(record, commit, dirty=False):
        return {**record, "git_commit": commit, "git_dirty": dirty}

    results.write_record(root / "none", at(_record("none", None, 1.0, "base"), "a" * 40))
    results.write_record(root / "f16", at(_record("skip_ffn", 16, 1.0, "f16"), "a" * 40))
    results.write_record(root / "bad", at(_record("skip_attn", 8, 0, "bad", status="failed"), "c" * 40))
    clean = report.write_report(root, tmp_path / "one").read_text()
    assert "code state" not in clean  # a failed run's code compares nothing
    results.write_record(root / "f24", at(_record("skip_ffn", 24, 1.0, "f24"), "b" * 40))
    results.write_record(root / "a24", at(_record("skip_attn", 24, 1.0, "a24"), "b" * 40, dirty=True))
    results.write_record(root / "a16", _record("skip_attn", 16, 1.0, "a16"))  # an older record: no commit
    text = report.write_report(root, tmp_path / "mixed").read_text()
    assert (f"Code: the finished runs of this group come from 4 code states: `{'a' * 10}` (2), `{'b' * 10}` (1), "
            f"`{'b' * 10}` with local changes (1), unrecorded (1).") in text
    results.write_record(root / "solo", at(_record("none", None, 1.0, "base"), "d" * 40, dirty=True))
    dirty = report.write_report(root / "solo", tmp_path / "dirty").read_text()
    assert f"1 code state: `{'d' * 10}` with local changes (1)." in dirty


def test_report_and_results_do_not_import_torch(tmp_path):
    """Importing and running the report imports no torch, runner, sweep glue, Hydra or lmms-eval, nor
    pyplot, and leaves matplotlib's backend as the user set it."""
    _write_sweep(tmp_path / "runs", legacy=True)
    heavy = ["torch", "analysis.runner", "analysis.sweep", "lmms_eval", "hydra", "matplotlib.pyplot"]
    code = (
        "import sys, analysis.report, analysis.results\n"
        f"heavy = {heavy!r}\n"
        "assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]\n"
        f"analysis.report.write_report({str(tmp_path / 'runs')!r}, {str(tmp_path / 'out')!r})\n"
        "assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]\n"
        "import matplotlib\n"
        "assert matplotlib.rcParams['backend'] == 'svg', matplotlib.rcParams['backend']\n"
        "print('ok')\n"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
                         check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def _variant_record(variant, rel: float, saved: float, key: str, docvqa: float | None = None) -> dict:
    """A finished record of ``variant`` (an analysis.variant.Variant) against baseline 'base0' (score 0.8)."""
    scores = {t: 0.8 * rel for t in TASKS}
    if docvqa is not None:
        scores["synth_docvqa"] = docvqa
    score = sum(scores.values()) / len(scores)
    return {"status": "ok", "config_hash": key, "model": "tiny", "op": variant.method, "layers": list(variant.layers),
            "num_layers": NUM_LAYERS, "eval": "synthetic", "tasks": list(TASKS), "limit": 50, "seed": 0,
            "blind": False, "scores": scores, "score": score, "relative_score": score / 0.8,
            "baseline": {"config_hash": "base0", "score": 0.8}, "variant": variant.to_record(),
            "flops": {"total": 1e9 * (1 - saved), "baseline": 1e9, "reduction": saved, "theoretical_reduction": saved},
            "n_samples": 200, "n_per_task": {t: 50 for t in TASKS}, "finished_at": "2026-01-01T00:00:00+00:00"}


def test_proxyv_vs_token_reduction_section(tmp_path):
    from analysis.variant import baseline, resolve_variant

    root = tmp_path / "runs" / "table5"
    base = _variant_record(baseline(), 1.0, 0.0, "base0")
    base.pop("baseline")
    results.write_record(root / "none", base)
    proxyv = resolve_variant("proxyv", NUM_LAYERS, start_layer=16, params={"reduce_factor": 4, "init": "learned"},
                             checkpoint="checkpoints/ckpt-L16-learned")
    results.write_record(root / "p16", _variant_record(proxyv, 1.0, 0.225, "p16"))
    fastv = resolve_variant("fastv", NUM_LAYERS, start_layer=2, params={"keep": 0.25})
    results.write_record(root / "fastv", _variant_record(fastv, 0.95, 0.24, "fv", docvqa=0.5))
    pdrop = resolve_variant("pdrop", NUM_LAYERS, params={"keep": 0.5})
    results.write_record(root / "pdrop", _variant_record(pdrop, 0.9, 0.40, "pd"))
    # ProxyV + reduction: on the checkpoint above, and on another one (same label without its checkpoint)
    on = dict(params={"keep": 0.25, "proxyv": 16})
    combined = resolve_variant("fastv", NUM_LAYERS, start_layer=2, checkpoint="checkpoints/ckpt-L16-learned", **on)
    tuned = resolve_variant("fastv", NUM_LAYERS, start_layer=2, checkpoint="checkpoints/ckpt-L16-tuned", **on)
    assert combined.label == "fastv L2–32 (keep=0.25, proxyv=16) on ckpt-L16-learned" != tuned.label
    results.write_record(root / "combined", _variant_record(combined, 0.5, 0.35, "c1"))
    results.write_record(root / "tuned", _variant_record(tuned, 0.7, 0.35, "c2"))
    out = tmp_path / "report"
    text = report.write_report(root, out).read_text()
    section = text.split("### ProxyV vs token reduction at matched FLOPs", 1)[1]
    assert (out / "proxyv_vs_reduction.png").exists()
    # the matched pair (22.5% vs 24.0%: within 5 points) is compared; pdrop (40%) is not matched to it
    line = next(l for l in section.splitlines() if l.startswith("- `proxyv L16–32"))
    assert "`fastv L2–32 (keep=0.25)` (24.0% saved) keeps" in line and "pdrop" not in line
    assert "largest per-twin gap: synth_docvqa 0.500 vs 0.800" in line
    assert "ProxyV's relative score is higher than that of 1 of the 1 matched run(s)" in line
    rows = [l for l in section.splitlines() if l.startswith("| ") and "variant" not in l]
    assert [r.split(" | ")[1] for r in rows] == ["baseline", "proxyv", "reduction", "reduction",
                                                 "proxyv + reduction", "proxyv + reduction"]
    assert "(35.0% saved) keeps" not in line  # combined runs are never the matched token reduction
    combined_line = next(l for l in section.splitlines() if l.startswith(f"- `{combined.label}`"))
    assert ("saves 35.0% and keeps 0.500; the same checkpoint alone (`proxyv L16–32 (init=learned, reduce_factor=4)`)"
            " saves 22.5% and keeps 1.000: the reduction on top saves 12.5 more points of FLOPs at −0.500") \
        in combined_line
    assert f"- `{tuned.label}` saves 35.0% and keeps 0.700; its checkpoint has no run without" in section
    assert "squares: token reduction on a checkpoint" in section and "duplicate" not in text.lower()
    # a group without token-reduction runs has no such section
    results.write_record(tmp_path / "plain" / "none", base)
    results.write_record(tmp_path / "plain" / "p16", _variant_record(proxyv, 1.0, 0.225, "p16"))
    assert "ProxyV vs token reduction" not in report.write_report(tmp_path / "plain", tmp_path / "r2").read_text()
