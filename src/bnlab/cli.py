"""`bnlab` command line: one subcommand per module in :mod:`bnlab.commands`.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``;
the module docstring is the command's long help (examples first).

One error path for every command (:func:`main`): a :class:`bnlab.errors.UserError` (bad argument,
profile, path or file) and argparse's own errors are one line on stderr, ``bnlab CMD: error: ...``,
exit status 2; Ctrl-C is one line and status 130; a closed stdout (``bnlab models | head``) ends
quietly; anything else is a bug and keeps its traceback, followed by a line saying how to report it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import bnlab.commands
from bnlab.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C'd program


def _command_modules():
    for info in sorted(pkgutil.iter_modules(bnlab.commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"bnlab.commands.{info.name}")


class _UsageError(UserError):
    """argparse's complaint about the command line, with the (sub)command it concerns."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a :class:`UserError` (reported by :func:`main`), not an exit."""

    def error(self, message):
        raise _UsageError(message, self.prog)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bnlab", description="Batch normalization in residual networks: build, train, measure.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"bnlab {bnlab.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in _command_modules():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _prog(argv: list[str]) -> str:
    command = next((a for a in argv if not a.startswith("-")), None)
    return f"bnlab {command}" if command else "bnlab"


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (see the module docstring for errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help()
            return 0
        return int(args._run(args) or 0)
    except UserError as error:
        print(f"{getattr(error, 'prog', None) or _prog(argv)}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as interrupt:  # a command may say what was kept (bnlab.study.runner.Interrupted)
        newline = "\n" if sys.stderr.isatty() else ""  # off the line where the terminal echoed ^C
        print(f"{newline}{_prog(argv)}: {str(interrupt) or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (`bnlab models | head`): point stdout at /dev/null so the interpreter's
        # final flush does not fail again, and end quietly (https://docs.python.org/3/library/signal.html)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def console_main() -> None:
    """Entry point of the ``bnlab`` script and ``python -m bnlab.cli``: a bug keeps its traceback and
    says where to report it."""
    try:
        code = main()
    except SystemExit:
        raise
    except BaseException:
        import traceback
        traceback.print_exc()
        print(f"bnlab: this is a bug in bnlab {bnlab.__version__}, not a problem with your input; please report "
              f"it to the bnlab maintainers with the command line, `bnlab --version` and the traceback above",
              file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    console_main()
