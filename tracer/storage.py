"""Trace files: save, load (lazily), inspect, and export to HTML and Perfetto.

A saved trace is ONE FOLDER (conventionally named ``*.trace``) holding three files::

    run.trace/
      manifest.json        versioned JSON: meta, prompts, token texts, per-step scalars, file table
      tables.safetensors   every small per-step array, stacked column-wise (read eagerly)
      blobs.safetensors    the large arrays of ``Trace.blobs`` under their ``blob_key`` names
                           (memory-mapped and read one tensor at a time)

No pickle anywhere: JSON and safetensors only.  ``docs/trace-format.md`` describes every field.
This module imports only the standard library, numpy, safetensors and ``.records`` (never torch
or transformers), so loading a trace is fast and needs no model.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import json
import math
import os
import re
import shutil
import struct
import uuid
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import safetensors
import safetensors.numpy as st_numpy

from .records import (
    SCHEMA_VERSION,
    AttentionStats,
    CacheLayerInfo,
    CacheTimeline,
    LogitLens,
    MemoryStore,
    Stage,
    StepInputs,
    StepRecord,
    TopK,
    Trace,
    TraceFormatError,
    TraceMeta,
    blob_key,
    parse_blob_key,
)

FORMAT_NAME = "tracer-trace"
MANIFEST = "manifest.json"
TABLES = "tables.safetensors"
BLOBS = "blobs.safetensors"

__all__ = [
    "FORMAT_NAME",
    "SafetensorsStore",
    "save_trace",
    "load_trace",
    "inspect_trace",
    "trace_to_html",
    "trace_summary_html",
    "trace_to_perfetto",
]


# ======================================================================================
# JSON helpers
# ======================================================================================


def _jsonable(x: Any) -> Any:
    """``x`` as plain JSON types: numpy scalars/arrays -> Python, tuples -> lists, dict keys ->
    str; anything else that JSON cannot hold becomes its ``str()``."""
    if x is None or isinstance(x, bool):
        return x
    if isinstance(x, str):
        return str(x)  # str subclasses (torch's TorchVersion) as plain str
    if isinstance(x, (int, float)):
        return x if type(x) in (int, float) else (int(x) if isinstance(x, int) else float(x))
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, dict) or hasattr(x, "items"):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in x]
    return str(x)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ======================================================================================
# Save
# ======================================================================================


def _stack(arrays: Sequence[np.ndarray], empty_shape: tuple[int, ...], dtype: Any, what: str) -> np.ndarray:
    if not arrays:
        return np.zeros(empty_shape, dtype=dtype)
    try:
        return np.ascontiguousarray(np.stack([np.asarray(a, dtype=dtype) for a in arrays]))
    except ValueError as exc:
        raise ValueError(f"cannot save trace: {what} changes shape between steps ({exc})") from None


def _concat(arrays: Sequence[np.ndarray], axis: int, empty_shape: tuple[int, ...], what: str) -> np.ndarray:
    if not arrays:
        return np.zeros(empty_shape, dtype=np.int64)
    try:
        return np.ascontiguousarray(np.concatenate([np.asarray(a, dtype=np.int64) for a in arrays], axis=axis))
    except ValueError as exc:
        raise ValueError(f"cannot save trace: {what} has inconsistent shapes ({exc})") from None


def _same_layers(values: list[tuple[int, ...]], what: str) -> list[int]:
    if not values:
        return []
    first = tuple(int(v) for v in values[0])
    if any(tuple(int(v) for v in other) != first for other in values[1:]):
        raise ValueError(f"cannot save trace: {what} layers differ between steps")
    return list(first)


def _encode(trace: Trace) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The manifest (without its file table) and the tables of ``trace``."""
    steps = trace.steps
    n = len(steps)
    b = trace.batch_size
    t: dict[str, np.ndarray] = {
        "prompt_ids": np.ascontiguousarray(trace.prompt_ids, dtype=np.int64),
        "prompt_mask": np.ascontiguousarray(trace.prompt_mask, dtype=np.int64),
        "sequences": np.ascontiguousarray(trace.sequences, dtype=np.int64),
        "steps.chosen": _stack([s.chosen for s in steps], (0, b), np.int64, "chosen"),
        "steps.active": _stack([s.active for s in steps], (0, b), np.bool_, "active"),
        "steps.finished": _stack([s.finished for s in steps], (0, b), np.bool_, "finished"),
    }
    # Inputs are ragged (the prefill feeds the prompt, a decode step one token): concatenated
    # along the query axis, with each step's query length in the manifest.
    t["inputs.input_ids"] = _concat([s.inputs.input_ids for s in steps], 1, (b, 0), "input_ids")
    t["inputs.position_ids"] = _concat(
        [s.inputs.position_ids for s in steps if s.inputs.position_ids is not None], 1, (b, 0), "position_ids"
    )
    t["inputs.cache_position"] = _concat([s.inputs.cache_position for s in steps], 0, (0,), "cache_position")

    n_stages = len(steps[0].stages) if steps else 0
    if any(len(s.stages) != n_stages for s in steps):
        raise ValueError("cannot save trace: the number of logits stages changes between steps")

    def stage_col(get: Any, dtype: Any, tail: tuple[int, ...], what: str) -> np.ndarray:
        rows = [_stack([get(st) for st in s.stages], (0, *tail), dtype, what) for s in steps]
        return _stack(rows, (0, 0, *tail), dtype, what)

    t["stages.top_ids"] = stage_col(lambda st: st.top.ids, np.int64, (b, 0), "stage top-k ids")
    t["stages.top_values"] = stage_col(lambda st: st.top.values, np.float32, (b, 0), "stage top-k values")
    t["stages.logsumexp"] = stage_col(lambda st: st.top.logsumexp, np.float32, (b,), "stage logsumexp")
    t["stages.n_masked"] = stage_col(lambda st: st.n_masked, np.int64, (b,), "stage n_masked")
    t["stages.chosen_rank"] = stage_col(lambda st: st.chosen_rank, np.int64, (b,), "stage chosen_rank")
    t["stages.chosen_logprob"] = stage_col(lambda st: st.chosen_logprob, np.float32, (b,), "stage chosen_logprob")
    t["stages.kl"] = stage_col(lambda st: st.kl, np.float32, (b,), "stage kl")
    nan = np.full(b, np.nan, np.float32)  # entropy is optional per stage: NaN where absent (flags in manifest)
    t["stages.entropy"] = stage_col(lambda st: nan if st.entropy is None else st.entropy, np.float32, (b,),
                                    "stage entropy")

    rn = [s.residual_norms for s in steps if s.residual_norms is not None]
    t["residual_norms"] = _stack(rn, (0, len(trace.residual_points), b), np.float32, "residual_norms")
    lens = [s.logit_lens for s in steps if s.logit_lens is not None]
    lens_layers = _same_layers([x.layers for x in lens], "logit lens")
    for name, dtype in (("chosen_rank", np.int64), ("chosen_prob", np.float32), ("top_id", np.int64)):
        t[f"logit_lens.{name}"] = _stack([getattr(x, name) for x in lens], (0, 0, b), dtype, f"logit lens {name}")
    stats = [s.attention_stats for s in steps if s.attention_stats is not None]
    stats_layers = _same_layers([x.layers for x in stats], "attention stats")
    for name, dtype in (("entropy", np.float32), ("sink", np.float32), ("argmax", np.int64)):
        t[f"attention_stats.{name}"] = _stack(
            [getattr(x, name) for x in stats], (0, 0, b, 0), dtype, f"attention stats {name}"
        )

    cache_doc = None
    if trace.cache is not None:
        c = trace.cache
        for name in ("seq_len", "kept_len", "allocated_len", "nbytes"):
            t[f"cache.{name}"] = np.ascontiguousarray(getattr(c, name), dtype=np.int64).reshape(-1, len(c.layers))
        cache_doc = {
            "cache_class": c.cache_class,
            "batch_size": int(c.batch_size),
            "reused_len": int(c.reused_len),
            "num_rows": int(t["cache.seq_len"].shape[0]),
            "layers": [_jsonable(dataclasses.asdict(info)) for info in c.layers],
        }

    manifest = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "writer": "tracer.storage",
        "batch_size": b,
        "prompt_len": trace.prompt_len,
        "num_steps": n,
        "meta": _jsonable(dataclasses.asdict(trace.meta)),
        "prompts": None if trace.prompts is None else [str(p) for p in trace.prompts],
        "output_text": None if trace.output_text is None else [str(x) for x in trace.output_text],
        "token_text": {str(int(k)): str(v) for k, v in trace.token_text.items()},
        "residual_points": [str(p) for p in trace.residual_points],
        "attention_layers": [int(x) for x in trace.attention_layers],
        "attention_heads": [int(x) for x in trace.attention_heads],
        "kv_head_of": [int(x) for x in trace.kv_head_of],
        "steps": {
            "index": [int(s.index) for s in steps],
            "sampled": [bool(s.sampled) for s in steps],
            "time_s": [float(s.time_s) for s in steps],
            "stop_reasons": [[None if r is None else str(r) for r in s.stop_reasons] for s in steps],
            "cache_len_before": [int(s.inputs.cache_len_before) for s in steps],
            "attention_mask_shape": [
                None if s.inputs.attention_mask_shape is None else [int(d) for d in s.inputs.attention_mask_shape]
                for s in steps
            ],
            "query_len": [int(np.shape(s.inputs.input_ids)[1]) for s in steps],
            "has_position_ids": [s.inputs.position_ids is not None for s in steps],
            "has_residual_norms": [s.residual_norms is not None for s in steps],
            "has_logit_lens": [s.logit_lens is not None for s in steps],
            "has_attention_stats": [s.attention_stats is not None for s in steps],
            "stage_names": [[str(st.name) for st in s.stages] for s in steps],
            "stage_params": [[_jsonable(dict(st.params)) for st in s.stages] for s in steps],
            "stage_has_entropy": [[st.entropy is not None for st in s.stages] for s in steps],
            "logit_lens_layers": lens_layers,
            "attention_stats_layers": stats_layers,
        },
        "cache": cache_doc,
    }
    return manifest, t


