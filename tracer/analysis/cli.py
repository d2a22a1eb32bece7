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
    # (None: not given; both apply to two traces, a corpus compare refuses them rather than ignore them)
    p.add_argument("--stage", default=None,
                   help="distribution compared: 0/raw (raw logits, default), final, or a stage index (traces)")
    p.add_argument("--context", type=int, default=None,
                   help="rows shown on each side of a divergence (default: 3) (traces)")
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


WANTED = ("compare takes two traces (NAME.trace folders holding manifest.json, as tracer run --trace-dir "
          "writes them) or two corpus datasets (folders holding corpus.json, from tracer run --dataset)")


def traces_in(folder: Path) -> list[Path]:
    """The traces in ``folder`` or one level below (a ``--trace-dir`` folder, or the folder of a
    run's predictions file holding its ``--trace-dir``), sorted."""
    for pattern in ("*.trace", "*/*.trace"):
        found = sorted(p for p in folder.glob(pattern) if (p / "manifest.json").is_file())
        if found:
            return found
    return []


def _check_not_a_folder_of_traces(path: Path, other: Path, first: bool) -> None:
    """Refuse a folder that is not a trace itself (no ``manifest.json``), saying what compare
    takes and, for the output folder of ``tracer run``, which traces inside it to pass (``first``:
    ``path`` is compare's first argument, for the example's order)."""
    from ..cli.common import CliError, shown

    if not path.is_dir() or (path / "manifest.json").is_file():
        return
    found = traces_in(path)
    if not found:
        raise CliError(f"{shown(path)} is a folder that is neither a trace (no manifest.json) nor a corpus "
                       f"dataset (no corpus.json): {WANTED}")
    names = ", ".join(str(p.relative_to(path)) for p in found[:3]) + (", ..." if len(found) > 3 else "")
    mine = next((t for t in found if t.name == other.name), found[0])  # the same prompt as a trace given
    theirs = other / mine.relative_to(path) if other.is_dir() and not (other / "manifest.json").is_file() else other
    example = ""
    if theirs.resolve() != mine.resolve():
        pair = (mine, theirs) if first else (theirs, mine)
        example = f", e.g. tracer compare {shown(pair[0])} {shown(pair[1])}"
    raise CliError(f"{shown(path)} is a folder of {len(found)} trace(s) ({names}), not one trace: {WANTED}; "
                   f"pass one trace from it{example}")


def cmd_compare(args: argparse.Namespace) -> int:
    from ..cli.common import CliError, shown
    from ..cli.validation import check_output_file
    from ..corpus.dataset import is_dataset

    if args.html is not None:  # before any work: a comparison is not lost to a bad output path
        check_output_file(args.html, "--html")
    if args.context is not None and args.context < 0:
        raise CliError(f"--context must be 0 or more, got {args.context}")
    if is_dataset(args.a) or is_dataset(args.b):  # two corpus datasets (tracer.corpus)
        from ..corpus.cli import cmd_compare_corpus

        given = [flag for flag, value in (("--stage", args.stage), ("--context", args.context)) if value is not None]
        if given:
            raise CliError(f"{' and '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to comparing two traces; "
                           "a corpus compare reads the chosen tokens' log-probs and each step's top-k")
        return cmd_compare_corpus(args)
    args.stage = "0" if args.stage is None else args.stage
    args.context = 3 if args.context is None else args.context
    from ..storage import load_trace
    from .comparison import compare

    for path, other, first in ((args.a, args.b, True), (args.b, args.a, False)):
        if not Path(path).exists():
            raise FileNotFoundError(f"no such trace: {path}")
        _check_not_a_folder_of_traces(Path(path), Path(other), first)
    a, b = load_trace(args.a), load_trace(args.b)
    diff = compare(a, b, stage=_stage(str(args.stage)), names=side_names(args.a, args.b))
    print(diff.text(context=max(int(args.context), 0)))
    if args.html is not None:
        from ..viz.compare import compare_html

        args.html.parent.mkdir(parents=True, exist_ok=True)
        args.html.write_text(compare_html(diff), encoding="utf-8")
        print(f"wrote {shown(args.html)}")
    return 0
