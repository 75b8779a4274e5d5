"""The sweep report: a Markdown page with PNG figures, built from result records only.

    python -m analysis.report runs/tiny-synthetic            # -> reports/tiny-synthetic/report.md
    python -m analysis.report runs/tiny-synthetic --out /tmp/r --threshold 0.98

Written at the end of every multirun by :class:`analysis.sweep.SweepReportCallback` (a Hydra
callback) and on demand by the command above. It reads ``result.json`` files through
:mod:`analysis.results` and imports neither torch, nor the runner, nor Hydra.

Runs scored on different samples are never compared: records are split into **groups** (see
:func:`group_records`) that share model, eval, tasks, limit, blind, seed *and* the baseline record
their relative scores were computed against. Per group the report states n (samples per task and in
total) and shows:

* a generated summary, each sentence following from the rule it states (the group's own baseline;
  per variant the tested start layers that keep >= 99% relative score and the earliest start from
  which every later tested start does; the largest FLOPs saving among the runs that keep >= 99%);
* a table of runs, named by variant label: score per task, score, relative score, FLOPs reduction
  (executed and theoretical), prefill latency (median [IQR], noisy timings marked), agreement with
  the baseline's answers, status; two records of one variant are both shown, marked as duplicates;
* ``pareto.png``: relative score vs FLOPs saved, the Pareto front marked, mask-only variants (no
  executed FLOPs saved) in a strip of their own;
* ``heatmap.png``: relative score per variant x start layer (runs that ablate through the last layer);
* ``mask_ratio.png``: relative score vs the fraction of final layers ablated (the paper's Figure 2).

Figures and summary use one record per variant (the latest finished ``ok`` one), never an average.
Figures are drawn on :class:`matplotlib.figure.Figure` objects: the report never touches pyplot or
the backend, and a notebook can draw the same figures into its own (inline) pyplot figures.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from . import results

log = logging.getLogger("analysis.report")
THRESHOLD = 0.99
REPORT_FILE = "report.md"
FIGURE_DPI = 120
FIGURE_STEMS = ("pareto", "heatmap", "mask_ratio")


# ----------------------------------------------------------------------------- values

def _num(value) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _f(value, pattern: str, missing: str = "–") -> str:
    value = _num(value)
    return missing if value is None else pattern.format(value)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def display_path(path: str | Path) -> str:
    """``path`` relative to the repository root, else to the working directory, else as given: a report
    regenerated elsewhere names its runs the same way."""
    path = Path(path)
    resolved = path.resolve()
    for base in (results.REPO_ROOT, Path.cwd()):
        try:
            return resolved.relative_to(base.resolve()).as_posix() or "."
        except ValueError:
            continue
    return str(path)


# ----------------------------------------------------------------------------- groups

@dataclass
class Group:
    """Runs scored on the same samples against the same baseline record: the only runs a table, a
    figure, a Pareto front or a summary compares. ``records`` in report order, duplicates included."""

    model: str | None
    eval: str | None
    tasks: tuple | None
    limit: int | None
    blind: bool
    seed: int | None
    baseline_hash: str | None
    records: list[dict]

    @property
    def key(self) -> tuple:
        return (self.model, self.eval, self.tasks, self.limit, self.blind, self.seed, self.baseline_hash)

    @cached_property
    def table(self):
        """Every record of the group (:func:`analysis.results.records_table`), duplicates included."""
        return results.records_table(self.records)

    @cached_property
    def drawn(self):
        """The rows the summary and the figures use: per variant label the latest finished ``ok`` record."""
        return latest_per_label(self.table)

    @cached_property
    def duplicates(self) -> dict[str, int]:
        """Variant label -> number of records, for labels with more than one record in the group."""
        return duplicate_labels(self.table)

    @property
    def title(self) -> str:
        text = f"{self.model} on {self.eval}" + (" (blind)" if self.blind else "")
        if self.limit is not None:
            text += f", limit {self.limit}"
        if self.seed is not None:
            text += f", seed {self.seed}"
        return text

    @cached_property
    def baseline(self) -> dict | None:
        """The baseline the group's relative scores use (see :func:`group_baseline`)."""
        return group_baseline(self.records, self.baseline_hash)

    @cached_property
    def samples(self) -> dict:
        """n of the group (see :func:`group_samples`)."""
        return group_samples(self.records, self.baseline)

    def n_text(self, short: bool = False) -> str:
        return samples_text(self.samples, short=short)