def save_trace(trace: Trace, path: str | os.PathLike[str]) -> Path:
    """Write ``trace`` to the folder ``path`` (``.trace`` suffix conventional) and return it.

    The files are written to a temporary folder beside ``path`` and renamed into place, so a
    crash never leaves a half-written trace.  An existing trace folder (or empty folder) at
    ``path`` is replaced; any other existing file or folder raises ``FileExistsError``."""
    target = Path(path)
    if target.exists() and not _replaceable(target):
        raise FileExistsError(f"{target} exists and is not a trace folder; refusing to overwrite it")
    manifest, tables = _encode(trace)
    blobs = {k: np.ascontiguousarray(trace.blobs.get(k)) for k in sorted(trace.blobs.keys())}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        st_numpy.save_file(tables, str(tmp / TABLES))
        st_numpy.save_file(blobs, str(tmp / BLOBS))
        manifest["files"] = [
            {"name": name, "bytes": (tmp / name).stat().st_size, "sha256": _sha256_file(tmp / name)}
            for name in (TABLES, BLOBS)
        ]
        text = json.dumps(manifest, indent=1, ensure_ascii=False)
        (tmp / MANIFEST).write_bytes(text.encode("utf-8"))
        for name in (TABLES, BLOBS, MANIFEST):
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _replaceable(target: Path) -> bool:
    return target.is_dir() and ((target / MANIFEST).is_file() or not any(target.iterdir()))


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
# Load: validation helpers
# ======================================================================================

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "a list", dict: "an object"}


