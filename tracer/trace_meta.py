"""``TraceMeta``: everything about a traced run except its per-step data (JSON-able; numpy-free).

Re-exported by :mod:`tracer.records`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["TraceMeta"]


@dataclass
class TraceMeta:
    """Everything about the run except the per-step data (all JSON-able)."""

    model_name: str = ""
    model_class: str = ""
    model_config: dict[str, Any] = field(default_factory=dict)
    num_layers: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    hidden_size: int = 0
    vocab_size: int = 0
    dtype: str = ""
    device: str = ""
    attn_implementation: str = ""
    generation_config: dict[str, Any] = field(default_factory=dict)
    special_tokens: dict[str, Any] = field(default_factory=dict)  # name -> {"text", "id"}
    pad_token_id: int | None = None
    terminators: dict[int, str] = field(default_factory=dict)  # eos ids -> their text
    record_config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    wall_time_s: float = 0.0  # wall time of the whole generate call
    status: str = "complete"  # "complete" | "interrupted" | "error"
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    backend: str = "transformers"  # "transformers" | "vllm"
    backend_info: dict[str, Any] = field(default_factory=dict)  # engine version, sampling params, ...
