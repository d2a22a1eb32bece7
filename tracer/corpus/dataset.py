"""The corpus dataset on disk, and reading it back.

Layout of ``DIR``::

    corpus.json                 run metadata (format, model, dtype, engine, versions, settings)
    sequences/part-*.parquet    one row per prompt (answer, stop reason, timings)
    steps/part-*.parquet        one row per generated token (log-prob, rank, entropy, top-k, ...)
    traces/                     optional full trace files (``--trace-dir`` inside or elsewhere)

Each finished batch becomes one ``steps`` part and one ``sequences`` part with the same name,
each written to a temporary name and moved into place with ``os.replace`` (steps first): a
killed run leaves only whole files, and a part counts once its ``sequences`` file exists (a
``steps`` file without one is left over from a kill and is ignored, then removed on resume)."""

from __future__ import annotations

import errno
import json
import os
import tempfile
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..jsonio import write_json_atomic
from .data import CorpusError

__all__ = ["FORMAT", "CorpusWriter", "CorpusDataset", "open_dataset", "is_dataset", "lock_dataset", "unlock_dataset",
           "pending"]

FORMAT = "tracer-corpus"
FORMAT_VERSION = 1
META_FILE = "corpus.json"
#: Metadata keys that must agree when a run appends to an existing dataset.
IDENTITY_KEYS = ("engine", "model", "dtype", "settings", "chat", "system", "schema")


