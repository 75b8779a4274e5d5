"""The sweep report: a Markdown page with PNG figures, built from result records only.

    python -m analysis.report runs/tiny-synthetic            # -> reports/tiny-synthetic/report.md
    python -m analysis.report runs/tiny-synthetic --out /tmp/r --threshold 0.98

Written at the end of every sweep by :class:`analysis.sweep.VariantSweeper` and on demand by the
command above. It reads ``result.json`` files through
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
the backend, and a notebook can draw the same figures into its own (inline) pyplot figures. A method
has one colour in every group and every figure: the variant registry's order
(:func:`analysis.variant.methods`), then methods it does not know, by name.

Modules, a concept each: :mod:`.groups` (:class:`Group`, :func:`group_records`, the drawn record per
variant, duplicates), :mod:`.samples` (n of a group), :mod:`.summary` (the rules' findings and the
sentences stating them), :mod:`.figures` (colours and the figures), :mod:`.markdown` (table cells,
sections, :func:`write_report`), :mod:`.values` (numbers, cells, paths), :mod:`.cli` (the command).
"""

from __future__ import annotations

from .cli import main
from .figures import (
    FIGURE_DPI,
    FIGURE_STEMS,
    FIGURES,
    MARKERS,
    draw_heatmap,
    draw_mask_ratio,
    draw_pareto,
    figure_title,
    group_colors,
    heatmap_grid,
    method_colors,
    new_figure,
    pareto_front,
    pareto_points,
    save_figure,
    write_figures,
)
from .groups import (
    Group,
    duplicate_labels,
    group_baseline,
    group_headings,
    group_records,
    latest_per_label,
)
from .markdown import (
    REPORT_FILE,
    group_section,
    latency_cell,
    markdown_table,
    table_notes,
    task_columns,
    unreadable_line,
    write_report,
)
from .samples import group_samples, samples_text
from .summary import (
    THRESHOLD,
    baseline_line,
    earliest_safe_start,
    finding_line,
    largest_saving_keeping,
    start_layer_findings,
    summary_lines,
    through_end,
)
from .values import display_path

__all__ = [
    "FIGURES", "FIGURE_DPI", "FIGURE_STEMS", "MARKERS", "REPORT_FILE", "THRESHOLD", "Group", "baseline_line",
    "display_path", "draw_heatmap", "draw_mask_ratio", "draw_pareto", "duplicate_labels", "earliest_safe_start",
    "figure_title", "finding_line", "group_baseline", "group_colors", "group_headings", "group_records",
    "group_samples", "group_section", "heatmap_grid", "largest_saving_keeping", "latency_cell", "latest_per_label",
    "main", "markdown_table", "method_colors", "new_figure", "pareto_front", "pareto_points", "samples_text",
    "save_figure", "start_layer_findings", "summary_lines", "table_notes", "task_columns", "through_end",
    "unreadable_line", "write_figures", "write_report",
]
