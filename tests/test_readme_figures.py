"""The README's tables of the main job (relative score and executed FLOPs saved per op x start layer, and its
baseline score) and of ProxyV vs token reduction at matched FLOPs are the committed snapshots' (docs/results/
tiny-synthetic/ and tiny-synthetic-experiment=table5/, each a run in a fresh clone), cell by cell: a figure in the
README is one the code measured, not one typed in."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def snapshot_rows(sweep: str = "tiny-synthetic") -> dict[str, dict[str, str]]:
    """Variant label -> its row of the snapshot's table of runs, by column name."""
    lines = [line for line in (REPO / "docs/results" / sweep / "report.md").read_text().splitlines()
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


def test_readme_matched_flops_table_is_the_snapshots():
    """Each cell "<setting>: <relative> (<FLOPs saved>)" of the ProxyV-vs-token-reduction table is its run's."""
    snapshot = snapshot_rows("tiny-synthetic-experiment=table5")
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| FLOPs saved | ProxyV (fine-tuned) |"))
    labels = {  # a column's setting as the README writes it -> the run's label
        1: lambda s: f"proxyv L{s[1:3]}–32 (init={'learned' if 'learned' in s else 'spatial'}, reduce_factor=4)",
        2: lambda s: f"fastv L2–32 (keep={s.split()[1]})",
        3: lambda s: f"pdrop L8,16,24 (keep={s.split()[1]}, positions=renumber)",
        4: lambda s: "visionzip (contextual={1}, dominant={0})".format(*s.split(" + ")),
    }
    checked = 0
    for line in lines[start + 2:start + 4]:
        cells = [cell.strip().replace("*", "") for cell in line.strip("|").split("|")]
        for column, label_of in labels.items():
            for part in cells[column].split("; "):
                setting, relative_saved = part.split(": ")
                relative, saved = relative_saved.split(" ")
                row = snapshot[label_of(setting)]
                assert (relative, saved.strip("()")) == (row["relative"], row["FLOPs saved"]), part
                checked += 1
    assert checked == 9
