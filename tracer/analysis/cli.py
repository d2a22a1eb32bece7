"""``tracer compare A B [--html out.html]``: the summary and the rows around each divergence.

``tracer.cli`` wires it in with two lines::

    from tracer.analysis.cli import add_compare_parser   # in build_parser(), after the others
    add_compare_parser(sub)

Failures raise :class:`FileNotFoundError` (no such trace),
:class:`~tracer.records.TraceFormatError` (not a readable trace) or
:class:`~tracer.analysis.comparison.CompareError` (a :class:`~tracer.records.TracerError`:
different prompts, no such stage), which the CLI prints as one ``tracer: error:`` line.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_compare_parser", "cmd_compare"]


def add_compare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``compare`` command to ``build_parser``'s subparsers; returns its parser."""
    p = subparsers.add_parser("compare", help="where two saved traces of the same prompts part")
    p.add_argument("a", type=Path, help="first trace file or folder")
    p.add_argument("b", type=Path, help="second trace file or folder")
    p.add_argument("--html", type=Path, default=None, help="write the comparison view as a static HTML page")
    p.add_argument("--stage", default="0",
                   help="distribution compared: 0/raw (raw logits, default), final, or a stage index")
    p.add_argument("--context", type=int, default=3, help="rows shown on each side of a divergence (default: 3)")
    p.set_defaults(func=cmd_compare)
    return p


def _stage(value: str) -> int | str:
    try:
        return int(value)
    except ValueError:
        return value


def side_names(a: str | Path, b: str | Path) -> tuple[str, str]:
    """Labels of the two sides: the file names, with as many parent folders as it takes to
    tell them apart (``d_hf/prompt_001.trace`` vs ``d_vllm/prompt_001.trace``)."""
    pa, pb = Path(a).absolute().parts[1:], Path(b).absolute().parts[1:]  # as typed: links not followed
    for n in range(1, max(len(pa), len(pb)) + 1):
        na, nb = "/".join(pa[-n:]), "/".join(pb[-n:])
        if na != nb:
            return na, nb
    return str(a), str(b)


def cmd_compare(args: argparse.Namespace) -> int:
    from ..corpus.dataset import is_dataset

    if is_dataset(args.a) or is_dataset(args.b):  # two corpus datasets (tracer.corpus)
        from ..corpus.cli import cmd_compare_corpus

        return cmd_compare_corpus(args)
    from ..storage import load_trace
    from .comparison import compare

    for path in (args.a, args.b):
        if not Path(path).exists():
            raise FileNotFoundError(f"no such trace: {path}")
    a, b = load_trace(args.a), load_trace(args.b)
    diff = compare(a, b, stage=_stage(str(args.stage)), names=side_names(args.a, args.b))
    print(diff.text(context=max(int(args.context), 0)))
    if args.html is not None:
        from ..viz.compare import compare_html

        args.html.parent.mkdir(parents=True, exist_ok=True)
        args.html.write_text(compare_html(diff), encoding="utf-8")
        print(f"wrote {args.html}")
    return 0
