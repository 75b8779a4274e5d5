"""The README's table of the main job (relative score and executed FLOPs saved per op x start layer) and its
baseline score are the committed snapshot's (docs/results/tiny-synthetic/report.md, the main job as a fresh clone
runs it), cell by cell: a figure in the README is one the code measured, not one typed in."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def snapshot_rows() -> dict[str, dict[str, str]]:
    """Variant label -> its row of the snapshot's table, by column name."""
    lines = [line for line in (REPO / "docs/results/tiny-synthetic/report.md").read_text().splitlines()
             if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == len(header) and cells[0] != header[0]:
            rows[cells[0]] = dict(zip(header, cells))
    return rows


def readme_table() -> tuple[list[str], list[list[str]]]:
    """The README's op x start-layer table: its op columns and its rows of cells."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| start layer | mask_v2v |"))
    ops = [cell.strip() for cell in lines[start].strip("|").split("|")][1:]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().replace("*", "") for cell in line.strip("|").split("|")])
    return ops, rows


def test_readme_op_table_is_the_snapshots():
    snapshot = snapshot_rows()
    ops, rows = readme_table()
    assert ops == ["mask_v2v", "skip_attn", "skip_ffn", "skip_attn_ffn", "drop_v2t"] and len(rows) >= 7
    for start, *cells in rows:
        for op, cell in zip(ops, cells):
            row = snapshot[f"{op} L{start}–32"]
            relative, _, saved = cell.partition(" ")
            assert relative == row["relative"], (op, start)
            if saved:  # "(36%)": the executed FLOPs saved, rounded to a whole percent
                assert float(saved.strip("()%")) == round(float(row["FLOPs saved"].rstrip("%"))), (op, start)
            else:  # no executed FLOPs saved: mask-only ops
                assert row["FLOPs saved"] == "0.0%", (op, start)


def test_readme_baseline_score_is_the_snapshots():
    baseline = snapshot_rows()["none"]["score"]
    text = (REPO / "README.md").read_text()
    assert re.search(rf"Relative score \(score / baseline {re.escape(baseline)}\)", text)
