"""Rebuild a study's report from its store, without training: the five answers first, BN's four steps on a
trained channel, then each claim's evidence.

Examples:
  bnlab report study-out                      # rewrites study-out/report.html, report.md, figures/, verdicts.json
  bnlab report /mnt/shared/study --out mine   # a read-only study directory: the report goes to mine/
  bnlab report study-out --screenshots        # also study-out/screenshots/report-1366x900.png and -390x844.png

Useful after changing the report code, or to see partial results while `bnlab study` is still running
in another terminal (claims whose runs are missing say so). The store is opened read-only. Screenshots
need a Chromium (`make setup` installs Debian's as root) and the Python package playwright.
"""

from __future__ import annotations

NAME = "report"
HELP = "regenerate report.html / report.md of a `bnlab study` directory from its store"


def add_arguments(parser) -> None:
    parser.add_argument("directory", help="the study's output directory (holding study.sqlite)")
    parser.add_argument("--out", default=None,
                        help="write the report here instead of DIRECTORY (for a read-only study directory)")
    parser.add_argument("--screenshots", action="store_true",
                        help="also save screenshots of the report at 1366x900 and 390x844 in OUT/screenshots/")


def run(args) -> int:
    import errno
    from pathlib import Path

    from bnlab.errors import UserError
    from bnlab.study.report import build_report

    directory = Path(args.directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory; expected a `bnlab study --out` directory")
    try:
        report = build_report(directory, args.out)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UserError(f"cannot write the report into {args.out or directory}: {error.strerror} (errno "
                        f"{error.errno}); the store is only read: free space there, or give --out elsewhere") from None
    print(f"report: {report}  (and {report.with_suffix('.md')})")
    if args.screenshots:
        from bnlab.study.browser import screenshots
        for path in screenshots(report, report.parent / "screenshots"):
            print(f"screenshot: {path}")
    return 0
