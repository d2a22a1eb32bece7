"""Checks made before any model loads: generation values, the files ``tracer`` will read and
the folders it will write, the device.  Each failure raises :class:`CliError` with one line.

File checks look at the real file system (``os.stat``, ``os.access``) and then *try* what the
run will do (open the data file, create and delete a temporary file in each output folder), so
a folder that looks writable but is not (a read-only mount, or any folder for a non-root user
without permission) is refused before the first prompt runs.
"""

from __future__ import annotations

import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from .common import CliError, shown

__all__ = [
    "DTYPE_NAMES",
    "check_device",
    "check_generation",
    "check_gpus",
    "check_output_file",
    "check_output_folder",
    "check_trace_path",
    "read_prompt_file",
]

DTYPE_NAMES = ("auto", "float32", "fp32", "float", "bfloat16", "bf16", "float16", "fp16", "half")


# --------------------------------------------------------------------------------------------
# Generation values
# --------------------------------------------------------------------------------------------


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise CliError(f"{name} must be a finite number, got {value}")


#: the smallest sampling temperature taken: logits / temperature stays finite in float32 for
#: logits up to ~3e8, and the temperature itself is a normal float32
MIN_TEMPERATURE = 1e-30


def check_generation(args: Any) -> None:
    """Ranges of every generation option (``args`` after the preset is applied)."""
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature is not None:
        _finite("--temperature", args.temperature)
        if args.do_sample and args.temperature <= 0:
            raise CliError(
                f"--temperature must be > 0 with --do-sample, got {args.temperature} "
                "(for greedy decoding leave out --do-sample)"
            )
        if args.do_sample and args.temperature < MIN_TEMPERATURE:
            raise CliError(
                f"--temperature must be at least {MIN_TEMPERATURE:g} with --do-sample, got {args.temperature}: "
                "smaller ones do not survive float32 logits (llama.cpp runs them as 0, greedy; generate's "
                "probabilities become NaN); for greedy decoding leave out --do-sample"
            )
    if args.top_k is not None and args.top_k < 0:
        raise CliError(f"--top-k must be >= 0 (0 turns top-k off), got {args.top_k}")
    if args.top_p is not None:
        _finite("--top-p", args.top_p)
        if not 0 < args.top_p <= 1:
            raise CliError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.repetition_penalty is not None:
        _finite("--repetition-penalty", args.repetition_penalty)
        if args.repetition_penalty <= 0:
            raise CliError(f"--repetition-penalty must be > 0 (1 turns it off), got {args.repetition_penalty}")
    presence = getattr(args, "presence_penalty", None)
    if presence is not None:
        _finite("--presence-penalty", presence)
        if not -2 <= presence <= 2:
            raise CliError(f"--presence-penalty must be in [-2, 2] (0 turns it off), got {presence}")
    if not 0 <= args.seed < 2**32:
        raise CliError(f"--seed must be in [0, 2**32), got {args.seed}")
    if str(args.dtype).lower().removeprefix("torch.") not in DTYPE_NAMES:
        raise CliError(f"unknown --dtype {shown(args.dtype)!s}; use one of {', '.join(DTYPE_NAMES)}")


def check_text(text: str, what: str) -> str:
    """``text``, or one error where it holds a lone surrogate: bytes that were not UTF-8 (the
    command line and stdin carry them as surrogates), which no tokenizer takes."""
    bad = next((c for c in text if 0xD800 <= ord(c) <= 0xDFFF), None)
    if bad is not None:
        raise CliError(f"{what} is not valid UTF-8 text (it holds {shown(bad)}); give it as UTF-8")
    return text


def check_gpus(text: str | None) -> tuple[int, ...] | None:
    """``--gpus 0,1`` → ``(0, 1)`` (distinct non-negative integers)."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if not parts or not all(p.isdigit() for p in parts):
        raise CliError(f"--gpus takes comma-separated GPU indices such as 0 or 0,1; got {shown(text)}")
    ids = tuple(int(p) for p in parts)
    if len(set(ids)) != len(ids):
        raise CliError(f"--gpus lists a GPU twice: {shown(text)}")
    return ids


def check_device(device: str | None) -> None:
    """Refuse a device this machine does not have (imports torch unless auto/cpu)."""
    if device is None or device in ("auto", "cpu"):
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise CliError(f"unknown --device {shown(device)}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
            raise CliError(f"--device {shown(device)}: no CUDA GPU is available here (torch {torch.__version__}, "
                           f"{build}); use --device cpu or auto")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise CliError(f"--device {shown(device)}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise CliError(f"--device {shown(device)}: MPS is not available here; use --device cpu or auto")
    elif dev.type == "meta":
        raise CliError("--device meta holds no weights and cannot generate")


# --------------------------------------------------------------------------------------------
# Files read
# --------------------------------------------------------------------------------------------


def _stat(path: Path, what: str) -> os.stat_result | None:
    """``os.stat`` or None when the path does not exist; other OS errors → CliError."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    except OSError as exc:
        raise CliError(f"cannot use {what} {shown(path)}: {exc.strerror or exc}") from None


