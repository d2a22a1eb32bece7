"""Read a transformers ``Cache`` after each forward: per-layer lengths, bytes, kinds.

Lengths come from the cache's own API (``layer.get_seq_length()``, ``max_cache_len``,
``sliding_window``), never from guessing with ``keys.shape``: a static layer is preallocated and
a sliding-window layer keeps fewer positions than it has seen.  Reading is cheap (shapes and
Python ints); the only device value, a static layer's length counter, is kept as a tensor and
converted once when the trace is built, so recording never forces a device sync per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .records import CacheLayerInfo, CacheTimeline


@dataclass
class LayerReading:
    """One layer of the cache after one step (``seen`` may be a 0-d tensor until finalized)."""

    seen: Any
    kept: int
    allocated: int
    nbytes: int


def cache_layers(cache: Any) -> list[Any] | None:
    """The per-layer objects of a cache, or None for a cache class without ``layers``."""
    if cache is None:
        return None
    inner = getattr(cache, "self_attention_cache", None)  # EncoderDecoderCache
    layers = getattr(inner if inner is not None else cache, "layers", None)
    return list(layers) if layers is not None else None


def _tensor_bytes(layer: Any) -> int:
    total = 0
    for name, value in vars(layer).items():
        if ("key" in name or "value" in name) and hasattr(value, "element_size") and hasattr(value, "numel"):
            total += value.numel() * value.element_size()
    return total


def _max_len(layer: Any) -> int | None:
    for attr in ("max_cache_len", "sliding_window"):
        value = getattr(layer, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def read_layer(layer: Any) -> LayerReading:
    keys = getattr(layer, "keys", None)
    if not getattr(layer, "is_initialized", keys is not None) or keys is None or keys.dim() < 3:
        return LayerReading(seen=0, kept=0, allocated=0, nbytes=0)
    seen = layer.get_seq_length()
    if hasattr(seen, "clone"):
        seen = seen.clone()  # static layers count in a tensor updated in place
    allocated = int(keys.shape[-2])
    window = getattr(layer, "sliding_window", None)
    if getattr(layer, "max_cache_len", None) is not None and not getattr(layer, "is_sliding", False):
        kept = seen  # static: the used part of the preallocated tensor
    elif isinstance(window, int) or getattr(layer, "is_sliding", False):
        kept = min(int(seen), allocated) if not hasattr(seen, "item") else allocated
    else:
        kept = allocated
    return LayerReading(seen=seen, kept=kept, allocated=allocated, nbytes=_tensor_bytes(layer))


def read_cache(cache: Any) -> list[LayerReading] | None:
    layers = cache_layers(cache)
    if layers is None:
        return None
    return [read_layer(layer) for layer in layers]


@dataclass(frozen=True)
class SharedReadings:
    """One step's reading kept per group of alike layers: layer ``i`` reads ``reps[group_of[i]]``."""

    reps: list[LayerReading]
    group_of: tuple[int, ...]


def expand(row: "list[LayerReading] | SharedReadings") -> list[LayerReading]:
    """Per-layer readings of one step."""
    return [row.reps[g] for g in row.group_of] if isinstance(row, SharedReadings) else row


class CacheReader:
    """Reads one generation's cache after every step without Python work per layer.

    The first reading reads every layer.  Layers alike then (same class, settings, dtype,
    device, shapes but the sequence axis, same reading) receive the same updates every step
    (each layer stores the step's tokens), so from then on one representative of each group is
    read and its reading stands for the group; a new cache object, a changed layer count or an
    uninitialised layer (a lazily filled cache) means every layer is read again.
    :meth:`check` compares a full reading of the final cache with the derived one.
    """

    def __init__(self) -> None:
        self._cache: Any = None
        self._n = -1
        self._reps: tuple[int, ...] = ()  # one layer index per group
        self._group_of: tuple[int, ...] = ()  # per layer: its group's position in _reps

    def read(self, cache: Any) -> "list[LayerReading] | SharedReadings | None":
        layers = _layers(cache)
        if layers is None:
            return None
        if cache is self._cache and len(layers) == self._n:
            return SharedReadings([read_layer(layers[i]) for i in self._reps], self._group_of)
        readings = [read_layer(layer) for layer in layers]
        keys = [_alike_key(layer, r) for layer, r in zip(layers, readings)]
        if all(k is not None for k in keys):
            firsts: dict[tuple, int] = {}
            group_of = tuple(firsts.setdefault(k, len(firsts)) for k in keys)
            reps = {g: i for i, g in reversed(list(enumerate(group_of)))}
            self._cache, self._n = cache, len(layers)
            self._reps, self._group_of = tuple(reps[g] for g in range(len(firsts))), group_of
        else:
            self._cache, self._n = None, -1
        return readings

    def check(self, cache: Any, last: "list[LayerReading] | SharedReadings | None") -> str | None:
        """None when a full reading of ``cache`` equals ``last`` (the derived reading of the
        final step), else why not (the trace notes it)."""
        full = read_cache(cache)
        if full is None or last is None:
            return None
        last = expand(last)
        for i, (a, b) in enumerate(zip(full, last)):
            if (_as_int(a.seen), _as_int(a.kept), a.allocated, a.nbytes) != (_as_int(b.seen), _as_int(b.kept),
                                                                                b.allocated, b.nbytes):
                return (f"cache layer {i}: the per-step reading taken from an alike layer ({b}) differs from its "
                        f"own ({a}) at the last step; the cache timeline may be wrong for that layer")
        return None if len(full) == len(last) else "cache layer count changed during generation"


