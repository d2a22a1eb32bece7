"""Validation of a trace folder before decoding: the folder, its manifest, its file table.

Every check raises one :class:`~tracer.errors.TraceFormatError` naming the file and what is
wrong.  Standard library, numpy and safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy as st_numpy

from .errors import TraceFormatError
from .records import SCHEMA_VERSION

FORMAT_NAME = "tracer-trace"
MANIFEST = "manifest.json"
TABLES = "tables.safetensors"
BLOBS = "blobs.safetensors"

__all__ = [
    "FORMAT_NAME", "MANIFEST", "TABLES", "BLOBS", "Doc", "Tables", "is_kind", "jsonable", "sha256_file",
    "trace_folder", "plain_file", "read_manifest", "check_files", "read_tables",
]


def jsonable(x: Any) -> Any:
    """``x`` as plain JSON types: numpy scalars/arrays -> Python, tuples -> lists, dict keys ->
    str; anything else that JSON cannot hold becomes its ``str()``."""
    if x is None or isinstance(x, bool):
        return x
    if isinstance(x, str):
        return str(x)  # str subclasses (torch's TorchVersion) as plain str
    if isinstance(x, (int, float)):
        return x if type(x) in (int, float) else (int(x) if isinstance(x, int) else float(x))
    if isinstance(x, np.generic):
        return jsonable(x.item())
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, dict) or hasattr(x, "items"):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in x]
    return str(x)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "a list", dict: "an object"}


def is_kind(v: Any, kind: type) -> bool:
    if kind is int:  # bounded so every stored integer fits numpy's int64
        return isinstance(v, int) and not isinstance(v, bool) and -(2**62) <= v < 2**62
    if kind is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, kind)


class Doc:
    """Typed field access on the parsed manifest; every failure is a TraceFormatError."""

    def __init__(self, where: Path):
        self.where = where

    def fail(self, msg: str) -> TraceFormatError:
        return TraceFormatError(f"{self.where}: {msg}")

    def get(self, obj: Any, key: str, kind: type, ctx: str, *, nullable: bool = False) -> Any:
        name = f"{ctx}.{key}" if ctx else key
        if not isinstance(obj, dict) or key not in obj:
            raise self.fail(f"missing field {name!r}")
        v = obj[key]
        if v is None and nullable:
            return None
        if not is_kind(v, kind):
            raise self.fail(f"field {name!r} should be {TYPE_NAMES[kind]}, got {type(v).__name__}")
        return v

    def items(self, v: Any, kind: type, name: str, length: int | None = None, *, nullable: bool = False) -> list:
        if not isinstance(v, list):
            raise self.fail(f"field {name!r} should be a list, got {type(v).__name__}")
        if length is not None and len(v) != length:
            raise self.fail(f"field {name!r} has {len(v)} entries, expected {length}")
        for x in v:
            if not (is_kind(x, kind) or (nullable and x is None)):
                raise self.fail(f"field {name!r} holds {type(x).__name__}, expected {TYPE_NAMES[kind]}")
        return v

    def list_field(self, obj: Any, key: str, kind: type, ctx: str, length: int | None = None, **kw: Any) -> list:
        name = f"{ctx}.{key}" if ctx else key
        return self.items(self.get(obj, key, list, ctx), kind, name, length, **kw)


class Tables:
    """Shape/dtype-checked access to the loaded tables."""

    def __init__(self, where: Path, arrays: dict[str, np.ndarray]):
        self.where = where
        self.arrays = arrays

    def get(self, key: str, shape: tuple[int | None, ...], dtype: Any) -> np.ndarray:
        if key not in self.arrays:
            raise TraceFormatError(f"{self.where}: missing array {key!r}")
        a = self.arrays[key]
        if a.dtype != np.dtype(dtype):
            raise TraceFormatError(f"{self.where}: array {key!r} has dtype {a.dtype}, expected {np.dtype(dtype)}")
        if len(a.shape) != len(shape) or any(e is not None and e != d for e, d in zip(shape, a.shape)):
            want = "(" + ", ".join("?" if e is None else str(e) for e in shape) + ")"
            raise TraceFormatError(
                f"{self.where}: array {key!r} has shape {tuple(a.shape)}, expected {want} "
                "from the manifest's step count, batch size and flags"
            )
        return a


def trace_folder(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.name == MANIFEST and p.is_file():
        plain_file(p)
        return p.parent
    if not p.exists():
        raise TraceFormatError(f"{p}: no such trace (expected a folder holding {MANIFEST})")
    if not p.is_dir():
        raise TraceFormatError(f"{p}: not a trace folder (a trace is a folder holding {MANIFEST})")
    if not (p / MANIFEST).is_file():
        raise TraceFormatError(f"{p}: not a trace folder: {MANIFEST} is missing")
    plain_file(p / MANIFEST)
    return p


def plain_file(file: Path) -> None:
    """A trace's files must be regular files inside its folder: no links to elsewhere."""
    if file.is_symlink() or not stat.S_ISREG(file.lstat().st_mode):
        raise TraceFormatError(f"{file}: not a regular file inside the trace (links are refused)")