def read_prompt_file(path: Path) -> list[str]:
    """The non-empty stripped lines of a UTF-8 text file (a BOM is allowed), or the prompts of a
    JSONL file (see :func:`tracer.corpus.data.looks_like_jsonl`)."""
    st = _stat(path, "data file")
    if st is None:
        raise CliError(f"data file not found: {shown(path)}")
    if stat.S_ISDIR(st.st_mode):
        raise CliError(f"data file is a directory, not a file: {shown(path)}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise CliError(f"cannot read data file {shown(path)}: {exc.strerror or exc}") from None
    nul = raw.find(b"\0")
    if nul >= 0:
        raise CliError(f"data file looks binary (a NUL byte at offset {nul}): {shown(path)}; "
                       "expected UTF-8 text, one prompt per line")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CliError(
            f"data file is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}): {shown(path)}; "
            "convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None
    from ..corpus.data import looks_like_jsonl, split_lines

    prompts = [line.strip() for line in split_lines(text) if line.strip()]
    if not prompts:
        raise CliError(f"data file has no prompts: {shown(path)}")
    if looks_like_jsonl(prompts[0]):  # JSONL, as --dataset reads it: the prompts, not the raw lines
        return _jsonl_prompts(path)
    return prompts


def _jsonl_prompts(path: Path) -> list[str]:
    """The ``prompt`` of every line of a JSONL data file (read and checked as ``--dataset``
    reads it: line numbers in every error); chat ``messages`` need ``--dataset``."""
    from ..corpus.data import CorpusError, read_data_file

    try:
        items = read_data_file(path)
    except CorpusError as exc:
        raise CliError(str(exc)) from None
    chat = next((it for it in items if not isinstance(it.prompt, str)), None)
    if chat is not None:
        raise CliError(f"{shown(path)}: line {chat.line}: chat 'messages' prompts are read with --dataset DIR; "
                       "without it each line needs a text 'prompt'")
    return [it.prompt for it in items]


def check_trace_path(path: Path) -> None:
    """``tracer inspect PATH``: the path exists and can be looked at."""
    if _stat(path, "trace") is None:
        raise CliError(f"no such trace: {shown(path)}")


# --------------------------------------------------------------------------------------------
# Folders and files written
# --------------------------------------------------------------------------------------------


def _existing_ancestor(start: Path, what: str, path: Path) -> tuple[Path, os.stat_result]:
    """The nearest path at or above ``start`` that exists (it must be a folder); messages
    name ``path``, the file or folder the user gave."""
    current = start
    while True:
        st = _stat(current, what)
        if st is not None:
            break
        if current.parent == current:  # pragma: no cover - the root always exists
            raise CliError(f"{what} {shown(path)}: no existing folder above it")
        current = current.parent
    if not stat.S_ISDIR(st.st_mode):
        where = "is a file" if current == path else f"is under a file ({shown(current)})"
        raise CliError(f"{what} {shown(path)} {where}, not a folder")
    return current, st


def _probe_writable(folder: Path, what: str, path: Path) -> None:
    """Refuse ``folder`` unless a file can really be created (and removed) in it."""
    why = None
    if not os.access(folder, os.W_OK | os.X_OK):
        why = "permission denied"
    else:
        try:
            fd, name = tempfile.mkstemp(prefix=".tracer-probe-", dir=folder)
            os.close(fd)
            os.unlink(name)
        except OSError as exc:
            why = (exc.strerror or str(exc)).lower()
    if why is not None:
        where = "" if folder == path else f" (in {shown(folder)})"
        raise CliError(f"cannot write {what} {shown(path)}{where}: {why}")


def check_output_folder(path: Path, what: str = "--trace-dir") -> None:
    """A folder that exists or can be created, and that files can be written into."""
    path = path.expanduser()
    folder, _ = _existing_ancestor(path, what, path)
    _probe_writable(folder, what, path)


def check_output_file(path: Path, what: str = "--predictions-file") -> None:
    """A file that can be (re)written atomically: not a folder, its folder writable."""
    path = path.expanduser()
    st = _stat(path, what)
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise CliError(f"{what} {shown(path)} is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise CliError(f"{what} {shown(path)} exists and is not a regular file")
    folder, _ = _existing_ancestor(path.parent, what, path)
    _probe_writable(folder, what, path)
