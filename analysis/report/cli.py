"""``python -m analysis.report ROOT [--out DIR] [--threshold T]``: write the report of the records under ROOT."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .markdown import write_report
from .summary import THRESHOLD

DESCRIPTION = "The sweep report: a Markdown page with PNG figures, built from result records only."


def main(argv: list[str] | None = None) -> int:
    """Write the report (see :func:`analysis.report.write_report`) and print its path; 2 if ROOT is no directory."""
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=DESCRIPTION)
    parser.add_argument("root", help="a sweep directory (runs/<sweep>) or any directory holding result.json files")
    parser.add_argument("--out", help="output directory (default: reports/<name of root>)")
    parser.add_argument("--threshold", type=float, default=THRESHOLD, help="relative score kept (default 0.99)")
    args = parser.parse_args(argv)
    if not Path(args.root).is_dir():
        print(f"error: {args.root} is not a directory", file=sys.stderr)
        return 2
    print(write_report(args.root, args.out, threshold=args.threshold))
    return 0
