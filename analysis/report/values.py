"""Values as the report writes them: numbers read from records (None for missing or NaN), table
cells, and paths named the same wherever the report is rebuilt."""

from __future__ import annotations

import math
from pathlib import Path

from .. import results


def number(value) -> float | None:
    """``value`` as a float; None if it is missing, NaN or not a number."""
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def fmt(value, pattern: str, missing: str = "–") -> str:
    """A table cell: ``value`` formatted by ``pattern``, ``missing`` where it is no number."""
    value = number(value)
    return missing if value is None else pattern.format(value)


def is_missing(value) -> bool:
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