def _is(v: Any, kind: type) -> bool:
    if kind is int:  # bounded so every stored integer fits numpy's int64
        return isinstance(v, int) and not isinstance(v, bool) and -(2**62) <= v < 2**62
    if kind is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, kind)


class _Doc:
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
        if not _is(v, kind):
            raise self.fail(f"field {name!r} should be {_TYPE_NAMES[kind]}, got {type(v).__name__}")
        return v

    def items(self, v: Any, kind: type, name: str, length: int | None = None, *, nullable: bool = False) -> list:
        if not isinstance(v, list):
            raise self.fail(f"field {name!r} should be a list, got {type(v).__name__}")
        if length is not None and len(v) != length:
            raise self.fail(f"field {name!r} has {len(v)} entries, expected {length}")
        for x in v:
            if not (_is(x, kind) or (nullable and x is None)):
                raise self.fail(f"field {name!r} holds {type(x).__name__}, expected {_TYPE_NAMES[kind]}")
        return v

    def list_field(self, obj: Any, key: str, kind: type, ctx: str, length: int | None = None, **kw: Any) -> list:
        name = f"{ctx}.{key}" if ctx else key
        return self.items(self.get(obj, key, list, ctx), kind, name, length, **kw)


class _Tables:
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


def _trace_folder(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.name == MANIFEST and p.is_file():
        return p.parent
    if not p.exists():
        raise TraceFormatError(f"{p}: no such trace (expected a folder holding {MANIFEST})")
    if not p.is_dir():
        raise TraceFormatError(f"{p}: not a trace folder (a trace is a folder holding {MANIFEST})")
    if not (p / MANIFEST).is_file():
        raise TraceFormatError(f"{p}: not a trace folder: {MANIFEST} is missing")
    return p


def _read_manifest(folder: Path) -> dict[str, Any]:
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


def _check_files(folder: Path, m: dict[str, Any], doc: _Doc) -> dict[str, dict[str, Any]]:
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
        actual = file.stat().st_size
        if actual != size:
            raise TraceFormatError(f"{file}: size is {actual} bytes, the manifest says {size} (truncated or altered)")
        out[name] = e
    if TABLES not in out:
        raise doc.fail(f"the files table does not list {TABLES}")
    return out


def _read_tables(folder: Path, entry: dict[str, Any]) -> dict[str, np.ndarray]:
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


# ======================================================================================
# Load
# ======================================================================================


def load_trace(path: str | os.PathLike[str], *, verify_blobs: bool = False) -> Trace:
    """Read a trace folder (or its ``manifest.json``) written by :func:`save_trace`.

    The manifest and ``tables.safetensors`` are read eagerly and ``tables``' sha256 is verified.
    ``Trace.blobs`` is a lazy :class:`SafetensorsStore`: only the size of ``blobs.safetensors`` is
    checked on open (hashing a large file would defeat lazy loading); pass
    ``verify_blobs=True`` to also verify its sha256.  Every problem raises one
    :class:`~tracer.records.TraceFormatError` naming the file and what is wrong."""
    folder = _trace_folder(path)
    where = folder / MANIFEST
    m = _read_manifest(folder)
    doc = _Doc(where)
    files = _check_files(folder, m, doc)
    tables = _read_tables(folder, files[TABLES])
    blobs: Any = MemoryStore()
    if BLOBS in files:
        if verify_blobs and _sha256_file(folder / BLOBS) != files[BLOBS]["sha256"]:
            raise TraceFormatError(f"{folder / BLOBS}: sha256 does not match the manifest")
        blobs = SafetensorsStore(folder / BLOBS)
    try:
        return _decode(m, doc, _Tables(folder / TABLES, tables), blobs)
    except TraceFormatError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
        # A safety net: the explicit checks above should have caught it with a better message.
        raise TraceFormatError(f"{where}: inconsistent trace ({type(exc).__name__}: {exc})") from None


def _decode(m: dict[str, Any], doc: _Doc, tab: _Tables, blobs: Any) -> Trace:
    b = doc.get(m, "batch_size", int, "")
    p = doc.get(m, "prompt_len", int, "")
    n = doc.get(m, "num_steps", int, "")
    if b < 0 or p < 0 or n < 0:
        raise doc.fail("negative batch_size, prompt_len or num_steps")
    meta = _decode_meta(doc.get(m, "meta", dict, ""), doc)
    prompts = doc.get(m, "prompts", list, "", nullable=True)
    if prompts is not None:
        doc.items(prompts, str, "prompts")
    output_text = m.get("output_text")  # optional
    if output_text is not None:
        doc.items(output_text, str, "output_text")
    tt = doc.get(m, "token_text", dict, "")
    token_text: dict[int, str] = {}
    for k, v in tt.items():
        if not re.fullmatch(r"-?\d{1,19}", k) or not isinstance(v, str):
            raise doc.fail(f"token_text entry {k!r} is not an integer id mapped to a string")
        token_text[int(k)] = v
    points = tuple(doc.list_field(m, "residual_points", str, ""))
    att_layers = tuple(doc.list_field(m, "attention_layers", int, ""))
    att_heads = tuple(doc.list_field(m, "attention_heads", int, ""))
    kv_head_of = tuple(doc.list_field(m, "kv_head_of", int, ""))

    st = doc.get(m, "steps", dict, "")
    c = "steps"
    index = doc.list_field(st, "index", int, c, n)
    sampled = doc.list_field(st, "sampled", bool, c, n)
    time_s = doc.list_field(st, "time_s", float, c, n)
    stop = doc.list_field(st, "stop_reasons", list, c, n)
    for r in stop:
        doc.items(r, str, "steps.stop_reasons[]", b, nullable=True)
    cache_before = doc.list_field(st, "cache_len_before", int, c, n)
    mask_shapes = doc.list_field(st, "attention_mask_shape", list, c, n, nullable=True)
    for ms in mask_shapes:
        if ms is not None:
            doc.items(ms, int, "steps.attention_mask_shape[]")
    qlen = doc.list_field(st, "query_len", int, c, n)
    if any(q < 0 for q in qlen):
        raise doc.fail("negative steps.query_len")
    flags = {k: doc.list_field(st, k, bool, c, n) for k in
             ("has_position_ids", "has_residual_norms", "has_logit_lens", "has_attention_stats")}
    names = doc.list_field(st, "stage_names", list, c, n)
    params = doc.list_field(st, "stage_params", list, c, n)
    n_stages = len(names[0]) if names else 0
    for nm, pr in zip(names, params):
        doc.items(nm, str, "steps.stage_names[]", n_stages)
        doc.items(pr, dict, "steps.stage_params[]", n_stages)
    has_ent = st.get("stage_has_entropy")  # optional: absent means no stage entropies
    if has_ent is not None:
        doc.items(has_ent, list, "steps.stage_has_entropy", n)
        for row in has_ent:
            doc.items(row, bool, "steps.stage_has_entropy[]", n_stages)
    lens_layers = tuple(doc.list_field(st, "logit_lens_layers", int, c))
    stats_layers = tuple(doc.list_field(st, "attention_stats_layers", int, c))

    prompt_ids = tab.get("prompt_ids", (b, p), np.int64)
    prompt_mask = tab.get("prompt_mask", (b, p), np.int64)
    sequences = tab.get("sequences", (b, None), np.int64)
    chosen = tab.get("steps.chosen", (n, b), np.int64)
    active = tab.get("steps.active", (n, b), np.bool_)
    finished = tab.get("steps.finished", (n, b), np.bool_)
    total_q = sum(qlen)
    input_ids = tab.get("inputs.input_ids", (b, total_q), np.int64)
    pos_q = sum(q for q, f in zip(qlen, flags["has_position_ids"]) if f)
    position_ids = tab.get("inputs.position_ids", (b, pos_q), np.int64)
    cache_position = tab.get("inputs.cache_position", (total_q,), np.int64)
    top_ids = tab.get("stages.top_ids", (n, n_stages, b, None), np.int64)
    k = top_ids.shape[3]
    top_values = tab.get("stages.top_values", (n, n_stages, b, k), np.float32)
    sarr = {
        name: tab.get(f"stages.{name}", (n, n_stages, b), dtype)
        for name, dtype in (("logsumexp", np.float32), ("n_masked", np.int64), ("chosen_rank", np.int64),
                            ("chosen_logprob", np.float32), ("kl", np.float32))
    }
    entropy = tab.get("stages.entropy", (n, n_stages, b), np.float32) if has_ent is not None else None
    n_rn = sum(flags["has_residual_norms"])
    rnorms = tab.get("residual_norms", (n_rn, len(points), b), np.float32)
    n_lens = sum(flags["has_logit_lens"])
    ll = {name: tab.get(f"logit_lens.{name}", (n_lens, len(lens_layers) if n_lens else None, b), dtype)
          for name, dtype in (("chosen_rank", np.int64), ("chosen_prob", np.float32), ("top_id", np.int64))}
    n_stats = sum(flags["has_attention_stats"])
    shape = (n_stats, len(stats_layers) if n_stats else None, b, None)
    ent = tab.get("attention_stats.entropy", shape, np.float32)
    sa = {"entropy": ent}
    for name, dtype in (("sink", np.float32), ("argmax", np.int64)):
        sa[name] = tab.get(f"attention_stats.{name}", ent.shape, dtype)

    steps: list[StepRecord] = []
    q_off = pos_off = rn_i = ll_i = sa_i = 0
    for i in range(n):
        q = qlen[i]
        pos = None
        if flags["has_position_ids"][i]:
            pos = position_ids[:, pos_off : pos_off + q]
            pos_off += q
        inputs = StepInputs(
            input_ids=input_ids[:, q_off : q_off + q],
            position_ids=pos,
            cache_position=cache_position[q_off : q_off + q],
            attention_mask_shape=None if mask_shapes[i] is None else tuple(mask_shapes[i]),
            cache_len_before=cache_before[i],
        )
        q_off += q
        stages = tuple(
            Stage(
                name=names[i][j],
                params=params[i][j],
                top=TopK(ids=top_ids[i, j], values=top_values[i, j], logsumexp=sarr["logsumexp"][i, j]),
                n_masked=sarr["n_masked"][i, j],
                chosen_rank=sarr["chosen_rank"][i, j],
                chosen_logprob=sarr["chosen_logprob"][i, j],
                kl=sarr["kl"][i, j],
                entropy=entropy[i, j] if entropy is not None and has_ent[i][j] else None,
            )
            for j in range(n_stages)
        )
        rn = lens = stats = None
        if flags["has_residual_norms"][i]:
            rn, rn_i = rnorms[rn_i], rn_i + 1
        if flags["has_logit_lens"][i]:
            lens = LogitLens(lens_layers, ll["chosen_rank"][ll_i], ll["chosen_prob"][ll_i], ll["top_id"][ll_i])
            ll_i += 1
        if flags["has_attention_stats"][i]:
            stats = AttentionStats(stats_layers, sa["entropy"][sa_i], sa["sink"][sa_i], sa["argmax"][sa_i])
            sa_i += 1
        steps.append(
            StepRecord(
                index=index[i],
                inputs=inputs,
                stages=stages,
                chosen=chosen[i],
                sampled=sampled[i],
                active=active[i],
                finished=finished[i],
                stop_reasons=tuple(stop[i]),
                time_s=float(time_s[i]),
                residual_norms=rn,
                logit_lens=lens,
                attention_stats=stats,
            )
        )

    cache = None
    cd = doc.get(m, "cache", dict, "", nullable=True)
    if cd is not None:
        rows = doc.get(cd, "num_rows", int, "cache")
        layer_docs = doc.list_field(cd, "layers", dict, "cache")
        infos = []
        for i, ld in enumerate(layer_docs):
            ctx = f"cache.layers[{i}]"
            infos.append(
                CacheLayerInfo(
                    kind=doc.get(ld, "kind", str, ctx),
                    dtype=doc.get(ld, "dtype", str, ctx),
                    device=doc.get(ld, "device", str, ctx),
                    kv_heads=doc.get(ld, "kv_heads", int, ctx),
                    head_dim=doc.get(ld, "head_dim", int, ctx),
                    max_len=doc.get(ld, "max_len", int, ctx, nullable=True),
                )
            )
        arrs = {name: tab.get(f"cache.{name}", (rows, len(infos)), np.int64)
                for name in ("seq_len", "kept_len", "allocated_len", "nbytes")}
        cache = CacheTimeline(
            cache_class=doc.get(cd, "cache_class", str, "cache"),
            layers=tuple(infos),
            batch_size=doc.get(cd, "batch_size", int, "cache"),
            reused_len=doc.get(cd, "reused_len", int, "cache"),
            **arrs,
        )
    return Trace(
        meta=meta,
        prompts=prompts,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        sequences=sequences,
        steps=steps,
        cache=cache,
        token_text=token_text,
        blobs=blobs,
        residual_points=points,
        attention_layers=att_layers,
        attention_heads=att_heads,
        kv_head_of=kv_head_of,
        output_text=output_text,
    )


def _decode_meta(d: dict[str, Any], doc: _Doc) -> TraceMeta:
    """Known fields only (a newer minor may add fields: they are ignored); missing ones default."""
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(TraceMeta):
        if f.name not in d:
            continue
        v = d[f.name]
        default = TraceMeta().__dict__[f.name]
        if isinstance(default, dict) and not isinstance(v, dict):
            raise doc.fail(f"field 'meta.{f.name}' should be an object")
        if isinstance(default, list) and not isinstance(v, list):
            raise doc.fail(f"field 'meta.{f.name}' should be a list")
        if isinstance(default, str) and f.name != "error" and not isinstance(v, str):
            raise doc.fail(f"field 'meta.{f.name}' should be a string")
        if isinstance(default, int) and not _is(v, int):
            raise doc.fail(f"field 'meta.{f.name}' should be an integer")
        if isinstance(default, float) and not _is(v, float):
            raise doc.fail(f"field 'meta.{f.name}' should be a number")
        kw[f.name] = v
    if "terminators" in kw:
        terms = {}
        for k, v in kw["terminators"].items():
            if not re.fullmatch(r"-?\d{1,19}", k):
                raise doc.fail(f"meta.terminators key {k!r} is not a token id")
            terms[int(k)] = v
        kw["terminators"] = terms
    return TraceMeta(**kw)


# ======================================================================================
# inspect (CLI)
# ======================================================================================


def _plain(s: Any, limit: int = 100) -> str:
    """``s`` for a terminal: control characters escaped, truncated with an ellipsis."""
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(s))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _blob_kinds(blobs: Any) -> dict[str, set[int]]:
    kinds: dict[str, set[int]] = {}
    for key in blobs.keys():
        try:
            kind, step, _ = parse_blob_key(key)
        except TraceFormatError:
            continue
        kinds.setdefault(kind, set()).add(step)
    return kinds


