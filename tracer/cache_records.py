"""Records of the KV cache over a generation (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["CacheLayerInfo", "CacheTimeline"]

# --------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheLayerInfo:
    """Static facts of one cache layer."""

    kind: str  # class name, e.g. "DynamicLayer", "StaticLayer", "DynamicSlidingWindowLayer"
    dtype: str
    device: str
    kv_heads: int
    head_dim: int
    max_len: int | None  # allocated capacity (static) or window (sliding); None: grows


@dataclass(frozen=True)
class CacheTimeline:
    """The KV cache after every step, per layer."""

    cache_class: str
    layers: tuple[CacheLayerInfo, ...]
    seq_len: np.ndarray  # (S, L) int64, tokens seen by each layer (``get_seq_length``)
    kept_len: np.ndarray  # (S, L) int64, positions actually held (sliding windows keep fewer)
    allocated_len: np.ndarray  # (S, L) int64, positions the key tensor has room for
    nbytes: np.ndarray  # (S, L) int64, measured bytes of keys + values
    batch_size: int
    reused_len: int  # positions already in the cache when this generate started (multi-turn)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def total_bytes(self) -> np.ndarray:
        """`(S,)` measured bytes of the whole cache after each step."""
        return self.nbytes.sum(axis=1)

    def _elem_bytes(self) -> int:
        if not self.layers:
            return 0
        name = _numpy_dtype_name(self.layers[0].dtype)
        try:
            return int(np.dtype(name).itemsize)
        except TypeError:  # e.g. float8 kinds numpy cannot name: read the width from the name
            digits = "".join(ch for ch in name.split("_")[0] if ch.isdigit())
            return max(int(digits or 8) // 8, 1)

    def predicted_bytes(self, *, query_heads: int | None = None, allocated: bool = False) -> np.ndarray:
        """`(S,)` bytes the memory model predicts: ``2 × Σ_layers kv_heads × head_dim × tokens ×
        batch × bytes/elem``.  ``query_heads`` replaces ``kv_heads`` (what the cache would cost
        without grouped-query attention); ``allocated`` counts allocated rather than kept slots."""
        lengths = self.allocated_len if allocated else self.kept_len
        per_token = np.array(
            [(query_heads or info.kv_heads) * info.head_dim for info in self.layers], dtype=np.int64
        )
        return 2 * (lengths * per_token[None, :]).sum(axis=1) * self.batch_size * self._elem_bytes()

    def summary(self, query_heads: int | None = None) -> dict[str, Any]:
        last = -1
        out = {
            "cache_class": self.cache_class,
            "layers": self.num_layers,
            "layer_kinds": sorted({info.kind for info in self.layers}),
            "kv_heads": self.layers[0].kv_heads if self.layers else None,
            "head_dim": self.layers[0].head_dim if self.layers else None,
            "dtype": self.layers[0].dtype if self.layers else None,
            "reused_len": self.reused_len,
            "final_seq_len": int(self.seq_len[last].max()) if self.seq_len.size else 0,
            "measured_bytes": int(self.total_bytes[last]) if self.nbytes.size else 0,
            "predicted_bytes": int(self.predicted_bytes(allocated=True)[last]) if self.nbytes.size else 0,
        }
        if query_heads and self.nbytes.size:
            out["bytes_without_gqa"] = int(self.predicted_bytes(query_heads=query_heads, allocated=True)[last])
        return out


def _numpy_dtype_name(torch_dtype: str) -> str:
    name = torch_dtype.replace("torch.", "")
    return {"bfloat16": "float16"}.get(name, name)  # bf16 and fp16 are both 2 bytes