def group_records(records: list[dict]) -> list[Group]:
    """Split records into :class:`Group` s by the group key: model, eval, tasks, limit, blind, seed (what
    decides the samples, :func:`analysis.results.sample_key`) and the baseline record the relative scores
    were computed against (:func:`analysis.results.baseline_hash`; a retrained model has another).

    A record that names no baseline (a failed run) joins the one group with its samples, if there is
    exactly one; otherwise it forms a group of its own ("baseline unknown")."""
    keyed: dict[tuple, list[dict]] = {}
    for record in records:
        keyed.setdefault((*results.sample_key(record), results.baseline_hash(record)), []).append(record)
    for key in [k for k in keyed if k[-1] is None]:
        homes = [k for k in keyed if k[:-1] == key[:-1] and k[-1] is not None]
        if len(homes) == 1:
            keyed[homes[0]] += keyed.pop(key)
    ordered = sorted(keyed, key=_group_order)
    return [Group(*key, records=sorted(keyed[key], key=_record_order)) for key in ordered]


def _group_order(key: tuple):
    return tuple((value is None, value if isinstance(value, (int, float)) else str(value)) for value in key)


def _record_order(record: dict):
    return (results.sort_key(record), record.get("finished_at") or "", record.get("path") or "")


def group_baseline(records: list[dict], baseline_hash: str | None) -> dict | None:
    """The baseline of a group: its own record when the group holds it (``found``: True), else what the
    variants' records say of it (``baseline``: score, scores, latency, path); None if neither."""
    own = [r for r in records if baseline_hash and r.get("config_hash") == baseline_hash and r.get("status") == "ok"]
    if own:
        r = own[-1]
        return {"config_hash": baseline_hash, "path": r.get("path"), "score": r.get("score"),
                "scores": r.get("scores") or {}, "latency": results.record_latency(r), "found": True}
    for r in records:
        ref = r.get("baseline")
        if isinstance(ref, dict) and ref.get("config_hash") == baseline_hash and baseline_hash:
            return {"config_hash": baseline_hash, "path": ref.get("path"), "score": ref.get("score"),
                    "scores": ref.get("scores") or {}, "latency": results.record_latency(ref), "found": False}
    return None


def group_samples(records: list[dict], baseline: dict | None = None) -> dict:
    """n of a group: ``per_task`` ({task: samples}, None if the records do not say), ``total``, ``limit``,
    ``tasks`` and ``differing`` (labels of ok runs whose n is not the group's)."""
    ok = [r for r in records if r.get("status") == "ok"]
    reference = next((r for r in ok if baseline and r.get("path") == baseline.get("path")), ok[0] if ok else None)
    per_task = (reference or {}).get("n_per_task") or None
    total = (reference or {}).get("n_samples")
    if total is None and per_task:
        total = sum(per_task.values())
    differing = sorted({results.record_variant(r)["label"] for r in ok if _n_differs(r, per_task, total)})
    first = records[0] if records else {}
    return {"per_task": per_task, "total": total, "limit": first.get("limit"),
            "tasks": results.sample_key(first)[2] or tuple(sorted(per_task or ())), "differing": differing}


def _n_differs(record: dict, per_task: dict | None, total) -> bool:
    if per_task and record.get("n_per_task") and record["n_per_task"] != per_task:
        return True
    return total is not None and record.get("n_samples") is not None and record["n_samples"] != total


def samples_text(samples: dict, short: bool = False) -> str:
    """``n = 10 per task × 4 tasks = 40 samples`` (or what the records allow to say)."""
    per_task, total, tasks = samples["per_task"], samples["total"], samples["tasks"] or ()
    if per_task and len(set(per_task.values())) == 1:
        each = next(iter(per_task.values()))
        return f"n = {each}/task × {len(per_task)} tasks = {total}" if short else \
            f"n = {each} samples per task × {len(per_task)} tasks = {total} samples"
    if per_task:
        return f"n = {total} samples" if short else \
            f"n = {total} samples ({', '.join(f'{t} {k}' for t, k in sorted(per_task.items()))})"
    if total is None:
        return "n unknown"
    if short:
        return f"n = {total} samples"
    detail = [f"{len(tasks)} tasks"] if tasks else []
    if samples["limit"] is not None:
        detail.append(f"limit {samples['limit']} per task")
    return f"n = {total} samples in total" + (f" ({', '.join(detail)})" if detail else "")


