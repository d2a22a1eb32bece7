"""Trace files: save and load (lazily).  Inspect / HTML / Perfetto live in ``tracer.export``.

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

import dataclasses
import hashlib
import json
import os
import re
import shutil
import stat
import uuid
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
        mode = 0o666 & ~_umask()  # safetensors writes 0600; give all three files the usual mode
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


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
        _plain_file(p)
        return p.parent
    if not p.exists():
        raise TraceFormatError(f"{p}: no such trace (expected a folder holding {MANIFEST})")
    if not p.is_dir():
        raise TraceFormatError(f"{p}: not a trace folder (a trace is a folder holding {MANIFEST})")
    if not (p / MANIFEST).is_file():
        raise TraceFormatError(f"{p}: not a trace folder: {MANIFEST} is missing")
    _plain_file(p / MANIFEST)
    return p


def _plain_file(file: Path) -> None:
    """A trace's files must be regular files inside its folder: no links to elsewhere."""
    if file.is_symlink() or not stat.S_ISREG(file.lstat().st_mode):
        raise TraceFormatError(f"{file}: not a regular file inside the trace (links are refused)")


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
        _plain_file(file)
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

