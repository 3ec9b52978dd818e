"""Rebuild a study's report from its store, without training.

Examples:
  bnlab report study-out          # rewrites study-out/report.html, report.md, figures/, verdicts.json

Useful after changing the report code, or to see partial results while `bnlab study` is still running
in another terminal (claims whose runs are missing show n/a and say so).
"""

from __future__ import annotations

NAME = "report"
HELP = "regenerate report.html / report.md of a `bnlab study` directory from its store"


def add_arguments(parser) -> None:
    parser.add_argument("directory", help="the study's output directory (holding study.sqlite)")


def run(args) -> int:
    from pathlib import Path

    from bnlab.study.report import build_report

    directory = Path(args.directory)
    if not directory.is_dir():
        raise SystemExit(f"bnlab report: {directory} is not a directory; expected a `bnlab study --out` directory")
    try:
        report = build_report(directory)
    except ValueError as error:
        raise SystemExit(f"bnlab report: {error}") from None
    print(f"report: {report}  (and {report.with_suffix('.md')})")
    return 0