def inspect_trace(path: str | os.PathLike[str]) -> str:
    """A multi-line, terminal-safe summary of the trace folder at ``path`` (``tracer inspect``)."""
    folder = _trace_folder(path)
    trace = load_trace(folder)
    m = trace.meta
    lines = [f"trace: {_plain(folder, 200)}  (schema {SCHEMA_VERSION}, format {FORMAT_NAME})"]
    lines.append(
        f"model: {_plain(m.model_name)}  ({_plain(m.model_class)}, {_plain(m.dtype)} on {_plain(m.device)}, "
        f"attention {_plain(m.attn_implementation)})"
    )
    lines.append(f"status: {_plain(m.status)}" + (f"  error: {_plain(m.error, 200)}" if m.error else ""))
    lines.append(f"batch: {trace.batch_size}, prompt length {trace.prompt_len}")
    for b in range(trace.batch_size):
        prompt = trace.prompts[b] if trace.prompts and b < len(trace.prompts) else trace.text_of(trace.prompt_tokens(b))
        lines.append(f"prompt[{b}]: {_plain(prompt, 80)}")
    n = trace.num_steps
    lines.append(f"steps: {n}" + (f" (prefill + {n - 1} decode)" if n else "") + f", {trace.total_time_s:.3f} s")
    lines.append(f"new tokens: {trace.num_new_tokens}")
    lines.append(f"stop reasons: {[_plain(r, 40) for r in trace.stop_reasons]}")
    for b, text in enumerate(trace.generated_text):
        lines.append(f"generated[{b}]: {_plain(text, 100)}")
    kinds = _blob_kinds(trace.blobs)
    parts = []
    if trace.attention_layers:
        parts.append(f"attention {len(trace.attention_layers)} layers x {len(trace.attention_heads)} heads")
    else:
        parts.append("attention no")
    parts.append(f"full logits {len(kinds['logits'])} steps" if "logits" in kinds else "full logits no")
    parts.append(f"hidden {len(kinds['hidden'])} steps" if "hidden" in kinds else "hidden no")
    if "keys" in kinds:
        parts.append(f"kv snapshots {len(kinds['keys'])} steps")
    n_lens = sum(s.logit_lens is not None for s in trace.steps)
    parts.append(f"logit lens {n_lens} steps" if n_lens else "logit lens no")
    n_rn = sum(s.residual_norms is not None for s in trace.steps)
    parts.append(f"residual norms {n_rn} steps" if n_rn else "residual norms no")
    lines.append("recorded: " + ", ".join(parts))
    if trace.cache is not None:
        try:
            cs = trace.cache.summary(m.num_heads or None)
            lines.append(
                f"cache: {_plain(cs['cache_class'])}, {cs['layers']} layers, final length {cs['final_seq_len']}, "
                f"{_size(cs['measured_bytes'])} measured"
            )
        except (TypeError, ValueError, OverflowError) as exc:  # e.g. a dtype numpy cannot name
            lines.append(f"cache: {_plain(trace.cache.cache_class)} (no summary: {_plain(exc)})")
    sizes = [f"{name} {_size((folder / name).stat().st_size)}" for name in (MANIFEST, TABLES, BLOBS)
             if (folder / name).is_file()]
    lines.append("files: " + ", ".join(sizes))
    if isinstance(trace.blobs, SafetensorsStore):
        trace.blobs.close()
    return "\n".join(lines)


