"""Large arrays of a trace (attention maps, full logits, hidden vectors, key/value snapshots):
the store protocol, the in-memory store, and the one spelling of blob keys."""

from __future__ import annotations

from typing import Iterator, Protocol

import numpy as np

from .errors import TraceFormatError

__all__ = ["BlobStore", "MemoryStore", "blob_key", "parse_blob_key", "stack_rows"]

# --------------------------------------------------------------------------------------
# Large arrays: attention maps, full logits, hidden vectors, key/value snapshots
# --------------------------------------------------------------------------------------


class BlobStore(Protocol):
    """Keyed large arrays; in memory while recording, memory-mapped when loaded from a file."""

    def get(self, key: str) -> np.ndarray: ...

    def keys(self) -> Iterator[str]: ...

    def __contains__(self, key: object) -> bool: ...


def blob_key(kind: str, step: int, layer: int | None = None) -> str:
    """The one place blob keys are spelled: ``kind/step`` or ``kind/step/layer``.

    Kinds: ``attention`` `(B, H_rec, Q, T)`, ``logits`` `(B, V)` raw full logits,
    ``hidden`` `(B, D)` last-position residual after a decoder layer, ``keys`` / ``values``
    `(B, kv_heads, T, head_dim)` cache snapshots."""
    return f"{kind}/{step}" if layer is None else f"{kind}/{step}/{layer}"


def parse_blob_key(key: str) -> tuple[str, int, int | None]:
    parts = key.split("/")
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[1:]):
        raise TraceFormatError(f"malformed blob key {key!r}")
    return parts[0], int(parts[1]), (int(parts[2]) if len(parts) == 3 else None)


class MemoryStore:
    """A dict-backed :class:`BlobStore`."""

    def __init__(self, data: dict[str, np.ndarray] | None = None):
        self._data: dict[str, np.ndarray] = dict(data or {})

    def get(self, key: str) -> np.ndarray:
        try:
            return self._data[key]
        except KeyError:
            raise KeyError(f"nothing recorded under {key!r}") from None

    def put(self, key: str, value: np.ndarray) -> None:
        self._data[key] = value

    def keys(self) -> Iterator[str]:
        return iter(list(self._data))

    def __contains__(self, key: object) -> bool:
        return key in self._data

    @property
    def nbytes(self) -> int:
        return sum(int(v.nbytes) for v in self._data.values())


def stack_rows(rows: list[np.ndarray]) -> np.ndarray:
    """`(ΣQ, T_max)`: attention row blocks of growing key length, stacked and zero-padded on
    the right — the lower-triangular map of a whole generation."""
    size = max(r.shape[-1] for r in rows)
    out = np.zeros((sum(r.shape[0] for r in rows), size), dtype=np.float32)
    i = 0
    for r in rows:
        out[i : i + r.shape[0], : r.shape[1]] = r
        i += r.shape[0]
    return out
