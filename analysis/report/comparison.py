"""ProxyV vs token reduction at matched FLOPs: the paper's Table 5 question, as a section of a group.

Drawn only where a group holds both families (``proxyv`` and ``reduction`` records). Rows are the
drawn record of each variant (the latest finished ok one of a label), all against the group's
baseline and on the group's samples. Two runs are *matched* when their executed decoder FLOPs saved
differ by at most :data:`MATCH_POINTS` percentage points; each sentence states the comparison it
makes and follows from the table, whatever it shows.
"""

from __future__ import annotations

from pathlib import Path

from .figures import group_colors, new_figure, save_figure
from .groups import Group
from .summary import THRESHOLD
from .values import fmt, number

MATCH_POINTS = 5.0  # |FLOPs saved (ProxyV) - FLOPs saved (reduction)| <= 5 points counts as matched
FAMILIES = ("proxyv", "reduction")
STEM = "proxyv_vs_reduction"


COMBINED = "proxyv + reduction"  # a token reduction run on a (ProxyV) checkpoint
KINDS = {"baseline": 0, "proxyv": 1, "reduction": 2, COMBINED: 3}
MARKERS = {"proxyv": "D", "reduction": "^", COMBINED: "s"}


def _kind(row) -> str:
    if row["op"] == "none":
        return "baseline"
    checkpoint = row.get("checkpoint")
    if row["family"] == "reduction" and isinstance(checkpoint, str) and checkpoint:
        return COMBINED
    return row["family"]


def comparison_rows(group: Group):
    """The baseline and the drawn ok rows of the two families (``kind``: baseline, proxyv, reduction, or a
    reduction on a ProxyV checkpoint), sorted by kind then FLOPs saved."""
    rows = group.drawn
    rows = rows[(rows["status"] == "ok") & (rows["family"].isin(FAMILIES) | (rows["op"] == "none"))]
    rows = rows.dropna(subset=["relative_score"])
    if not all((rows["family"] == fam).any() for fam in FAMILIES):
        return None
    rows = rows.assign(kind=[_kind(row) for _, row in rows.iterrows()])
    return rows.assign(_order=rows["kind"].map(KINDS)).sort_values(
        ["_order", "flops_reduction", "label"]).drop(columns="_order")