def latest_per_label(table):
    """One row per variant label: the latest finished ``ok`` record (rows in table order)."""
    ok = table[table["status"] == "ok"]
    by_finish = ok.assign(_finished=ok["finished_at"].fillna("").astype(str)).sort_values("_finished", kind="stable")
    keep = set(by_finish.drop_duplicates("label", keep="last").index)
    return ok[[index in keep for index in ok.index]]


def duplicate_labels(table) -> dict[str, int]:
    """Variant label -> count, for labels with more than one record in ``table``."""
    if table.empty:
        return {}
    counts = table["label"].value_counts()
    return {label: int(n) for label, n in sorted(counts.items()) if n > 1}


# ----------------------------------------------------------------------------- analysis of a group

def through_end(table):
    """One row per variant label (latest finished ok) of the runs that ablate a contiguous range from their
    start layer through the last layer (the layer-sweep rows); the baseline excluded."""
    rows = latest_per_label(table)
    rows = rows[rows["op"] != "none"]
    end = rows["end_layer"].astype("float") == rows["num_layers"].astype("float")
    return rows[end & ~rows["layer_text"].astype(str).str.contains(",")]


def start_layer_findings(table, threshold: float = THRESHOLD) -> dict[str, dict]:
    """Per series (the variant without its layers, e.g. ``skip_ffn``), for the runs through the last layer:
    ``method``; ``tested`` start layers; ``keeping``: those whose relative score is >= ``threshold``;
    ``safe``: the earliest tested start L such that L and every later tested start keep it (None if the
    latest tested start does not); ``relative`` and ``flops_reduction`` per tested start."""
    found = {}
    for series, rows in through_end(table).groupby("series", sort=True):
        rows = rows.dropna(subset=["relative_score"]).sort_values("start_layer")
        if rows.empty:
            continue
        starts = [int(s) for s in rows["start_layer"]]
        relative = dict(zip(starts, map(float, rows["relative_score"])))
        keeping = [s for s in starts if relative[s] >= threshold]
        safe = None
        for start in reversed(starts):  # from the latest start backwards, while all keep the threshold
            if relative[start] < threshold:
                break
            safe = start
        found[series] = {"method": rows["method"].iloc[0], "tested": starts, "keeping": keeping, "safe": safe,
                         "relative": relative, "flops_reduction": dict(zip(starts, map(_num, rows["flops_reduction"])))}
    return found


def earliest_safe_start(table, threshold: float = THRESHOLD) -> dict[str, dict | None]:
    """Per series: the earliest tested start layer L such that the runs starting at L and at every later
    tested start keep ``relative_score >= threshold`` (ablating through the last layer); None if none does."""
    out = {}
    for series, f in start_layer_findings(table, threshold).items():
        start = f["safe"]
        out[series] = None if start is None else {
            "start_layer": start, "relative_score": f["relative"][start],
            "flops_reduction": f["flops_reduction"][start], "tested": f["tested"]}
    return out


def largest_saving_keeping(table, threshold: float = THRESHOLD):
    """Among the variant runs (any layers) with relative score >= ``threshold``: the one saving the most
    executed FLOPs (ties: higher relative score, then label); None if no run keeps the threshold."""
    rows = latest_per_label(table)
    rows = rows[(rows["op"] != "none")].dropna(subset=["relative_score", "flops_reduction"])
    rows = rows[rows["relative_score"] >= threshold]
    if rows.empty:
        return None
    return rows.sort_values(["flops_reduction", "relative_score", "label"], ascending=[False, False, True]).iloc[0]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated in (x up, y up), sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best_y = [], -math.inf
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


# ----------------------------------------------------------------------------- figures (object API only)

