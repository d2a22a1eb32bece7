"""What ``tracer run`` writes: the predictions file (rewritten atomically after every answer),
``generation_config.json`` beside it, and each prompt's trace files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..jsonio import write_json_atomic
from .common import CliError, Result, hold_interrupts, release_interrupts, shown

__all__ = ["PredictionsWriter", "read_predictions", "save_trace_files", "write_json_atomic"]


class PredictionsWriter:
    """The predictions file, rewritten after each answer.

    ``None`` as the path keeps the results in memory only.  The file is a JSON list of
    ``{"Input", "Output"}`` (the seed's keys; see :meth:`Result.prediction`) and is valid
    JSON at every moment, so a late failure or Ctrl-C loses no finished answer.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.results: list[Result] = []

    def add(self, result: Result) -> None:
        self.results.append(result)
        if self.path is not None:
            try:
                write_json_atomic(self.path, [r.prediction() for r in self.results])
            except OSError as exc:
                raise CliError(f"cannot write --predictions-file {shown(self.path)}: {exc.strerror or exc}") from None

    def write_generation_config(self, config: dict[str, Any]) -> Path | None:
        """``generation_config.json`` beside the predictions file (as the seed script writes)."""
        if self.path is None:
            return None
        target = self.path.parent / "generation_config.json"
        try:
            write_json_atomic(target, config)
        except OSError as exc:
            raise CliError(f"cannot write {shown(target)}: {exc.strerror or exc}") from None
        return target


def read_predictions(path: Path) -> list[dict[str, str]]:
    """A predictions file as ``[{"Input", "Output"}]``: the seed's keys, and the lower-case
    ``input``/``output`` of files earlier tracer versions wrote (where only those are present)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{shown(path)}: not a predictions file (a JSON list of {{'Input', 'Output'}} expected)")
    out = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not ({"Output", "output"} & set(entry)):
            raise ValueError(f"{shown(path)}: entry {i} has no 'Output'")
        out.append({"Input": entry.get("Input", entry.get("input")), "Output": entry.get("Output", entry.get("output"))})
    return out


def save_partial_trace(trace: Any, base: Path) -> Path:
    """An interrupted prompt's trace as ``base``.trace (no exports), with a second Ctrl-C held off
    while it is written; returns the file's path."""
    held = hold_interrupts()
    try:
        save_trace_files(trace, base, exports=False)
    finally:
        release_interrupts(held)
    return base.with_suffix(".trace")


def partial_trace_said(label: str, path: Path) -> str:
    """How the command names an interrupted prompt's saved trace (every engine alike)."""
    return f"the partial trace of {label} is in {shown(path)}"


def save_trace_files(trace: Any, base: Path, *, exports: bool = True) -> list[str]:
    """``base``.trace (+ .html and .perfetto.json when ``exports``); returns notes on skipped
    exports.  An OS error while saving becomes :class:`CliError`."""
    notes: list[str] = []
    try:
        trace.save(base.with_suffix(".trace"))
    except OSError as exc:
        raise CliError(f"cannot save trace {shown(base.with_suffix('.trace'))}: {exc.strerror or exc}") from None
    if not exports:
        return notes
    for method, suffix in (("to_html", ".html"), ("to_perfetto", ".perfetto.json")):
        try:
            getattr(trace, method)(base.with_suffix(suffix))
        except (AttributeError, NotImplementedError) as exc:
            notes.append(f"skipped {method} for {base.name}: {exc or 'not implemented'}")
        except OSError as exc:
            raise CliError(f"cannot write {shown(base.with_suffix(suffix))}: {exc.strerror or exc}") from None
    return notes
