"""The sweep report: a Markdown page with PNG figures, built from result records only.

    python -m analysis.report runs/tiny-synthetic            # -> reports/tiny-synthetic/report.md
    python -m analysis.report runs/tiny-synthetic --out /tmp/r --threshold 0.98

Written at the end of every multirun by :class:`SweepReportCallback` (a Hydra callback) and on
demand by the command above. It reads ``result.json`` files through :mod:`analysis.results` and
never imports torch. Per (model, eval) it shows:

* a table of variants: score per task, score, relative score, FLOPs reduction (executed and
  theoretical), prefill latency, agreement with the baseline's answers, status;
* ``pareto.png``: relative score vs FLOPs reduction, the Pareto front marked;
* ``heatmap.png``: relative score per op x start layer (runs that ablate through the last layer);
* ``mask_ratio.png``: relative score vs the fraction of final layers ablated (the paper's Figure 2);
* a generated summary: per op the earliest start layer that keeps >= 99% relative score.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from . import results

log = logging.getLogger("analysis.report")
THRESHOLD = 0.99
REPORT_FILE = "report.md"


# ----------------------------------------------------------------------------- analysis of the table

def _num(value) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def through_end(table):
    """Rows that ablate from their start layer through the last layer (the layer-sweep rows), ok only."""
    ok = table[(table["status"] == "ok") & (table["op"] != "none")]
    return ok[ok["end_layer"].astype("float") == ok["num_layers"].astype("float")]


def earliest_safe_start(table, threshold: float = THRESHOLD) -> dict[str, dict]:
    """Per op: the earliest tested start layer L such that the runs starting at L and at every later
    tested start keep ``relative_score >= threshold`` (ablating through the last layer); None if none does."""
    found = {}
    for op, rows in through_end(table).groupby("op", sort=True):
        rows = rows.dropna(subset=["relative_score"]).sort_values("start_layer")
        best = None
        for _, row in rows[::-1].iterrows():  # from the latest start backwards, while all keep the threshold
            if row["relative_score"] < threshold:
                break
            best = row
        found[op] = None if best is None else {
            "start_layer": int(best["start_layer"]), "relative_score": float(best["relative_score"]),
            "flops_reduction": _num(best["flops_reduction"]), "tested": [int(x) for x in rows["start_layer"]],
        }
    return found


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated in (x up, y up), sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best_y = [], -math.inf
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


# ----------------------------------------------------------------------------- figures

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    """Lay out, write (PNG, 120 dpi) and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# One colour per op in every figure (the report does not import the op registry: it reads files only).
KNOWN_OPS = ("none", "mask_v2v", "skip_attn", "skip_ffn", "skip_attn_ffn", "drop_v2t", "proxyv")


def _op_colors(ops) -> dict:
    cmap = _plt().get_cmap("tab10")
    order = [*KNOWN_OPS, *sorted(set(ops) - set(KNOWN_OPS))]
    return {op: cmap(order.index(op) % 10) for op in ops}


def plot_pareto(table, path: Path, title: str = "") -> Path | None:
    """Relative score vs executed FLOPs reduction, one colour per op, the Pareto front as a step line."""
    rows = table[(table["status"] == "ok")].dropna(subset=["relative_score", "flops_reduction"])
    if rows.empty:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = _op_colors(rows["op"].unique())
    for op, group in rows.groupby("op"):
        ax.scatter(100 * group["flops_reduction"], group["relative_score"], label=op, color=colors[op], s=28,
                   zorder=3, marker="*" if op == "none" else "o")
    points = list(zip(rows["flops_reduction"], rows["relative_score"]))
    front = [points[i] for i in pareto_front(points)]
    ax.step([100 * x for x, _ in front], [y for _, y in front], where="post", color="black", lw=1, ls="--",
            label="Pareto front", zorder=2)
    ax.axhline(THRESHOLD, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("decoder prefill FLOPs saved (%)")
    ax.set_ylabel("relative score (variant / baseline)")
    ax.set_title(title or "accuracy vs compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(plt, fig, path)


def plot_heatmap(table, path: Path, title: str = "") -> Path | None:
    """Relative score per op (rows) x start layer (columns), for runs through the last layer."""
    rows = through_end(table).dropna(subset=["relative_score"])
    if rows.empty:
        return None
    import seaborn as sns

    grid = rows.pivot_table(index="op", columns="start_layer", values="relative_score", aggfunc="mean")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.2 + 0.62 * grid.shape[1], 1.4 + 0.5 * grid.shape[0]))
    sns.heatmap(grid, annot=True, fmt=".2f", cmap="viridis", vmin=min(0.0, float(grid.min().min())), vmax=1.0,
                ax=ax, cbar_kws={"label": "relative score"}, annot_kws={"fontsize": 7})
    ax.set_xlabel("start layer (ablated through the last layer)")
    ax.set_ylabel("op")
    ax.set_title(title or "relative score by op and start layer")
    return _save(plt, fig, path)