def _table(rows, tasks: list[str]) -> str:
    header = ["variant", "kind", "FLOPs saved", *[t.split(":", 1)[1] for t in tasks], "score", "relative"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in rows.iterrows():
        cells = [row["label"], row["kind"], fmt(row["flops_reduction"], "{:.1%}"),
                 *[fmt(row[t], "{:.3f}") for t in tasks], fmt(row["score"], "{:.3f}"),
                 fmt(row["relative_score"], "{:.3f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def matched_sentences(rows, tasks: list[str]) -> list[str]:
    """Per ProxyV run: the token-reduction runs within MATCH_POINTS of its FLOPs saved, and how they compare
    (relative score, and the twin where the gap is largest); the nearest one when none is matched."""
    proxyv = rows[rows["kind"] == "proxyv"]
    reduction = rows[rows["kind"] == "reduction"].dropna(subset=["flops_reduction"])
    lines = [f"Matched: executed decoder FLOPs saved within ±{MATCH_POINTS:g} percentage points; relative scores "
             "against the baseline above, on the same samples."]
    for _, p in proxyv.iterrows():
        saved = number(p["flops_reduction"])
        if saved is None:
            continue
        gaps = (100 * (reduction["flops_reduction"] - saved)).abs()
        matched = reduction[gaps <= MATCH_POINTS]
        head = f"`{p['label']}` saves {saved:.1%} and keeps {p['relative_score']:.3f}"
        if matched.empty:
            nearest = reduction.loc[gaps.idxmin()] if not reduction.empty else None
            tail = "no token-reduction run is matched" + (
                f" (nearest: `{nearest['label']}`, {nearest['flops_reduction']:.1%} saved, relative "
                f"{nearest['relative_score']:.3f})" if nearest is not None else "")
            lines.append(f"{head}; {tail}.")
            continue
        parts = []
        for _, r in matched.sort_values("flops_reduction").iterrows():
            diff = r["relative_score"] - p["relative_score"]
            worst = _largest_gap(p, r, tasks)
            parts.append(f"`{r['label']}` ({r['flops_reduction']:.1%} saved) keeps {r['relative_score']:.3f} "
                         f"({'+' if diff >= 0 else '−'}{abs(diff):.3f} vs ProxyV{worst})")
        better = sum(r["relative_score"] < p["relative_score"] for _, r in matched.iterrows())
        verdict = (f"ProxyV's relative score is higher than that of {better} of the {len(matched)} matched run(s)"
                   if better else "no matched run scores below ProxyV")
        lines.append(f"{head}; at matched FLOPs {'; '.join(parts)}: {verdict}.")
    return lines + combined_sentences(rows)


def combined_sentences(rows) -> list[str]:
    """Per token-reduction run on a checkpoint: what it saves and keeps, beside that checkpoint run alone."""
    alone = rows[rows["kind"] == "proxyv"]
    lines = []
    for _, c in rows[rows["kind"] == COMBINED].iterrows():
        head = f"`{c['label']}` saves {c['flops_reduction']:.1%} and keeps {c['relative_score']:.3f}"
        same = alone[alone["checkpoint"] == c["checkpoint"]]
        if same.empty:
            lines.append(f"{head}; its checkpoint has no run without the reduction in this group.")
            continue
        p = same.iloc[0]
        diff = c["relative_score"] - p["relative_score"]
        lines.append(f"{head}; the same checkpoint alone (`{p['label']}`) saves {p['flops_reduction']:.1%} and keeps "
                     f"{p['relative_score']:.3f}: the reduction on top saves "
                     f"{100 * (c['flops_reduction'] - p['flops_reduction']):.1f} more points of FLOPs at "
                     f"{'+' if diff >= 0 else '−'}{abs(diff):.3f} relative score.")
    return lines


def _largest_gap(p, r, tasks: list[str]) -> str:
    """``; largest per-twin gap: <task> <reduction> vs <proxyv>`` (the twin where the reduction run loses most)."""
    gaps = [(number(r[t]) - number(p[t]), t) for t in tasks if number(r[t]) is not None and number(p[t]) is not None]
    if not gaps:
        return ""
    gap, task = min(gaps)
    return f"; largest per-twin gap: {task.split(':', 1)[1]} {r[task]:.3f} vs {p[task]:.3f}" if gap < 0 else ""


def draw_comparison(fig, group: Group, rows, threshold: float = THRESHOLD) -> None:
    """Relative score vs executed FLOPs saved, ProxyV and token reduction (and the baseline), each run labelled."""
    ax = fig.add_subplot(1, 1, 1)
    colors = group_colors(group)
    markers = {kind: marker for kind, marker in MARKERS.items() if (rows["kind"] == kind).any()}
    for _, row in rows.iterrows():
        method = row["method"]
        marker = "*" if row["op"] == "none" else MARKERS.get(row["kind"], "o")
        ax.scatter(100 * row["flops_reduction"], row["relative_score"], color=colors[method], marker=marker,
                   s=70 if row["op"] == "none" else 36, zorder=3)
        if row["op"] != "none":  # parameters on a second line, so labels stay inside the axes
            text = row["label"].replace(" (", "\n(").replace(" on ", "\non ")
            ax.annotate(text, (100 * row["flops_reduction"], row["relative_score"]),
                        fontsize=6, xytext=(4, 3), textcoords="offset points")
    right = 100 * float(rows["flops_reduction"].max())
    ax.set_xlim(-1, right * 1.6 + 2)
    for family, marker in markers.items():
        ax.scatter([], [], marker=marker, facecolor="none", edgecolor="black", label=family)
    ax.axhline(threshold, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("decoder prefill FLOPs saved (%)")
    ax.set_ylabel("relative score (variant / baseline)")
    ax.set_title(f"ProxyV vs token reduction: {group.title}\n{group.n_text(short=True)}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")


def comparison_section(group: Group, out_dir: Path, suffix: str, tasks: list[str],
                       threshold: float = THRESHOLD) -> list[str]:
    """The section's Markdown (and its figure), or nothing when the group lacks either family."""
    rows = comparison_rows(group)
    if rows is None:
        return []
    fig = new_figure(7.6, 5.0)
    draw_comparison(fig, group, rows, threshold)
    path = save_figure(fig, out_dir / f"{STEM}{suffix}.png")
    return ["### ProxyV vs token reduction at matched FLOPs", "",
            *(f"- {line}" for line in matched_sentences(rows, tasks)), "",
            _table(rows, tasks), "",
            f"![ProxyV vs token reduction]({path.name})", "",
            f"*{group.n_text()}. Diamonds: ProxyV (trained checkpoints); triangles: token reduction (no training)"
            + ("; squares: token reduction on a checkpoint (ProxyV + reduction)" if (rows["kind"] == COMBINED).any()
               else "") + f"; star: the baseline; dotted: {threshold:.0%}.*", ""]