def read_manifest(folder: Path) -> dict[str, Any]:
    where = folder / MANIFEST
    try:
        raw = where.read_bytes()
    except OSError as exc:
        raise TraceFormatError(f"{where}: cannot read ({exc})") from None
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TraceFormatError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(m, dict):
        raise TraceFormatError(f"{where}: not a JSON object")
    if m.get("format") != FORMAT_NAME:
        raise TraceFormatError(f"{where}: not a tracer trace (format is {m.get('format')!r}, expected {FORMAT_NAME!r})")
    version = m.get("schema_version")
    ours = int(SCHEMA_VERSION.split(".")[0])
    match = re.fullmatch(r"(\d{1,6})\.(\d{1,6})", version) if isinstance(version, str) else None
    if match is None:
        raise TraceFormatError(f"{where}: schema_version {version!r} is not of the form 'major.minor'")
    major = int(match.group(1))
    if major > ours:
        raise TraceFormatError(
            f"{where}: written by a newer tracer (schema {version}); this tracer reads {ours}.x — upgrade tracer"
        )
    if major < ours:
        raise TraceFormatError(f"{where}: schema {version} is older than this tracer reads ({ours}.x)")
    return m


def check_files(folder: Path, m: dict[str, Any], doc: Doc) -> dict[str, dict[str, Any]]:
    entries = doc.list_field(m, "files", dict, "")
    out: dict[str, dict[str, Any]] = {}
    for i, e in enumerate(entries):
        name = doc.get(e, "name", str, f"files[{i}]")
        size = doc.get(e, "bytes", int, f"files[{i}]")
        digest = doc.get(e, "sha256", str, f"files[{i}]")
        if (
            name in ("", ".", "..")
            or "/" in name
            or "\\" in name
            or "\x00" in name
            or os.path.isabs(name)
            or Path(name).name != name
            or (os.path.altsep and os.path.altsep in name)
        ):
            raise doc.fail(f"files entry {name!r} points outside the trace (must be a plain file name)")
        if size < 0 or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise doc.fail(f"files entry {name!r} has an invalid size or sha256")
        if name in out:
            raise doc.fail(f"files entry {name!r} is listed twice")
        file = folder / name
        if not file.is_file():
            raise TraceFormatError(f"{file}: listed in the manifest but missing")
        plain_file(file)
        actual = file.stat().st_size
        if actual != size:
            raise TraceFormatError(f"{file}: size is {actual} bytes, the manifest says {size} (truncated or altered)")
        out[name] = e
    if TABLES not in out:
        raise doc.fail(f"the files table does not list {TABLES}")
    return out


def read_tables(folder: Path, entry: dict[str, Any]) -> dict[str, np.ndarray]:
    where = folder / TABLES
    try:
        data = where.read_bytes()
    except OSError as exc:
        raise TraceFormatError(f"{where}: cannot read ({exc})") from None
    if len(data) != entry["bytes"]:
        raise TraceFormatError(f"{where}: size is {len(data)} bytes, the manifest says {entry['bytes']}")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise TraceFormatError(f"{where}: sha256 does not match the manifest (file altered or corrupt)")
    try:
        return dict(st_numpy.load(data))
    except Exception as exc:  # SafetensorError and friends
        raise TraceFormatError(f"{where}: corrupt safetensors data ({exc})") from None