def plot_mask_ratio(table, path: Path, title: str = "") -> Path | None:
    """Relative score vs the fraction of final layers ablated, one line per op (0 = the baseline)."""
    rows = through_end(table).dropna(subset=["relative_score"])
    if rows.empty:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = _op_colors(rows["op"].unique())
    for op, group in rows.groupby("op"):
        ratio = (group["num_layers"] - group["start_layer"]).astype(float) / group["num_layers"].astype(float)
        order = ratio.argsort()
        xs = [0.0] + list(ratio.iloc[order])
        ys = [1.0] + list(group["relative_score"].iloc[order])
        ax.plot(xs, ys, marker="o", ms=4, label=op, color=colors[op])
    ax.axhline(THRESHOLD, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("fraction of final decoder layers ablated")
    ax.set_ylabel("relative score")
    ax.set_xlim(0, 1)
    ax.set_title(title or "mask-ratio curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


# ----------------------------------------------------------------------------- markdown

def _f(value, pattern: str, missing: str = "–") -> str:
    value = _num(value)
    return missing if value is None else pattern.format(value)


def task_columns(table) -> list[str]:
    return sorted(c for c in table.columns if c.startswith("score:"))


def layers_label(row) -> str:
    """``start_layer``–``end_layer`` as in the config (end exclusive), "–" for the baseline."""
    if row["op"] == "none" or _num(row["start_layer"]) is None:
        return "–"
    return f"{int(row['start_layer'])}–{int(row['end_layer'])}"


def markdown_table(table) -> str:
    """One row per record: op, layers, score per task, score, relative score, FLOPs saved, latency, agreement."""
    tasks = task_columns(table)
    header = ["op", "layers [start, end)", *[t.split(":", 1)[1] for t in tasks], "score", "relative", "FLOPs saved",
              "FLOPs saved (theor.)", "prefill ms", "agreement", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        status = row["status"] if row["status"] == "ok" else f"**{row['status']}**: {row['error'] or ''}"
        cells = [row["op"] + (" (blind)" if row["blind"] else ""), layers_label(row),
                 *[_f(row[t], "{:.3f}") for t in tasks], _f(row["score"], "{:.3f}"),
                 _f(row["relative_score"], "{:.3f}"), _f(row["flops_reduction"], "{:.1%}"),
                 _f(row["theoretical_reduction"], "{:.1%}"), _f(row["latency_ms"], "{:.1f}"),
                 _f(row["agreement"], "{:.3f}"), status.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_lines(table, threshold: float = THRESHOLD) -> list[str]:
    """The generated findings, one Markdown bullet each."""
    lines = []
    base = table[(table["op"] == "none") & (table["status"] == "ok")]
    if not base.empty:
        row = base.iloc[0]
        per_task = ", ".join(f"{t.split(':', 1)[1]} {_f(row[t], '{:.3f}')}" for t in task_columns(table))
        lines.append(f"Baseline score {_f(row['score'], '{:.3f}')} ({per_task}); "
                     f"prefill {_f(row['latency_ms'], '{:.1f}')} ms.")
        if (_num(row["score"]) or 0) == 0:
            lines.append("The baseline scores 0, so relative scores are undefined: is this a trained model?")
    safe = earliest_safe_start(table, threshold)
    for op, found in safe.items():
        if found is None:
            lines.append(f"`{op}`: no tested start layer keeps ≥ {threshold:.0%} relative score.")
        else:
            lines.append(f"`{op}`: from layer **{found['start_layer']}** on, vision tokens can drop this "
                         f"computation and keep ≥ {threshold:.0%} (relative {found['relative_score']:.3f}, "
                         f"{_f(found['flops_reduction'], '{:.1%}')} of decoder prefill FLOPs saved; "
                         f"start layers tested: {', '.join(map(str, found['tested']))}).")
    frozen = safe.get("skip_attn_ffn")
    if frozen:
        lines.append(f"Vision tokens can skip attention *and* FFN from layer **{frozen['start_layer']}**: "
                     "the layer from which ProxyV can start.")
    ok = table[(table["status"] == "ok") & (table["op"] != "none")].dropna(subset=["relative_score"])
    keep = ok[ok["relative_score"] >= threshold].dropna(subset=["flops_reduction"])
    if not keep.empty:
        best = keep.sort_values(["flops_reduction", "relative_score"], ascending=False).iloc[0]
        lines.append(f"Largest saving at ≥ {threshold:.0%}: `{best['op']}` on layers {layers_label(best)} "
                     f"({best['flops_reduction']:.1%} FLOPs saved, relative {best['relative_score']:.3f}).")
    failed = table[table["status"] != "ok"]
    if not failed.empty:
        lines.append(f"{len(failed)} run(s) failed; see the table and their result.json.")
    return [f"- {line}" for line in lines]


def write_report(root: str | Path, out_dir: str | Path | None = None, title: str | None = None,
                 threshold: float = THRESHOLD) -> Path:
    """Build ``out_dir/report.md`` and its figures from the records under ``root``; returns the report's path."""
    root = Path(root)
    out_dir = Path(out_dir) if out_dir is not None else Path("reports") / root.name
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [p for pattern in ("pareto*.png", "heatmap*.png", "mask_ratio*.png") for p in out_dir.glob(pattern)]:
        stale.unlink()  # figures of an earlier build that this one may not redraw
    records = results.load_records(root)
    title = title or f"Sweep `{root.name}`"
    parts = [f"# {title}", "", f"{len(records)} runs from `{root}`, generated {results.now_iso()} by "
             f"`python -m analysis.report {root}`.", ""]
    if not records:
        parts.append("No result records yet.")
    else:
        table = results.records_table(records)
        groups = list(table.groupby(["model", "eval", "blind"], sort=True, dropna=False))
        for index, ((model, ev, blind), group) in enumerate(groups):
            suffix = "" if len(groups) == 1 else f"-{index + 1}"
            name = f"{model} on {ev}" + (" (blind)" if blind else "")
            parts += [f"## {name}", "", "### Summary", "", *summary_lines(group, threshold), "",
                      "### Variants", "", markdown_table(group), "",
                      "FLOPs: language-model decoder prefill, mean per evaluated sample (see `analysis/flops.py`); "
                      "*theor.* counts only the (query, key) pairs a variant allows. Relative = score / baseline "
                      "score; agreement = share of answers identical to the baseline's.", ""]
            figures = [
                ("Accuracy vs compute (Pareto front dashed)", plot_pareto(group, out_dir / f"pareto{suffix}.png", name)),
                ("Relative score by op and start layer", plot_heatmap(group, out_dir / f"heatmap{suffix}.png", name)),
                ("Mask-ratio curve", plot_mask_ratio(group, out_dir / f"mask_ratio{suffix}.png", name)),
            ]
            for caption, path in figures:
                if path is not None:
                    parts += [f"### {caption}", "", f"![{caption}]({path.name})", ""]
    path = results.atomic_write_text(out_dir / REPORT_FILE, "\n".join(parts))
    return path


# ----------------------------------------------------------------------------- Hydra callback

try:
    from hydra.experimental.callback import Callback
except ImportError:  # the report itself does not need Hydra
    Callback = object


class SweepReportCallback(Callback):
    """Writes ``reports/<sweep>/report.md`` for every sweep its jobs touched, when a multirun ends;
    shows a progress bar over the jobs when they run in this process (the basic launcher)."""

    def __init__(self) -> None:
        self.bar = None

    def __getstate__(self) -> dict:  # launchers like submitit pickle callbacks into the jobs: not the bar
        return {"bar": None}

    def on_multirun_start(self, config, **kwargs) -> None:
        in_process = "BasicLauncher" in str(config.hydra.launcher.get("_target_", ""))
        total = count_jobs(config) if in_process else None
        if total and config.run.get("progress", True):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="sweep", unit="run", dynamic_ncols=True)

    def on_job_end(self, config, job_return, **kwargs) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_multirun_end(self, config, **kwargs) -> None:
        if self.bar is not None:
            self.bar.close()
        if not config.run.get("report", True):
            return
        from .runner import SWEEP_MARKS  # noqa: PLC0415 -- light: runner imports heavy modules lazily

        marks = Path(config.hydra.sweep.dir) / SWEEP_MARKS
        roots = dict.fromkeys(marks.read_text().split()) if marks.exists() else {}
        for root in roots:
            out = Path(config.run.reports_dir) / Path(root).name
            path = write_report(root, out)
            log.info("report: %s", path)


def count_jobs(config) -> int | None:
    """How many jobs the basic sweeper makes of the sweeper params and command-line overrides."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
        overrides = OverridesParser.create().parse_overrides(params + list(config.hydra.overrides.task))
        return sum(len(batch) for batch in BasicSweeper.split_arguments(overrides, None))
    except Exception:  # noqa: BLE001 -- a progress bar is not worth failing a sweep for
        return None


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
