"""``tracer inspect PATH``: a terminal-safe summary of a saved trace."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import CliError, shown
from .validation import check_trace_path

__all__ = ["add_inspect_parser", "cmd_inspect"]


def add_inspect_parser(sub: Any) -> argparse.ArgumentParser:
    insp = sub.add_parser("inspect", help="print a summary of a saved trace")
    insp.add_argument("file", type=Path, help="a trace file or folder")
    insp.set_defaults(func=cmd_inspect)
    return insp


def cmd_inspect(args: argparse.Namespace) -> int:
    check_trace_path(args.file)
    try:
        from tracer.export import inspect_trace
    except ImportError as exc:
        raise CliError(f"trace inspection is not available: {exc}") from exc
    try:
        text = inspect_trace(args.file)
    except OSError as exc:
        raise CliError(f"cannot read trace {shown(args.file)}: {exc.strerror or exc}") from None
    print(text)
    return 0
