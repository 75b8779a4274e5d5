"""The report's figures, drawn on :class:`matplotlib.figure.Figure` objects (never pyplot, never the
backend): accuracy vs compute with its Pareto front, relative score by variant and start layer, the
mask-ratio curve. A method has one colour in every group and every figure (:func:`method_colors`)."""

from __future__ import annotations

import math
from pathlib import Path

from .. import variant
from .groups import Group
from .summary import THRESHOLD, through_end

FIGURE_DPI = 120
FIGURE_STEMS = ("pareto", "heatmap", "mask_ratio")
MARKERS = ("o", "s", "^", "D", "v", "P")


def method_colors(methods) -> dict:
    """Method -> colour, the same for a method in every group and every figure: colours follow the variant
    registry's order (:func:`analysis.variant.methods`, the baseline first), then methods it does not know
    (records of a method since removed), by name. Returns the colours of ``methods`` in that order."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    given = set(methods)
    known = list(variant.methods())
    order = [*known, *sorted(given.difference(known), key=str)]
    return {m: cmap(i % 10) for i, m in enumerate(order) if m in given}


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


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated in (x up, y up), sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best_y = [], -math.inf
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


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
    for i, (_, row) in enumerate(front.iterrows()):  # neighbours on the front alternate below / above
        ax.annotate(row["label"], (100 * row["flops_reduction"], row["relative_score"]), fontsize=6,
                    xytext=(4, -9 if i % 2 == 0 else 5), textcoords="offset points")
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
    """Relative score vs the fraction of final layers ablated into ``fig``: the baseline one point at (0, 1), each
    series a line through its measured points only (a series measured at one start layer is one marker, not a line
    from the baseline that would suggest measurements in between)."""
    rows = through_end(group.table).dropna(subset=["relative_score"])  # the baseline is not among them
    if rows.empty:
        return _nothing(fig, group, "mask-ratio curve")
    fig.set_size_inches(6.8, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    colors = group_colors(group)
    ax.plot([0.0], [1.0], marker="*", ms=9, linestyle="none", color=colors.get("none", "black"), label="baseline")
    for index, (series, part) in enumerate(rows.groupby("series", sort=True)):
        part = part.sort_values("start_layer", ascending=False)
        ratio = (part["num_layers"] - part["start_layer"]).astype(float) / part["num_layers"].astype(float)
        ax.plot(list(ratio), list(part["relative_score"]), marker=MARKERS[index % len(MARKERS)], ms=4,
                label=series, color=colors[part["method"].iloc[0]])
    _threshold_line(ax, threshold)
    ax.set_xlabel("fraction of final decoder layers ablated")
    ax.set_ylabel("relative score")
    ax.set_xlim(-0.02, 1.02)  # the baseline's star and full-depth points whole
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
     ("Relative score vs the fraction of final layers ablated; star: the baseline (0, 1); lines join measured "
      "points only; dotted: {threshold:.0%}.")),
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
