"""Command line: ``tracer run`` (generate, traced or not), ``tracer inspect FILE`` and the
subcommands other modules register (``tracer compare``).

Every failure prints exactly one ``tracer: error: ...`` line on stderr and exits with status 2
(argument errors included); Ctrl-C exits with status 130 after saving what finished.  Set
``TRACER_DEBUG=1`` to also get the traceback of an unexpected error.

Modules: :mod:`.run` (``tracer run``), :mod:`.chat` (``--multi-turn``), :mod:`.validation`
(checks before the model loads), :mod:`.outputs` (predictions, generation config, trace files),
:mod:`.progress` (per-token progress), :mod:`.inspect_cmd`, :mod:`.common`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import signal
import sys
import threading
import traceback
import warnings
from typing import Any, Sequence

from .common import (DEFAULT_PROMPTS, PRESETS, SEED_SYSTEM_PROMPT, CliError, Interrupted, Result, format_summary,
                     end_interrupted, hold_interrupts, shown)
from .inspect_cmd import add_inspect_parser
from .run import add_run_parser

__all__ = [
    "DEFAULT_PROMPTS",
    "EXTENSIONS",
    "PRESETS",
    "SEED_SYSTEM_PROMPT",
    "CliError",
    "Result",
    "build_parser",
    "command",
    "format_summary",
    "main",
]

#: Subcommands that live in other modules: ``(module, function, command)``.  The function
#: takes the ``subparsers`` object, adds one parser named ``command`` and sets its ``func``
#: default to a callable ``(args) -> int``.  A module that is not there is skipped (the
#: command does not exist); one that fails to import gets a stub command that says why.
EXTENSIONS: tuple[tuple[str, str, str], ...] = (
    ("tracer.analysis.cli", "add_compare_parser", "compare"),
)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one ``tracer: error:`` line (no usage block), exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"tracer: error: {one_line(message)} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tracer", description="Trace what a causal LM does while it generates.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_run_parser(sub)
    add_inspect_parser(sub)
    for module, function, command in EXTENSIONS:
        _add_extension(sub, module, function, command)
    return parser


def _add_extension(sub: Any, module: str, function: str, command: str) -> None:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            return  # not part of this installation
        _add_stub(sub, command, f"tracer {command} is not available: {exc}")
        return
    except Exception as exc:  # noqa: BLE001 - a broken extension must not break `tracer run`
        _add_stub(sub, command, f"tracer {command} is not available: {type(exc).__name__}: {exc}")
        return
    getattr(mod, function)(sub)


def _add_stub(sub: Any, command: str, message: str) -> None:
    def fail(args: argparse.Namespace) -> int:
        raise CliError(message)

    stub = sub.add_parser(command, help=f"(unavailable) {message}", add_help=True)
    stub.add_argument("rest", nargs=argparse.REMAINDER)
    stub.set_defaults(func=fail)


def one_line(text: Any, limit: int = 2000) -> str:
    """``text`` on one terminal-safe line (whitespace runs with line breaks become one space)."""
    return shown(re.sub(r"\s*[\r\n]+\s*", " ", str(text)).strip(), limit)


def _error(exc: BaseException) -> str:
    if isinstance(exc, CliError):
        return one_line(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {shown(exc.filename)}" if exc.filename else ""
        return one_line(f"{exc.strerror}{where}")
    if _is_tracer_error(exc):
        return one_line(exc)
    return one_line(f"{type(exc).__name__}: {exc}")


def _is_tracer_error(exc: BaseException) -> bool:
    try:
        from tracer.models import ModelLoadError
        from tracer.records import TracerError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (ModelLoadError, TracerError))


def command() -> int:
    """The ``tracer`` command (console script and ``python -m tracer``): :func:`main` on
    ``sys.argv``, owning the process: after a Ctrl-C it has reported, another one while the
    process ends exits with status 130 at once (never by the signal, status -2)."""
    return main(None, _command=True)


def main(argv: Sequence[str] | None = None, *, _command: bool = False) -> int:
    """Run one ``tracer`` command line (``argv``; default ``sys.argv[1:]``) and return its exit
    status.  Called in-process, SIGINT's handler and ``warnings.showwarning`` are as before on
    return."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or an argument error already printed as one line
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main_thread else None
    shown_before = warnings.showwarning
    warnings.showwarning = _show_warning  # tracer's own warnings: one line each, like its errors
    try:
        code = _run(args)
    finally:
        warnings.showwarning = shown_before
        if main_thread and handler is not None and not _command:
            signal.signal(signal.SIGINT, handler)  # called in-process: the caller's handler again
    if code == 130 and _command:
        end_interrupted()  # the command: a Ctrl-C while the process ends exits 130 at once
    return code


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    from ..errors import TracerWarning

    if issubclass(category, TracerWarning):
        print(f"tracer: warning: {one_line(message)}", file=sys.stderr if file is None else file, flush=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        hold_interrupts()  # (restored by main for an in-process call)
        detail = str(exc) if isinstance(exc, Interrupted) else ""
        print(f"tracer: interrupted{': ' + one_line(detail) if detail else ''}", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - the promise: one line, exit status 2
        if os.environ.get("TRACER_DEBUG"):
            traceback.print_exc()
        print(f"tracer: error: {_error(exc)}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
