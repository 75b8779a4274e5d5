"""The summary of a group: findings that follow from rules on relative score (the tested start
layers that keep the threshold, the earliest start from which every later one does, the largest
FLOPs saving among the runs that keep it) and the sentences that state each with its rule."""

from __future__ import annotations

from .groups import Group, latest_per_label
from .values import display_path, fmt, number

THRESHOLD = 0.99


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
        saved = dict(zip(starts, map(number, rows["flops_reduction"])))
        found[series] = {"method": rows["method"].iloc[0], "tested": starts, "keeping": keeping, "safe": safe,
                         "relative": relative, "flops_reduction": saved}
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


def baseline_line(group: Group) -> list[str]:
    base = group.baseline
    if base is None:
        return ["No baseline record names these runs: their relative scores cannot be checked here."]
    per_task = ", ".join(f"{t} {fmt(v, '{:.3f}')}" for t, v in sorted(base["scores"].items()))
    where = f"`{base['config_hash']}`" + (f", `{display_path(base['path'])}`" if base.get("path") else "")
    source = "" if base["found"] else (" (its record is not among these files; values as the variants' records "
                                       "give them)")
    latency = base["latency"]
    lines = [f"Baseline {where}{source}, the reference of every relative score in this section: "
             f"score {fmt(base['score'], '{:.3f}')}" + (f" ({per_task})" if per_task else "")
             + f"; prefill {fmt(latency['median_ms'], '{:.1f}')} ms"
             + (f" (timed on {latency['timed_on']})." if latency.get("timed_on") else ".")]
    if (number(base["score"]) or 0) == 0:
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
                f"(at {start}: relative {f['relative'][start]:.3f}, {fmt(f['flops_reduction'][start], '{:.1%}')} "
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
