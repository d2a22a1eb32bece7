"""Trace files: save and load (lazily).  Inspect / HTML / Perfetto live in ``tracer.export``.

A saved trace is ONE FOLDER (conventionally named ``*.trace``) holding three files::

    run.trace/
      manifest.json        versioned JSON: meta, prompts, token texts, per-step scalars, file table
      tables.safetensors   every small per-step array, stacked column-wise (read eagerly)
      blobs.safetensors    the large arrays of ``Trace.blobs`` under their ``blob_key`` names
                           (memory-mapped and read one tensor at a time)

No pickle anywhere: JSON and safetensors only.  ``docs/trace-format.md`` describes every field.
Encoding and decoding mirror each other section by section (inputs, stages, extras, cache,
text); the folder/manifest checks live in :mod:`tracer.manifest`.  This module imports only the
standard library, numpy, safetensors and the records (never torch or transformers).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import safetensors
import safetensors.numpy as st_numpy

from .errors import TraceFormatError
from .jsonio import current_umask
from .decode import decode_trace
from .encode import encode_trace
from .manifest import (
    BLOBS,
    FORMAT_NAME,
    MANIFEST,
    TABLES,
    Doc,
    Tables,
    check_files,
    jsonable,
    read_manifest,
    read_tables,
    sha256_file,
    trace_folder,
)
from .records import SCHEMA_VERSION, MemoryStore, Trace

__all__ = ["SCHEMA_VERSION", "FORMAT_NAME", "MANIFEST", "TABLES", "BLOBS", "SafetensorsStore", "save_trace", "load_trace",
           "jsonable", "trace_folder"]

# Deprecated private spellings kept for callers written before the manifest module existed
# (tracer.export): use ``jsonable`` / ``trace_folder``.
_jsonable = jsonable
_trace_folder = trace_folder

def save_trace(trace: Trace, path: str | os.PathLike[str]) -> Path:
    """Write ``trace`` to the folder ``path`` (``.trace`` suffix conventional) and return it.

    The files are written to a temporary folder beside ``path`` and renamed into place, so a
    crash never leaves a half-written trace.  An existing trace folder (or empty folder) at
    ``path`` is replaced; any other existing file or folder raises ``FileExistsError``."""
    target = Path(path)
    if target.exists() and not _replaceable(target):
        raise FileExistsError(f"{target} exists and is not a trace folder; refusing to overwrite it")
    manifest, tables = encode_trace(trace)
    blobs = {k: np.ascontiguousarray(trace.blobs.get(k)) for k in sorted(trace.blobs.keys())}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        tmp.mkdir()
    except OSError as exc:  # name the path asked for, not the hidden temporary folder
        raise type(exc)(exc.errno, exc.strerror, str(target)) from exc
    try:
        st_numpy.save_file(tables, str(tmp / TABLES))
        st_numpy.save_file(blobs, str(tmp / BLOBS))
        manifest["files"] = [
            {"name": name, "bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
            for name in (TABLES, BLOBS)
        ]
        text = json.dumps(manifest, indent=1, ensure_ascii=False)
        (tmp / MANIFEST).write_bytes(text.encode("utf-8"))
        mode = 0o666 & ~current_umask()  # safetensors writes 0600; give all three files the usual mode
        for name in (TABLES, BLOBS, MANIFEST):
            os.chmod(tmp / name, mode)
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        if target.exists():
            if not _replaceable(target):
                raise FileExistsError(f"{target} exists and is not a trace folder; refusing to overwrite it")
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno is None:  # our own refusals above already name the path
            raise
        raise type(exc)(exc.errno, exc.strerror, str(target)) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _replaceable(target: Path) -> bool:
    """An empty folder, or one of our traces (our file names only, manifest of our format):
    never an unrelated folder that happens to hold a ``manifest.json``."""
    if target.is_symlink() or not target.is_dir():
        return False
    names = {p.name for p in target.iterdir()}
    if not names:
        return True
    if not names <= {MANIFEST, TABLES, BLOBS} or MANIFEST not in names:
        return False
    try:
        manifest = json.loads((target / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME


# ======================================================================================
# Lazy blobs
# ======================================================================================


class SafetensorsStore:
    """A read-only :class:`~tracer.records.BlobStore` over one ``.safetensors`` file.

    The header is read on construction; ``get(key)`` reads only that tensor (the file is
    memory-mapped by safetensors).  The handle stays open until :meth:`close`."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            self._file = safetensors.safe_open(str(self.path), framework="numpy")
            self._keys = list(self._file.keys())
        except Exception as exc:  # SafetensorError, OSError: both mean an unreadable file
            raise TraceFormatError(f"{self.path}: not a readable safetensors file ({exc})") from None
        self._key_set = set(self._keys)

    def get(self, key: str) -> np.ndarray:
        if key not in self._key_set:
            raise KeyError(f"nothing recorded under {key!r}")
        if self._file is None:
            raise ValueError(f"{self.path}: store is closed")
        try:
            return self._file.get_tensor(key)
        except Exception as exc:
            raise TraceFormatError(f"{self.path}: cannot read tensor {key!r} ({exc})") from None

    def keys(self) -> Iterator[str]:
        return iter(list(self._keys))

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def __len__(self) -> int:
        return len(self._keys)

    def close(self) -> None:
        self._file = None

    def __enter__(self) -> "SafetensorsStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsStore({str(self.path)!r}, {len(self._keys)} arrays)"


# ======================================================================================
# Load
# ======================================================================================


def load_trace(path: str | os.PathLike[str], *, verify_blobs: bool = False) -> Trace:
    """Read a trace folder (or its ``manifest.json``) written by :func:`save_trace`.

    The manifest and ``tables.safetensors`` are read eagerly and ``tables``' sha256 is verified.
    ``Trace.blobs`` is a lazy :class:`SafetensorsStore`: only the size of ``blobs.safetensors`` is
    checked on open (hashing a large file would defeat lazy loading); pass
    ``verify_blobs=True`` to also verify its sha256.  Every problem, an operating-system error
    included (unreadable folder, name too long, permission), raises one
    :class:`~tracer.errors.TraceFormatError` naming the file and what is wrong."""
    try:
        return _load(path, verify_blobs)
    except OSError as exc:
        name = getattr(exc, "filename", None) or path
        raise TraceFormatError(f"{name}: cannot read the trace ({type(exc).__name__}: {exc.strerror or exc})") from None


def _load(path: str | os.PathLike[str], verify_blobs: bool) -> Trace:
    folder = trace_folder(path)
    where = folder / MANIFEST
    m = read_manifest(folder)
    doc = Doc(where)
    files = check_files(folder, m, doc)
    tables = read_tables(folder, files[TABLES])
    blobs: Any = MemoryStore()
    if BLOBS in files:
        if verify_blobs and sha256_file(folder / BLOBS) != files[BLOBS]["sha256"]:
            raise TraceFormatError(f"{folder / BLOBS}: sha256 does not match the manifest")
        blobs = SafetensorsStore(folder / BLOBS)
    try:
        return decode_trace(m, doc, Tables(folder / TABLES, tables), blobs)
    except TraceFormatError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
        # A safety net: the explicit checks above should have caught it with a better message.
        raise TraceFormatError(f"{where}: inconsistent trace ({type(exc).__name__}: {exc})") from None