MARKERS = ("o", "s", "^", "D", "v", "P")


def method_colors(methods) -> dict:
    """Method -> colour: the baseline first, then by name (the report reads files only, so it takes the
    methods from the records, not from the op registry). Pass a group's methods: its figures agree."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    order = sorted(set(methods), key=lambda m: (m != "none", str(m)))
    return {m: cmap(i % 10) for i, m in enumerate(order)}


def group_colors(group: Group) -> dict:
    """The colours of every method of ``group`` (all its records), the same in each of its figures."""
    return method_colors(group.table["method"].unique())


def new_figure(width: float, height: float):
    """A :class:`matplotlib.figure.Figure` not managed by pyplot (no backend is selected or changed)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def save_figure(fig, path: Path) -> Path:
    """Lay out and write ``fig`` as a PNG."""
    fig.tight_layout()
    fig.savefig(path, dpi=FIGURE_DPI)
    return path


def figure_title(group: Group, what: str) -> str:
    return f"{what}: {group.title}\n{group.n_text(short=True)}"


def _threshold_line(ax, threshold: float, label: bool = True) -> None:
    ax.axhline(threshold, color="grey", lw=0.8, ls=":")
    if label:
        ax.text(0.99, threshold, f"{threshold:.0%} of baseline", transform=ax.get_yaxis_transform(), ha="right",
                va="bottom", fontsize=7, color="dimgrey")


def pareto_points(group: Group):
    """The rows the Pareto figure draws: per variant the drawn record with a relative score and FLOPs."""
    return group.drawn.dropna(subset=["relative_score", "flops_reduction"])


def draw_pareto(fig, group: Group, threshold: float = THRESHOLD) -> bool:
    """Relative score vs executed FLOPs saved into ``fig``: variants that save no executed FLOPs (mask-only)
    in a left strip, spread by variant and start layer and annotated; the rest on the right with the
    Pareto front (over all points) dashed and labelled. False (and a note) if there is nothing to draw."""
    rows = pareto_points(group)
    if rows.empty:
        return _nothing(fig, group, "accuracy vs compute")
    colors = group_colors(group)
    zero = rows[(rows["flops_reduction"].abs() < 1e-12) & (rows["op"] != "none")]
    rest = rows.drop(zero.index)
    if zero.empty:
        ax = fig.add_subplot(1, 1, 1)
    else:
        grid = fig.add_gridspec(1, 2, width_ratios=[1.1, 3])
        strip = fig.add_subplot(grid[0, 0])
        ax = fig.add_subplot(grid[0, 1], sharey=strip)
        _draw_zero_strip(strip, zero, colors, threshold)
    fig.set_size_inches(9.6 if not zero.empty else 6.8, 4.8)
    for method, part in rest.groupby("method", sort=True):
        ax.scatter(100 * part["flops_reduction"], part["relative_score"], label=method, color=colors[method],
                   s=60 if method == "none" else 26, zorder=3, marker="*" if method == "none" else "o")
    points = list(zip(rows["flops_reduction"], rows["relative_score"]))
    front = rows.iloc[pareto_front(points)]
    # "pre": between two front points the line sits at the right one's score -- the best a run saving at
    # least that much reaches (a point above the line would be on the front).
    ax.step(100 * front["flops_reduction"], front["relative_score"], where="pre", color="black", lw=1, ls="--",
            label="Pareto front", zorder=2)
    for _, row in front.iterrows():
        ax.annotate(row["label"], (100 * row["flops_reduction"], row["relative_score"]), fontsize=6,
                    xytext=(4, -9), textcoords="offset points")
    _threshold_line(ax, threshold)
    ax.set_xlabel("decoder prefill FLOPs saved (%)")
    ax.set_ylabel("relative score (variant / baseline)" if zero.empty else "")
    ax.grid(alpha=0.3)
    ax.legend(*_legend_entries(fig.axes), fontsize=7, loc="lower left")
    fig.suptitle(figure_title(group, "Accuracy vs compute"), fontsize=9)
    return True