def is_dataset(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorpusError(f"{path} is not a readable corpus dataset ({META_FILE}: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorpusError(f"{path} holds a {META_FILE} that is not a tracer corpus")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CorpusError(f"{path} holds a {META_FILE} whose format_version is not a number ({_short(version)})")
    if version > FORMAT_VERSION:
        raise CorpusError(f"{path} was written by a newer tracer (corpus format {version})")
    return meta


#: Dataset folders this process holds (resolved path -> [open folder descriptor, holders]).
_LOCKS: dict[str, list[int]] = {}


def lock_dataset(path: str | Path) -> None:
    """Hold the dataset folder ``path`` for this process, making it (and its parents) if absent:
    a second run writing into the same folder at the same time is refused (two writers would
    each add every prompt).  Held again by the same process, it counts; :func:`unlock_dataset`
    releases.  Also proves the folder can be written (before the model loads)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise CorpusError(f"dataset folder {path} cannot be made or written: "
                          f"{type(exc).__name__}: {exc.strerror or exc}") from None
    key = os.path.realpath(path)
    held = _LOCKS.get(key)
    if held is not None:
        held[1] += 1
        return
    try:
        import fcntl
    except ImportError:  # (no fcntl: Windows) not held
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise CorpusError(f"dataset {path} is being written by another run right now: wait for it to end, "
                              "or use another folder") from None
        return  # a file system without flock (some NFS, Lustre, FUSE): not held, as without fcntl
    _LOCKS[key] = [fd, 1]


def _forget_locks_in_child() -> None:
    """A forked process (vLLM's engine, say) does not hold the folders its parent holds: a lock
    would otherwise last as long as any such process, the parent's end not releasing it."""
    for fd, _ in _LOCKS.values():
        try:
            os.close(fd)  # (the parent's descriptor, and its lock, stay)
        except OSError:
            pass
    _LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def unlock_dataset(path: str | Path) -> None:
    held = _LOCKS.get(os.path.realpath(path))
    if held is None:
        return
    held[1] -= 1
    if held[1] <= 0:
        del _LOCKS[os.path.realpath(path)]
        os.close(held[0])  # (closing the descriptor releases the lock)


def check_dataset_folder(path: str | Path, meta: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Before the model loads: ``path`` is absent, empty, or a corpus dataset whose identity
    agrees with ``meta`` (when given).  Returns the existing metadata (None: a new dataset)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CorpusError(f"dataset {path} is a file, not a folder")
    if not path.exists() or not any(path.iterdir()):
        parent = path.parent if not path.exists() else path
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK):
            raise CorpusError(f"dataset folder {path} cannot be written (no permission in {parent})")
        return None
    if not is_dataset(path):
        shown = sorted(p.name for p in path.iterdir())[:3]
        raise CorpusError(f"dataset folder {path} holds something else ({', '.join(shown)}, ...): "
                          "give an empty or new folder, or an existing tracer corpus to resume")
    old = _read_meta(path)
    if meta is not None:
        for key in IDENTITY_KEYS:
            if old.get(key) != meta.get(key):
                _refuse_resume(path, key, old.get(key), meta.get(key))
    return old


def check_known_identity(path: str | Path, old: dict[str, Any], known: dict[str, Any],
                         settings: dict[str, Any]) -> None:
    """Before the model loads: refuse to resume the dataset at ``path`` (metadata ``old``) when
    a part of its identity that is known without the model differs.  ``known``: identity keys
    (of :data:`IDENTITY_KEYS`) and their values for the new run; ``settings``: the generation
    settings the new run will record, compared one by one (an absent setting is ``None``), only
    for the names given.  What is left out here is compared by :class:`CorpusWriter` once the
    model is loaded; this check refuses nothing that one would accept."""
    for key, value in known.items():
        if old.get(key) != value:
            _refuse_resume(path, key, old.get(key), value)
    old_settings = old.get("settings") if isinstance(old.get("settings"), dict) else {}
    differ = [name for name in settings if old_settings.get(name) != settings[name]]
    if differ:
        _refuse_resume(path, "settings", {n: old_settings.get(n) for n in differ}, {n: settings[n] for n in differ})


def _refuse_resume(path: Path | str, key: str, old: Any, new: Any) -> None:
    raise CorpusError(f"dataset {path} was written with a different {key} ({_short(old)} vs {_short(new)} now): "
                      "resume only with the same settings, or use another folder")


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _atomic_write_table(table: Any, dest: Path) -> None:
    import pyarrow.parquet as pq

    # hidden, and not named *.parquet: a glob over the folder (read_parquet('steps/*.parquet'))
    # never counts a part a kill left half-moved
    tmp = dest.with_name(f".tmp-{uuid.uuid4().hex}-{dest.stem}.partial")
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def _parts(path: Path) -> list[str]:
    """Names of the complete parts (a ``sequences`` file exists), sorted."""
    folder = path / "sequences"
    return sorted(p.name for p in folder.glob("part-*.parquet")) if folder.is_dir() else []


def existing_ids(path: str | Path) -> set[str]:
    """Prompt ids already in the dataset at ``path`` (empty when there is none yet)."""
    return set(existing_prompts(path))


def existing_prompts(path: str | Path) -> dict[str, str]:
    """Prompt id -> prompt (as the ``sequences`` table holds it) of the dataset at ``path``."""
    import pyarrow.parquet as pq

    path = Path(path)
    prompts: dict[str, str] = {}
    for name in _parts(path):
        table = pq.read_table(path / "sequences" / name, columns=["prompt_id", "prompt"])
        prompts.update(zip(table["prompt_id"].to_pylist(), table["prompt"].to_pylist()))
    return prompts


def pending(path: str | Path, items: Iterable[Any]) -> list[Any]:
    """The prompt items not yet in the dataset at ``path`` (a resume skips the ids there).  An id
    already there under another prompt is refused: it would be skipped, its prompt never run
    (plain-text data files number their prompts by line: a line added above shifts every id)."""
    done = existing_prompts(path) if is_dataset(path) else {}
    for it in items:
        old = done.get(it.id)
        if old is not None and old != it.text:
            line = f" (line {it.line})" if it.line else ""
            raise CorpusError(f"prompt id {_short(it.id, 40)}{line} is already in dataset {path} with another prompt "
                              f"({_short(old, 60)} there, {_short(it.text, 60)} now): a resume skips the ids "
                              "already there. Give each prompt its own id (JSONL 'id'), or use another folder")
    return [it for it in items if it.id not in done]


class CorpusWriter:
    """Appends batches to a dataset folder (created or resumed)."""

    def __init__(self, path: str | Path, meta: dict[str, Any]):
        self.path = Path(path)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
        old = check_dataset_folder(self.path, meta)
        lock_dataset(self.path)  # released by close(), or when the writer is collected
        self._release = weakref.finalize(self, unlock_dataset, str(self.path))
        (self.path / "sequences").mkdir(parents=True, exist_ok=True)
        (self.path / "steps").mkdir(parents=True, exist_ok=True)
        complete = set(_parts(self.path))
        for leftover in (self.path / "steps").glob("part-*.parquet"):  # a kill between the two renames
            if leftover.name not in complete:
                leftover.unlink()
        for tmp in list((self.path / "steps").glob(".tmp-*")) + list((self.path / "sequences").glob(".tmp-*")):
            tmp.unlink()
        if old is None:
            meta["runs"] = [meta.pop("run", {})]
        else:
            meta = {**old, "runs": [*old.get("runs", []), meta.get("run", {})]}
        self.meta = meta
        write_json_atomic(self.path / META_FILE, meta, sort_keys=True, default=str)
        self.run_id = uuid.uuid4().hex[:8]
        self.count = 0
        self.rows_written = 0

    def done_ids(self) -> set[str]:
        """Prompt ids already in the dataset."""
        return existing_ids(self.path)

    def pending(self, items: Iterable[Any]) -> list[Any]:
        """:func:`pending` for this dataset."""
        return pending(self.path, items)

    def close(self) -> None:
        """Release the folder (:func:`lock_dataset`); the parts written stay."""
        self._release()

    def write(self, seq_rows: list[dict[str, Any]], step_rows: list[dict[str, Any]]) -> str:
        """One finished batch: the steps part, then the sequences part (which makes it count)."""
        from .rows import sequences_table, steps_table

        if not seq_rows:
            return ""
        return self.write_tables(sequences_table(seq_rows), steps_table(step_rows))

    def write_tables(self, sequences: Any, steps: Any) -> str:
        """:meth:`write` for Arrow tables already built (the Ray engine's results)."""
        name = f"part-{self.run_id}-{self.count:05d}.parquet"
        _atomic_write_table(steps, self.path / "steps" / name)
        _atomic_write_table(sequences, self.path / "sequences" / name)
        self.count += 1
        self.rows_written += sequences.num_rows
        return name


@dataclass
class CorpusDataset:
    """A corpus dataset opened for reading (:func:`open_dataset`)."""

    path: Path
    meta: dict[str, Any]
    parts: list[str] = field(default_factory=list)

    def files(self, table: str) -> list[str]:
        if table not in ("sequences", "steps"):
            raise ValueError("table is 'sequences' or 'steps'")
        return [str(self.path / table / n) for n in self.parts if (self.path / table / n).exists()]

    def arrow(self, table: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        from .rows import table_schemas

        files = self.files(table)
        schema = table_schemas()[0 if table == "steps" else 1]
        if not files:
            return schema.empty_table()
        return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")

    @property
    def sequences(self):
        """pandas DataFrame, one row per prompt, in prompt-id order of writing."""
        return self.arrow("sequences").to_pandas()

    @property
    def steps(self):
        """pandas DataFrame, one row per generated token."""
        return self.arrow("steps").to_pandas()

    def polars(self, table: str):
        import polars as pl

        files = self.files(table)
        return pl.read_parquet(files) if files else pl.from_arrow(self.arrow(table))

    def duckdb(self, connection: Any = None):
        """A DuckDB connection with views ``sequences`` and ``steps`` over the part files."""
        import duckdb

        con = connection or duckdb.connect()
        for table in ("sequences", "steps"):
            files = self.files(table)
            if files:
                listing = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
                con.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM read_parquet([{listing}])")
            else:
                con.register(f"_{table}_empty", self.arrow(table))
                con.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM _{table}_empty")
        return con

    @property
    def prompt_ids(self) -> list[str]:
        return self.arrow("sequences")["prompt_id"].to_pylist()

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def __repr__(self) -> str:
        return (f"CorpusDataset({str(self.path)!r}, engine={self.meta.get('engine')!r}, "
                f"model={self.meta.get('model')!r}, parts={len(self.parts)})")


def open_dataset(path: str | Path) -> CorpusDataset:
    """Open a corpus dataset folder written by :func:`tracer.trace_corpus` / ``tracer run --dataset``."""
    path = Path(path)
    if not path.is_dir():
        raise CorpusError(f"no corpus dataset at {path} (not a folder)")
    if not is_dataset(path):
        raise CorpusError(f"{path} is not a tracer corpus dataset (no {META_FILE})")
    return CorpusDataset(path, _read_meta(path), _parts(path))

