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


def build_timeline(
    cache: Any, readings: Sequence[list[LayerReading] | None], *, batch_size: int, reused_len: int
) -> CacheTimeline | None:
    """Stack per-step readings into a :class:`CacheTimeline` (converts device counters once)."""
    if cache is None:
        return None
    rows = [r for r in readings if r is not None]
    infos = describe_layers(cache)
    n_layers = len(infos)
    shape = (len(rows), n_layers)
    seen = np.zeros(shape, np.int64)
    kept = np.zeros(shape, np.int64)
    allocated = np.zeros(shape, np.int64)
    nbytes = np.zeros(shape, np.int64)
    for s, row in enumerate(rows):
        for i, reading in enumerate(row[:n_layers]):
            seen[s, i] = _as_int(reading.seen)
            kept[s, i] = _as_int(reading.kept)
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