def _layers(cache: Any) -> Sequence[Any] | None:
    if cache is None:
        return None
    inner = getattr(cache, "self_attention_cache", None)  # EncoderDecoderCache
    return getattr(inner if inner is not None else cache, "layers", None)


def _alike_key(layer: Any, reading: LayerReading) -> tuple | None:
    """What makes two layers' readings equal at every later step; None: not initialised."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if not reading.allocated or keys is None or values is None or not hasattr(values, "shape"):
        return None
    settings = tuple(getattr(layer, a, None) for a in ("max_cache_len", "sliding_window", "is_sliding"))
    seen = None if hasattr(reading.seen, "item") else reading.seen
    kept = None if hasattr(reading.kept, "item") else reading.kept
    return (type(layer), settings, keys.dtype, keys.device, tuple(keys.shape[:-2]), keys.shape[-1],
            values.dtype, tuple(values.shape), seen, kept, reading.allocated, reading.nbytes)


def describe_layers(cache: Any) -> tuple[CacheLayerInfo, ...]:
    out = []
    for layer in cache_layers(cache) or []:
        keys = getattr(layer, "keys", None)
        ok = keys is not None and hasattr(keys, "shape") and keys.dim() >= 3
        out.append(
            CacheLayerInfo(
                kind=type(layer).__name__,
                dtype=str(keys.dtype) if ok else "",
                device=str(keys.device) if ok else "",
                kv_heads=int(keys.shape[1]) if ok else 0,
                head_dim=int(keys.shape[-1]) if ok else 0,
                max_len=_max_len(layer),
            )
        )
    return tuple(out)


def seq_length(cache: Any) -> int:
    """Tokens already in the cache (layer 0), 0 for no cache."""
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length())
    except (AttributeError, TypeError, IndexError):
        return 0


def _as_int(value: Any) -> int:
    return int(value.item()) if hasattr(value, "item") else int(value)


def _host_counters(rows: Sequence[list[LayerReading]]) -> dict[int, int]:
    """``{id(tensor): value}`` of every device length counter in ``rows``, read in one transfer
    (layers of a group share one counter per step)."""
    tensors = {id(v): v for row in rows for r in row for v in (r.seen, r.kept) if hasattr(v, "item")}
    if not tensors:
        return {}
    values = torch.stack([t.reshape(()).to(torch.int64) for t in tensors.values()]).cpu().tolist()
    return dict(zip(tensors, values))


def build_timeline(
    cache: Any, readings: Sequence[list[LayerReading] | None], *, batch_size: int, reused_len: int
) -> CacheTimeline | None:
    """Stack per-step readings into a :class:`CacheTimeline` (converts device counters once)."""
    if cache is None:
        return None
    rows = [expand(r) for r in readings if r is not None]
    infos = describe_layers(cache)
    n_layers = len(infos)
    shape = (len(rows), n_layers)
    seen = np.zeros(shape, np.int64)
    kept = np.zeros(shape, np.int64)
    allocated = np.zeros(shape, np.int64)
    nbytes = np.zeros(shape, np.int64)
    counters = _host_counters(rows)
    for s, row in enumerate(rows):
        for i, reading in enumerate(row[:n_layers]):
            seen[s, i] = counters.get(id(reading.seen), reading.seen)
            kept[s, i] = counters.get(id(reading.kept), reading.kept)
            allocated[s, i] = reading.allocated
            nbytes[s, i] = reading.nbytes
    return CacheTimeline(
        cache_class=type(cache).__name__,
        layers=infos,
        seq_len=seen,
        kept_len=kept,
        allocated_len=allocated,
        nbytes=nbytes,
        batch_size=batch_size,
        reused_len=reused_len,
    )