# ======================================================================================
# HTML
# ======================================================================================


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em;color:#222;max-width:1200px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}h3{font-size:1em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 6px;vertical-align:top;text-align:left}
th{background:#f4f4f4}.num{text-align:right;font-variant-numeric:tabular-nums}
.tok{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;border-radius:2px;padding:0 1px}
.prompt .tok{background:#eee;color:#555}.text{line-height:1.9}.note{color:#666;font-size:.9em}
.maps{display:flex;flex-wrap:wrap;gap:14px}.maps figure{margin:0}
.maps img{width:220px;height:220px;image-rendering:pixelated;border:1px solid #ccc}
"""


def _prob_color(p: float) -> str:
    p = 0.0 if not math.isfinite(p) else min(max(p, 0.0), 1.0)
    return f"hsl({120 * p:.0f},70%,84%)"


def _tok(trace: Trace, tid: int) -> str:
    return trace.token_text.get(int(tid), f"<{int(tid)}>")


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _png(rgb: np.ndarray) -> bytes:
    """A minimal RGB PNG (stdlib zlib), so the report needs no plotting library."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def _heat_png(a: np.ndarray, max_side: int = 512) -> str:
    """Base64 PNG of a non-negative map; colour = sqrt(weight), white (0) to dark blue (1)."""
    a = np.nan_to_num(np.asarray(a, dtype=np.float32), nan=0.0)
    f = max(1, math.ceil(max(a.shape) / max_side))
    if f > 1:  # block-average down to at most max_side per side
        h, w = (math.ceil(d / f) * f for d in a.shape)
        pad = np.zeros((h, w), np.float32)
        pad[: a.shape[0], : a.shape[1]] = a
        a = pad.reshape(h // f, f, w // f, f).mean(axis=(1, 3))
    v = np.sqrt(np.clip(a, 0.0, 1.0))
    rgb = np.stack([255 - 230 * v, 255 - 170 * v, 255 - 60 * v], axis=-1).astype(np.uint8)
    return base64.b64encode(_png(np.ascontiguousarray(rgb))).decode("ascii")


def _mean_head_map(trace: Trace, layer: int, seq: int, last_step: int) -> np.ndarray | None:
    """`(T, T)` like ``Trace.head_map`` but averaged over the recorded heads (one read per step)."""
    rows = []
    for s in range(last_step + 1):
        key = blob_key("attention", s, layer)
        if key not in trace.blobs:
            break
        rows.append(np.asarray(trace.blobs.get(key))[seq].astype(np.float32).mean(axis=0))
    if not rows:
        return None
    size = max(r.shape[-1] for r in rows)
    out = np.zeros((sum(r.shape[0] for r in rows), size), dtype=np.float32)
    i = 0
    for r in rows:
        out[i : i + r.shape[0], : r.shape[1]] = r
        i += r.shape[0]
    return out


def _meta_rows(trace: Trace) -> list[tuple[str, str]]:
    m = trace.meta
    rows = [
        ("model", f"{m.model_name} ({m.model_class})"),
        ("shape", f"{m.num_layers} layers, {m.num_heads} heads ({m.num_kv_heads} KV), head dim {m.head_dim}, "
                  f"hidden {m.hidden_size}, vocab {m.vocab_size}"),
        ("dtype / device", f"{m.dtype} on {m.device}, attention {m.attn_implementation}"),
        ("status", m.status + (f" — {m.error}" if m.error else "")),
        ("generation config", json.dumps(_jsonable(m.generation_config), sort_keys=True)),
        ("terminators", ", ".join(f"{k}: {v}" for k, v in m.terminators.items())),
        ("created", m.created),
        ("versions", ", ".join(f"{k} {v}" for k, v in m.versions.items())),
        ("batch / prompt / steps", f"{trace.batch_size} / {trace.prompt_len} / {trace.num_steps}, "
                                   f"{trace.total_time_s:.3f} s"),
    ]
    return [(k, v) for k, v in rows if v]


def _kv_table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"


def _sequence_html(trace: Trace, b: int) -> str:
    out = [f"<h3>sequence {b} — stop: {_e(trace.stop_reasons[b])}</h3>"]
    if trace.prompts and b < len(trace.prompts):
        out.append(f"<p class='note'>prompt text: {_e(_short(trace.prompts[b], 400))}</p>")
    spans = [f"<span class='tok' title='{_e(f'id {int(t)}')}'>{_e(_tok(trace, t))}</span>"
             for t in trace.prompt_tokens(b)]
    out.append("<div class='text prompt'>" + "".join(spans) + "</div><div class='text'>")
    for step in trace.steps:
        if not step.active[b]:
            break
        tid = int(step.chosen[b])
        p = float(step.chosen_prob[b])
        title = f"step {step.index} · id {tid} · p={p:.3f} · raw rank {int(step.stages[0].chosen_rank[b])}"
        out.append(f"<span class='tok' style='background:{_prob_color(p)}' title='{_e(title)}'>"
                   f"{_e(_tok(trace, tid))}</span>")
    out.append("</div>")
    return "".join(out)


def _steps_table(trace: Trace, b: int, max_steps: int) -> str:
    head = ("<tr><th>step</th><th>input tokens</th><th>chosen</th><th>prob</th><th>rank raw→final</th>"
            "<th>top-5 final</th><th>processors: newly masked, KL, chosen rank before→after</th><th>stop</th></tr>")
    rows = []
    shown = 0
    for step in trace.steps:
        if not step.active[b]:
            continue
        if shown >= max_steps:
            rows.append(f"<tr><td colspan='8' class='note'>… {trace.num_steps - shown} more steps not shown</td></tr>")
            break
        shown += 1
        tid = int(step.chosen[b])
        inputs = _short(trace.text_of(step.inputs.input_ids[b]), 60)
        fin = step.final
        top = ", ".join(f"{_e(_tok(trace, i))} {p:.2f}" for i, p in zip(fin.ids[b, :5], fin.probs[b, :5]))
        procs = "<br>".join(
            f"{_e(e.name)}: +{int(e.newly_masked[b])}, KL {float(e.kl[b]):.3g}, "
            f"{int(e.chosen_rank_before[b])}→{int(e.chosen_rank_after[b])}"
            for e in step.processors
        )
        reason = step.stop_reasons[b] if b < len(step.stop_reasons) else None
        rows.append(
            f"<tr><td class='num'>{step.index}</td><td><span class='tok'>{_e(inputs)}</span></td>"
            f"<td><span class='tok'>{_e(_tok(trace, tid))}</span></td>"
            f"<td class='num'>{float(step.chosen_prob[b]):.3f}</td>"
            f"<td class='num'>{int(step.stages[0].chosen_rank[b])}→{int(step.stages[-1].chosen_rank[b])}</td>"
            f"<td>{top}</td><td>{procs}</td><td>{_e(reason or '')}</td></tr>"
        )
    return "<table>" + head + "".join(rows) + "</table>"


def _maps_html(trace: Trace, max_maps: int, max_steps: int) -> str:
    layers = [l for l in trace.attention_layers if blob_key("attention", 0, l) in trace.blobs]
    if not layers or trace.num_steps == 0:
        return "<p class='note'>no attention maps recorded.</p>"
    if len(layers) > max_maps:
        pick = np.linspace(0, len(layers) - 1, max_maps).round().astype(int)
        layers = [layers[i] for i in sorted(set(pick.tolist()))]
    figs = []
    for layer in layers:
        a = _mean_head_map(trace, layer, 0, min(trace.num_steps, max_steps) - 1)
        if a is None or a.size == 0:
            continue
        figs.append(f"<figure><img alt='{_e(f'layer {layer}')}' src='data:image/png;base64,{_heat_png(a)}'>"
                    f"<figcaption>layer {int(layer)} ({a.shape[0]}×{a.shape[1]})</figcaption></figure>")
    heads = ", ".join(str(h) for h in trace.attention_heads)
    note = (f"Sequence 0, mean over the recorded heads ({_e(heads)}) of each layer's whole map "
            f"(rows: query positions, prompt then generated; columns: key positions). "
            f"Colour is √weight, white 0 to dark blue 1; at most {max_maps} layers, evenly sampled.")
    return f"<p class='note'>{note}</p><div class='maps'>" + "".join(figs) + "</div>"


def trace_to_html(
    trace: Trace, path: str | os.PathLike[str] | None = None, *, max_steps: int = 256, max_maps: int = 12,
    max_seqs: int = 4,
) -> str:
    """A self-contained HTML report (inline CSS, maps as inline PNG; no scripts, no network).

    Every text taken from the trace is HTML-escaped.  If ``path`` is given the report is also
    written there (UTF-8)."""
    model = trace.meta.model_name or "trace"
    out = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>tracer: {_e(model)}</title><style>{_CSS}</style></head><body>",
        f"<h1>tracer report: {_e(model)}</h1>",
        _kv_table(_meta_rows(trace)),
        "<h2>Stop reasons</h2><ul>",
        "".join(f"<li>sequence {b}: {_e(r)} ({n} new tokens)</li>"
                for b, (r, n) in enumerate(zip(trace.stop_reasons, trace.num_new_tokens))),
        "</ul><h2>Text</h2><p class='note'>Generated tokens are coloured by the probability of the chosen "
        "token under the final distribution (red 0 → green 1); hover for details.</p>",
    ]
    seqs = range(min(trace.batch_size, max_seqs))
    out += [_sequence_html(trace, b) for b in seqs]
    if trace.batch_size > max_seqs:
        out.append(f"<p class='note'>{trace.batch_size - max_seqs} more sequences not shown.</p>")
    out.append("<h2>Steps</h2>")
    for b in seqs:
        out.append(f"<h3>sequence {b}</h3>" + _steps_table(trace, b, max_steps))
    out.append("<h2>Attention</h2>" + _maps_html(trace, max_maps, max_steps))
    if trace.meta.notes:
        out.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in trace.meta.notes) + "</ul>")
    out.append("</body></html>")
    text = "\n".join(out)
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


def trace_summary_html(trace: Trace) -> str:
    """A small HTML table of ``trace.summary()`` (used by ``Trace._repr_html_``)."""
    try:
        s = trace.summary()
    except (TypeError, ValueError, OverflowError):  # a cache dtype numpy cannot name: drop the cache row
        s = {**dataclasses.replace(trace, cache=None).summary(), "cache": None}
    rows = [
        ("model", s["model"]), ("status", s["status"]), ("batch", s["batch_size"]), ("prompt length", s["prompt_len"]),
        ("steps", s["steps"]), ("new tokens", s["new_tokens"]), ("stop reasons", ", ".join(s["stop_reasons"])),
        ("time", f"{s['time_s']} s"), ("attention layers", s["attention_layers"]),
    ]
    rows += [(f"generated[{b}]", _short(t, 200)) for b, t in enumerate(s["generated_text"][:4])]
    if s["cache"]:
        c = s["cache"]
        rows.append(("cache", f"{c['cache_class']}, {c['layers']} layers, final length {c['final_seq_len']}, "
                              f"{_size(c['measured_bytes'])}"))
    return "<table class='tracer-summary'>" + "".join(
        f"<tr><th style='text-align:left'>{_e(k)}</th><td style='text-align:left'>{_e(v)}</td></tr>" for k, v in rows
    ) + "</table>"


# ======================================================================================
# Perfetto / Chrome trace events
# ======================================================================================


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def trace_to_perfetto(trace: Trace, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Chrome trace-event JSON (open in ui.perfetto.dev or chrome://tracing): one complete
    event per step laid back to back from the recorded ``time_s`` (microseconds), instant events
    where sequences stop, and a KV-cache bytes counter.  Written to ``path`` if given."""
    pid, tid = 1, 1
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": pid, "tid": tid,
         "args": {"name": f"tracer: {trace.meta.model_name or 'trace'}"}},
        {"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": "generate"}},
    ]
    ts = 0.0
    for i, step in enumerate(trace.steps):
        dur = step.time_s * 1e6 if math.isfinite(step.time_s) and step.time_s > 0 else 0.0
        chosen = [int(c) for c in step.chosen]
        args: dict[str, Any] = {
            "step": int(step.index),
            "query_tokens": int(np.shape(step.inputs.input_ids)[1]),
            "cache_len_before": int(step.inputs.cache_len_before),
            "chosen_ids": chosen,
            "chosen_tokens": [_tok(trace, c) for c in chosen],
            "chosen_prob": [_finite(float(p)) for p in step.chosen_prob],
            "active": [bool(a) for a in step.active],
        }
        reasons = {str(b): r for b, r in enumerate(step.stop_reasons) if r is not None}
        if reasons:
            args["stop_reasons"] = reasons
        events.append({
            "name": "prefill" if step.index == 0 else f"decode step {step.index}",
            "cat": step.kind, "ph": "X", "ts": ts, "dur": dur, "pid": pid, "tid": tid, "args": args,
        })
        for b, r in reasons.items():
            events.append({"name": f"stop seq {b}: {r}", "cat": "stop", "ph": "i", "s": "t",
                           "ts": ts + dur, "pid": pid, "tid": tid})
        if trace.cache is not None and i < trace.cache.nbytes.shape[0]:
            events.append({"name": "kv cache bytes", "ph": "C", "ts": ts + dur, "pid": pid,
                           "args": {"bytes": int(trace.cache.nbytes[i].sum())}})
        ts += dur
    doc = {"traceEvents": events, "displayTimeUnit": "ms",
           "otherData": {"model": trace.meta.model_name, "status": trace.meta.status}}
    if path is not None:
        Path(path).write_text(json.dumps(doc, allow_nan=False), encoding="utf-8")
    return doc