def _legend_entries(axes) -> tuple[list, list]:
    """Handles and labels of all ``axes``, each label once (a method drawn in two panels is one entry)."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    return list(entries.values()), list(entries)


def _draw_zero_strip(ax, zero, colors, threshold: float) -> None:
    """Mask-only variants, all at 0% executed FLOPs saved: one column per series, start layers side by side."""
    names = sorted(zero["series"].unique())
    for column, name in enumerate(names):
        part = zero[zero["series"] == name].sort_values("start_layer")
        offsets = [0.0] if len(part) == 1 else [0.7 * (i / (len(part) - 1) - 0.5) for i in range(len(part))]
        for offset, (_, row) in zip(offsets, part.iterrows()):
            ax.scatter(column + offset, row["relative_score"], color=colors[row["method"]], s=18, zorder=3,
                       label=row["method"])
            ax.annotate(row["layer_text"].split("–")[0], (column + offset, row["relative_score"]), fontsize=5,
                        xytext=(0, 3), textcoords="offset points", ha="center")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_title("0% executed FLOPs saved\n(mask-only; numbers: start layer)", fontsize=7)
    ax.set_ylabel("relative score (variant / baseline)")
    ax.grid(alpha=0.3, axis="y")
    _threshold_line(ax, threshold, label=False)


def heatmap_grid(group: Group):
    """Relative score, one row per series and one column per start layer (runs through the last layer);
    one record per cell (the drawn one), never an aggregate."""
    rows = through_end(group.table).dropna(subset=["relative_score"])
    if rows.empty:
        return None
    return rows.pivot(index="series", columns="start_layer", values="relative_score").sort_index()


def draw_heatmap(fig, group: Group, threshold: float = THRESHOLD) -> bool:
    """Relative score per variant (rows) x start layer (columns) into ``fig``, each cell annotated."""
    import numpy as np

    grid = heatmap_grid(group)
    if grid is None:
        return _nothing(fig, group, "relative score by variant and start layer")
    fig.set_size_inches(3.0 + 0.72 * grid.shape[1], 1.9 + 0.45 * grid.shape[0])
    ax = fig.add_subplot(1, 1, 1)
    values = np.ma.masked_invalid(grid.to_numpy(dtype=float))
    low, high = min(0.0, float(values.min())), max(1.0, float(values.max()))
    image = ax.imshow(values, cmap="viridis", vmin=low, vmax=high, aspect="auto")
    for (i, j), value in np.ndenumerate(grid.to_numpy(dtype=float)):
        if not math.isnan(value):
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=7,
                    color="black" if value > low + 0.6 * (high - low) else "white")
    ax.set_xticks(range(grid.shape[1]), [str(int(c)) for c in grid.columns])
    ax.set_yticks(range(grid.shape[0]), list(grid.index), fontsize=8)
    ax.set_xlabel("start layer (ablated through the last layer)")
    fig.colorbar(image, ax=ax, label="relative score")
    fig.suptitle(figure_title(group, "Relative score"), fontsize=9)
    return True


def draw_mask_ratio(fig, group: Group, threshold: float = THRESHOLD) -> bool:
    """Relative score vs the fraction of final layers ablated into ``fig``, one line per series (0 = baseline)."""
    rows = through_end(group.table).dropna(subset=["relative_score"])
    if rows.empty:
        return _nothing(fig, group, "mask-ratio curve")
    fig.set_size_inches(6.8, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    colors = group_colors(group)
    for index, (series, part) in enumerate(rows.groupby("series", sort=True)):
        part = part.sort_values("start_layer", ascending=False)
        ratio = (part["num_layers"] - part["start_layer"]).astype(float) / part["num_layers"].astype(float)
        ax.plot([0.0, *ratio], [1.0, *part["relative_score"]], marker=MARKERS[index % len(MARKERS)], ms=4,
                label=series, color=colors[part["method"].iloc[0]])
    _threshold_line(ax, threshold)
    ax.set_xlabel("fraction of final decoder layers ablated")
    ax.set_ylabel("relative score")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(figure_title(group, "Mask-ratio curve"), fontsize=9)
    return True


def _nothing(fig, group: Group, what: str) -> bool:
    fig.text(0.5, 0.5, f"nothing to plot ({what}): no ok runs with the values it needs", ha="center", fontsize=9)
    fig.suptitle(figure_title(group, what.capitalize()), fontsize=9)
    return False


FIGURES = (
    ("pareto", "Accuracy vs compute", draw_pareto,
     ("Relative score vs executed FLOPs saved; dashed: the Pareto front over all points (labelled); dotted: "
      "{threshold:.0%} of the baseline. Left strip: variants that save no executed FLOPs (mask-only ops), "
      "spread by variant, numbered by start layer.")),
    ("heatmap", "Relative score by variant and start layer", draw_heatmap,
     "Runs that ablate from the start layer through the last layer; one run per cell."),
    ("mask_ratio", "Mask-ratio curve", draw_mask_ratio,
     "Relative score vs the fraction of final layers ablated (0: the baseline); dotted: {threshold:.0%}."),
)


def write_figures(group: Group, out_dir: Path, suffix: str, threshold: float = THRESHOLD) -> list[str]:
    """The group's figures as PNGs in ``out_dir`` and their Markdown (heading, image, caption with n)."""
    parts = []
    for stem, heading, draw, caption in FIGURES:
        fig = new_figure(6.4, 4.4)
        if not draw(fig, group, threshold):
            continue
        path = save_figure(fig, out_dir / f"{stem}{suffix}.png")
        parts += [f"### {heading}", "", f"![{heading}]({path.name})", "",
                  f"*{group.n_text()}. {caption.format(threshold=threshold)}{_duplicates_note(group)}*", ""]
    return parts


