"""The atomic JSON writer of predictions, ``generation_config.json``, corpus metadata and beam /
assisted-decoding traces, and the ``save``/``load`` pair of records kept as one JSON file.
(The Perfetto export and the converted model's source note still write plainly.)  Imports
neither torch nor any other tracer module, so every layer may use it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["JsonFile", "current_umask", "write_json_atomic"]


def write_json_atomic(path: str | os.PathLike[str], data: Any, *, indent: int | None = 2,
                      sort_keys: bool = False, default: Callable[[Any], Any] | None = None) -> Path:
    """Write ``data`` as UTF-8 JSON (non-ASCII kept) to a temporary file in the same folder,
    then ``os.replace`` it over ``path``: readers see the old file or the new one, never a
    half-written one.  Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, ensure_ascii=False, indent=indent, sort_keys=sort_keys, default=default) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # what open() would have given: mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def current_umask() -> int:
    """The process's umask (reading it means setting it: it is put back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


class JsonFile:
    """``save(path)`` / ``cls.load(path)`` for a record class with ``to_dict`` / ``from_dict``:
    one JSON file, written atomically (no pickle)."""

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - each record class defines it
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:  # pragma: no cover
        raise NotImplementedError

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as JSON (atomic); load with :meth:`load`."""
        return write_json_atomic(path, self.to_dict(), indent=None)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Any:
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))
