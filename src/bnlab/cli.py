"""`bnlab` command line: one subcommand per module in :mod:`bnlab.commands`.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``;
the module docstring is the command's long help (examples first).

One error path for every command (:func:`main`): a :class:`bnlab.errors.UserError` (bad argument,
profile, path or file) and argparse's own errors are one line on stderr, ``bnlab CMD: error: ...``,
exit status 2; Ctrl-C is one line and status 130; a closed stdout (``bnlab models | head``) ends
quietly; a stdout that cannot be written (a full disk, ``>/dev/full``, an I/O error) is one line and
status 1, as coreutils report a write error; anything else is a bug and keeps its traceback, followed by
a line saying how to report it.
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
EXIT_OUTPUT_FAILED = 1  # as `echo x >/dev/full`: the command ran, its output could not be written
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


class _OutputFailed(Exception):
    """Writing or flushing stdout failed with ``error`` (not a broken pipe: the reader is still there)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _CheckedStdout:
    """``sys.stdout`` while a command runs: a failed write or flush becomes :class:`_OutputFailed`, so that
    :func:`main` tells a full disk on stdout from an ``OSError`` elsewhere (a bug, or a file's own error)."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise
        except OSError as error:
            raise _OutputFailed(error) from error

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as error:
            raise _OutputFailed(error) from error

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _discard_stdout(stream) -> None:
    """Point the process's stdout at /dev/null, so the interpreter's final flush of what is still buffered
    does not fail again (https://docs.python.org/3/library/signal.html#note-on-sigpipe)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):   # not a real file (a test's capture): nothing to flush at exit
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _prog(argv: list[str]) -> str:
    command = next((a for a in argv if not a.startswith("-")), None)
    return f"bnlab {command}" if command else "bnlab"


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (see the module docstring for errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    stdout = sys.stdout
    sys.stdout = checked = _CheckedStdout(stdout)
    try:
        status = _run(argv)
        checked.flush()   # short output is still buffered: a full disk or a closed pipe shows here
        return status
    except BrokenPipeError:   # the reader went away (`bnlab models | head`): end quietly
        _discard_stdout(stdout)
        return 1
    except _OutputFailed as failed:
        _discard_stdout(stdout)
        error = failed.error
        reason = f"{error.strerror} (errno {error.errno})" if error.strerror else str(error)
        print(f"{_prog(argv)}: error: cannot write to standard output: {reason}", file=sys.stderr)
        return EXIT_OUTPUT_FAILED
    finally:
        sys.stdout = stdout


def _run(argv: list[str]) -> int:
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


def console_main() -> None:
    """Entry point of the ``bnlab`` script, ``python -m bnlab`` and ``python -m bnlab.cli``: a bug keeps its
    traceback and says where to report it."""
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
