"""The report's Markdown: table cells, the table of a group and its notes, a group's section, and
:func:`write_report`, the page with its figures."""

from __future__ import annotations

from pathlib import Path

from .. import results
from .comparison import STEM as COMPARISON_STEM
from .comparison import comparison_section
from .figures import FIGURE_STEMS, write_figures
from .groups import Group, group_headings, group_records
from .summary import THRESHOLD, summary_lines
from .values import display_path, fmt, is_missing, number

REPORT_FILE = "report.md"


def task_columns(table) -> list[str]:
    return sorted(c for c in table.columns if c.startswith("score:"))


def latency_cell(row, reference: dict | None = None) -> str:
    """``median [q1–q3]`` in ms, ``†`` when the timing is noisy (see :func:`analysis.results.latency_is_noisy`),
    ``‡`` when it was taken elsewhere than the ``reference`` timing (the group's baseline's, see
    :func:`timed_elsewhere`)."""
    median = number(row["latency_ms"])
    if median is None:
        return "–"
    text = f"{median:.1f}"
    q1, q3 = number(row.get("latency_q1_ms")), number(row.get("latency_q3_ms"))
    if q1 is not None and q3 is not None:
        text += f" [{q1:.1f}–{q3:.1f}]"
    text += " †" if row.get("latency_noisy") is True else ""
    return text + (" ‡" if timed_elsewhere(row, reference) else "")


def baseline_timing(group: Group) -> dict | None:
    """Where the group's baseline was timed (:func:`analysis.results.record_latency`: host, device, threads,
    timed_on), as its record says; None without a baseline."""
    return (group.baseline or {}).get("latency")


def timed_elsewhere(row, reference: dict | None) -> bool:
    """Whether the row's timing ran on another host, device or thread count than ``reference``, judged on what both
    records say (an older record without a device is compared on host and threads): then its prefill time cannot
    be compared with the baseline's (a baseline record is reused by every later sweep)."""
    if not reference or number(row["latency_ms"]) is None:
        return False
    for field in ("host", "device", "threads"):
        mine, theirs = row.get(f"latency_{field}"), reference.get(field)
        if not is_missing(mine) and not is_missing(theirs) and mine != theirs:
            return True
    return False


def _status_cell(row, group: Group, drawn_index) -> str:
    status = row["status"] if row["status"] == "ok" else f"**{row['status']}**: {row['error'] or ''}"
    if row["label"] in group.duplicates:
        status += " · duplicate, " + ("drawn" if row.name in drawn_index else "not drawn")
    return status.replace("|", "/")


