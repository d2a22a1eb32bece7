"""What a trace records: :class:`RecordConfig`.  Defaults are light and bounded."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Sequence

Selection = Sequence[int] | Literal["all"] | None


@dataclass(frozen=True)
class RecordConfig:
    """Choose what ``tracer.trace`` records.

    Light by default: model inputs, top-``top_k`` of the logits after every processor, the
    chosen token, stop reasons, timings and cache sizes.  Everything heavier is opt-in.
    """

    top_k: int = 10
    """Candidates kept per stage (raw logits, after each processor)."""
    full_logits: bool = False
    """Also keep the raw full-vocabulary logits row of every step (`(B, V)` float32)."""
    modules: bool = False
    """Residual-stream summaries: L2 norm of the last position after the embedding, every
    decoder layer and the final norm."""
    hidden_layers: Selection = None
    """Decoder layers whose last-position hidden vector is kept (`(B, D)` per step)."""
    logit_lens: bool = False
    """Project every layer's last-position state through the final norm and ``lm_head`` (with the
    family's own steps around it: OPT's ``project_out``, Cohere's and Granite's logit scaling,
    Gemma 2/3's soft-capping; at the last layer it is the model's own distribution, or the trace
    notes that it is not) and keep the chosen token's rank/probability and each layer's best token."""
    cache: bool = True
    """Per-layer KV-cache lengths and bytes after every step."""
    kv_layers: Selection = None
    """Layers whose full key/value tensors are snapshotted (at ``kv_steps``)."""
    kv_steps: Sequence[int] | None = None
    """Steps at which key/value snapshots are taken (None: the last step only is not known in
    advance, so None means every step)."""
    attention: bool = False
    """Record attention through the model's own kernel (sdpa/eager/flash)."""
    attention_layers: Selection = "all"
    attention_heads: Selection = "all"
    attention_steps: Sequence[int] | None = None
    """Steps whose attention is recorded (None: every step)."""
    attention_maps: bool = True
    """False keeps only the cheap per-head statistics (entropy, sink, argmax)."""
    attention_dtype: Literal["float16", "float32"] = "float16"
    routing: bool = False
    """Mixture-of-experts models: per token fed and MoE layer, the selected experts and their
    routing weights, read from the router modules' own outputs (``tracer.routing``)."""
    max_bytes: int = 2 * 1024**3
    """Memory budget for everything recorded; checked before generating."""
    sync_timing: bool = False
    """Synchronize the device at step boundaries so step times are exact (slower on GPU)."""

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError("RecordConfig.top_k must be >= 1")
        if self.max_bytes <= 0:
            raise ValueError("RecordConfig.max_bytes must be positive")
        if self.attention_dtype not in ("float16", "float32"):
            raise ValueError("RecordConfig.attention_dtype must be 'float16' or 'float32'")
        for name in ("hidden_layers", "kv_layers", "attention_layers", "attention_heads"):
            value = getattr(self, name)
            if value is not None and value != "all":
                object.__setattr__(self, name, tuple(int(v) for v in value))
        for name in ("kv_steps", "attention_steps"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(v) for v in value))

    @classmethod
    def everything(cls, **changes: Any) -> "RecordConfig":
        """Module summaries, logit lens and every layer's attention."""
        base = dict(modules=True, logit_lens=True, attention=True)
        base.update(changes)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


def resolve(selection: Selection, n: int, what: str) -> list[int]:
    """Turn a selection into sorted indices in ``range(n)`` (negative indices count from the end)."""
    if selection is None:
        return []
    if selection == "all":
        return list(range(n))
    out = []
    for i in selection:
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise ValueError(f"{what} index {i} out of range for {n} {what}s")
        out.append(j)
    return sorted(set(out))