def _duplicates_note(group: Group) -> str:
    if not group.duplicates:
        return ""
    names = ", ".join(f"`{label}` ×{n}" for label, n in group.duplicates.items())
    return f" Duplicate records ({names}): the latest finished ok one of each is drawn."


# ----------------------------------------------------------------------------- markdown

def task_columns(table) -> list[str]:
    return sorted(c for c in table.columns if c.startswith("score:"))


def latency_cell(row) -> str:
    """``median [q1–q3]`` in ms, ``†`` when the timing is noisy (see :func:`analysis.results.latency_is_noisy`)."""
    median = _num(row["latency_ms"])
    if median is None:
        return "–"
    text = f"{median:.1f}"
    q1, q3 = _num(row.get("latency_q1_ms")), _num(row.get("latency_q3_ms"))
    if q1 is not None and q3 is not None:
        text += f" [{q1:.1f}–{q3:.1f}]"
    return text + (" †" if row.get("latency_noisy") is True else "")


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
    for _, row in table.iterrows():
        cells = [row["label"], row["layer_text"], *[_f(row[t], "{:.3f}") for t in tasks],
                 _f(row["score"], "{:.3f}"), _f(row["relative_score"], "{:.3f}"), _f(row["flops_reduction"], "{:.1%}"),
                 _f(row["theoretical_reduction"], "{:.1%}"), latency_cell(row), _f(row["agreement"], "{:.3f}"),
                 _status_cell(row, group, drawn_index)]
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
    for label, count in group.duplicates.items():
        finished = [str(f) for f in table.loc[table["label"] == label, "finished_at"] if not _missing(f)]
        notes.append(f"Duplicate: {count} records of `{label}` in this group (finished {', '.join(finished) or '?'}); "
                     "all are listed, the summary and the figures use the latest finished ok one.")
    return notes


def baseline_line(group: Group) -> list[str]:
    base = group.baseline
    if base is None:
        return ["No baseline record names these runs: their relative scores cannot be checked here."]
    per_task = ", ".join(f"{t} {_f(v, '{:.3f}')}" for t, v in sorted(base["scores"].items()))
    where = f"`{base['config_hash']}`" + (f", `{display_path(base['path'])}`" if base.get("path") else "")
    source = "" if base["found"] else " (its record is not among these files; values as the variants' records give them)"
    latency = base["latency"]
    lines = [f"Baseline {where}{source}, the reference of every relative score in this section: "
             f"score {_f(base['score'], '{:.3f}')}" + (f" ({per_task})" if per_task else "")
             + f"; prefill {_f(latency['median_ms'], '{:.1f}')} ms."]
    if (_num(base["score"]) or 0) == 0:
        lines.append("The baseline scores 0, so relative scores are undefined: is this a trained model?")
    return lines