def markdown_table(group: Group) -> str:
    """One row per record of the group: variant label, layers, score per task, score, relative score,
    FLOPs saved, latency, agreement, status (duplicates marked)."""
    table = group.table
    tasks = task_columns(table)
    header = ["variant", "layers [start, end)", *[t.split(":", 1)[1] for t in tasks], "score", "relative",
              "FLOPs saved", "FLOPs saved (theor.)", "prefill ms", "agreement", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    drawn_index = set(group.drawn.index)
    reference = baseline_timing(group)
    for _, row in table.iterrows():
        cells = [row["label"], row["layer_text"], *[fmt(row[t], "{:.3f}") for t in tasks],
                 fmt(row["score"], "{:.3f}"), fmt(row["relative_score"], "{:.3f}"),
                 fmt(row["flops_reduction"], "{:.1%}"), fmt(row["theoretical_reduction"], "{:.1%}"),
                 latency_cell(row, reference), fmt(row["agreement"], "{:.3f}"), _status_cell(row, group, drawn_index)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_notes(group: Group) -> list[str]:
    """What the table's columns mean, and the group's duplicates and noisy timings."""
    notes = [("FLOPs: language-model decoder prefill, mean per evaluated sample (see `analysis/flops`); "
              "*theor.* counts only the (query, key) pairs a variant allows. Relative = score / the group's "
              "baseline score; agreement = share of answers identical to the baseline's. Prefill ms: median "
              "over the timed forwards [interquartile range] where the record has it.")]
    table = group.table
    if any(flag is True for flag in table["latency_noisy"]):
        notes.append(f"† noisy timing: interquartile range above {results.NOISY_SPREAD:.0%} of the median, or "
                     "the 1-minute load above the CPU count while timing.")
    reference = baseline_timing(group)
    elsewhere = sorted({row["latency_timed_on"] for _, row in table.iterrows() if timed_elsewhere(row, reference)})
    if elsewhere:
        notes.append(f"‡ timed elsewhere than the baseline ({reference['timed_on']}): {'; '.join(elsewhere)}. "
                     "Prefill times from another host, device or thread count are not comparable with the "
                     "baseline's; rerun those variants (or the baseline) where the other was timed to compare them.")
    states = group.code_states
    if len(states) > 1 or any(state.endswith("with local changes") for state in states):
        listed = ", ".join(f"{state} ({n})" for state, n in states.items())
        notes.append(f"Code: the finished runs of this group come from {len(states)} code state"
                     f"{'s' if len(states) != 1 else ''}: {listed}. A finished run is reused by its config hash "
                     "whatever the code, so runs from different states (or from local changes) compare only where "
                     "the code between them left what they measure unchanged; delete their run folders (and the "
                     "baseline's) to recompute them from one commit.")
    for label, count in group.duplicates.items():
        finished = [str(f) for f in table.loc[table["label"] == label, "finished_at"] if not is_missing(f)]
        notes.append(f"Duplicate: {count} records of `{label}` in this group (finished {', '.join(finished) or '?'}); "
                     "all are listed, the summary and the figures use the latest finished ok one.")
    return notes


def group_section(group: Group, out_dir: Path, suffix: str, heading: str,
                  threshold: float = THRESHOLD) -> list[str]:
    """The Markdown of one group: heading, n, summary, table, figures."""
    tasks = ", ".join(group.tasks or ()) or "as recorded"
    parts = [f"## {heading}", "",
             (f"**{group.n_text()}**; tasks: {tasks}. Only runs scored on these samples against the baseline "
              "below are compared in this section."), "",
             "### Summary", "", *summary_lines(group, threshold), "",
             "### Runs", "", markdown_table(group), ""]
    parts += [*(f"{note}" for note in table_notes(group)), ""]
    parts += write_figures(group, out_dir, suffix, threshold)
    parts += comparison_section(group, out_dir, suffix, task_columns(group.table), threshold)
    return parts


def unreadable_line(paths: list[Path]) -> str:
    names = ", ".join(f"`{display_path(p)}`" for p in paths)
    return (f"**{len(paths)} unreadable record{'s' if len(paths) != 1 else ''}**: {names} "
            "(skipped; re-running the sweep recomputes it).")


def _remove_stale_figures(out_dir: Path) -> None:
    for stale in [p for stem in (*FIGURE_STEMS, COMPARISON_STEM) for p in out_dir.glob(f"{stem}*.png")]:
        stale.unlink()  # figures of an earlier build that this one may not redraw


def write_report(root: str | Path, out_dir: str | Path | None = None, title: str | None = None,
                 threshold: float = THRESHOLD) -> Path:
    """Build ``out_dir/report.md`` and its figures from the records under ``root``; returns the report's path.

    The report holds no timestamp and names ``root`` relative to the repository (or working) directory:
    rebuilt from the same records, it is byte-identical."""
    root = Path(root)
    out_dir = Path(out_dir) if out_dir is not None else Path("reports") / root.name
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_figures(out_dir)
    unreadable: list[Path] = []
    records = results.load_records(root, unreadable=unreadable)
    groups = group_records(records)
    shown = display_path(root)
    parts = [f"# {title or f'Sweep `{root.name}`'}", "",
             (f"{len(records)} runs from `{shown}` in {len(groups)} group(s) of runs scored on the same samples "
              f"against the same baseline; built by `python -m analysis.report {shown}`."), ""]
    if unreadable:
        parts += [unreadable_line(unreadable), ""]
    if not records:
        parts.append("No result records yet.")
    for index, (group, heading) in enumerate(zip(groups, group_headings(groups))):
        suffix = "" if len(groups) == 1 else f"-{index + 1}"
        parts += group_section(group, out_dir, suffix, heading, threshold)
    return results.atomic_write_text(out_dir / REPORT_FILE, "\n".join(parts))