def _starts(values) -> str:
    return ", ".join(map(str, values)) if values else "none"


def finding_line(series: str, f: dict, threshold: float) -> str:
    """One variant's start-layer finding, stated with its rule."""
    tested = f"tested starts: {_starts(f['tested'])}; keeping ≥ {threshold:.0%}: {_starts(f['keeping'])}"
    if f["safe"] is not None:
        start = f["safe"]
        return (f"`{series}`: from layer **{start}** on, every tested start keeps ≥ {threshold:.0%} "
                f"(at {start}: relative {f['relative'][start]:.3f}, {_f(f['flops_reduction'][start], '{:.1%}')} "
                f"of decoder prefill FLOPs saved); {tested}.")
    if not f["keeping"]:
        return f"`{series}`: no tested start keeps ≥ {threshold:.0%}; {tested}."
    last = f["tested"][-1]
    return (f"`{series}`: no start from which every later tested start keeps ≥ {threshold:.0%} (the latest, "
            f"{last}, has relative {f['relative'][last]:.3f}); {tested}.")


def summary_lines(group: Group, threshold: float = THRESHOLD) -> list[str]:
    """The generated findings, one Markdown bullet each; every sentence follows from the rule it states."""
    lines = baseline_line(group)
    lines.append(f"Rule: a start layer *keeps* the score when its run (ablating from it through the last layer) "
                 f"has relative score ≥ {threshold:.0%}; a variant is safe *from layer L on* when L and every later "
                 "tested start keep it.")
    findings = start_layer_findings(group.table, threshold)
    lines += [finding_line(series, f, threshold) for series, f in findings.items()]
    frozen = [f["safe"] for f in findings.values() if f["method"] == "skip_attn_ffn" and f["safe"] is not None]
    if frozen:
        lines.append(f"Vision tokens can skip attention *and* FFN from layer **{min(frozen)}** on (rule above): "
                     "the layer from which ProxyV can start.")
    best = largest_saving_keeping(group.table, threshold)
    if best is None:
        lines.append(f"No variant run keeps ≥ {threshold:.0%}.")
    else:
        lines.append(f"Largest executed-FLOPs saving among the runs that keep ≥ {threshold:.0%} (any layers): "
                     f"`{best['label']}` ({best['flops_reduction']:.1%} saved, relative {best['relative_score']:.3f}).")
    failed = group.table[group.table["status"] != "ok"]
    if not failed.empty:
        lines.append(f"{len(failed)} run(s) failed; see the table and their result.json.")
    if group.samples["differing"]:
        names = ", ".join(f"`{label}`" for label in group.samples["differing"])
        lines.append(f"Warning: {names} scored another number of samples than the baseline ({group.n_text()}).")
    return [f"- {line}" for line in lines]


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
    return parts


def group_headings(groups: list[Group]) -> list[str]:
    """Each group's title, with its baseline's hash where two groups would otherwise read alike."""
    titles = [g.title for g in groups]
    return [t if titles.count(t) == 1 else f"{t}, baseline `{(g.baseline_hash or 'unknown')[:10]}`"
            for t, g in zip(titles, groups)]


def unreadable_line(paths: list[Path]) -> str:
    names = ", ".join(f"`{display_path(p)}`" for p in paths)
    return (f"**{len(paths)} unreadable record{'s' if len(paths) != 1 else ''}**: {names} "
            "(skipped; re-running the sweep recomputes it).")


def _remove_stale_figures(out_dir: Path) -> None:
    for stale in [p for stem in FIGURE_STEMS for p in out_dir.glob(f"{stem}*.png")]:
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


# ----------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="a sweep directory (runs/<sweep>) or any directory holding result.json files")
    parser.add_argument("--out", help="output directory (default: reports/<name of root>)")
    parser.add_argument("--threshold", type=float, default=THRESHOLD, help="relative score kept (default 0.99)")
    args = parser.parse_args(argv)
    if not Path(args.root).is_dir():
        print(f"error: {args.root} is not a directory", file=sys.stderr)
        return 2
    print(write_report(args.root, args.out, threshold=args.threshold))
    return 0


if __name__ == "__main__":
    sys.exit(main())
