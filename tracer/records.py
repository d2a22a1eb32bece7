"""Plain records of one traced ``generate`` call.

Records hold numpy arrays and Python scalars only, so a trace reloaded from a file needs
neither torch nor transformers.  The recorder (``tracer.hooks``) builds them; storage
(``tracer.storage``) and views (``tracer.viz``) read them.

Shape letters used in the field docs:
``B`` batch (sequences), ``K`` recorded top-k size, ``V`` vocabulary, ``Q`` query tokens fed
this step, ``T`` key positions, ``L`` layers, ``H`` query heads, ``D`` hidden size,
``S`` decode steps (step 0 is the prefill).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Protocol

import numpy as np

#: Version of the record/trace-file schema, ``major.minor``.  A reader accepts any minor of its
#: own major and refuses a newer major.
SCHEMA_VERSION = "1.0"


class TracerError(Exception):
    """Base class of the errors this package raises on purpose."""


class NotSupportedError(TracerError, NotImplementedError):
    """A model, cache or generation mode the tracer cannot record (raised before generating)."""


class MemoryBudgetError(TracerError, MemoryError):
    """What the configuration asks to record would exceed ``RecordConfig.max_bytes``."""


class TraceFormatError(TracerError, ValueError):
    """A trace file is corrupt, truncated, foreign, or of a newer schema major version."""


# --------------------------------------------------------------------------------------
# Per-step pieces
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopK:
    """The ``K`` best entries of one score row per sequence.

    ``probs`` are exact softmax probabilities of the *full* row, because ``logsumexp`` is
    recorded over the whole vocabulary.
    """

    ids: np.ndarray  # (B, K) int64, best first
    values: np.ndarray  # (B, K) float32, scores (logits) at this stage; -inf where masked
    logsumexp: np.ndarray  # (B,) float32, log of the softmax normaliser of the full row

    @property
    def probs(self) -> np.ndarray:
        """`(B, K)` softmax probabilities of ``ids`` under the full row."""
        with np.errstate(invalid="ignore", over="ignore"):
            out = np.exp(self.values.astype(np.float64) - self.logsumexp[:, None])
        return np.nan_to_num(out, nan=0.0).astype(np.float32)


@dataclass(frozen=True)
class Stage:
    """The score row after one stage of the logits pipeline.

    Stage 0 is the model's raw last-position logits (``name == "logits"``); stage ``i > 0`` is
    the output of the ``i``-th logits processor/warper that ``generate`` built, in order.
    """

    name: str
    params: Mapping[str, Any]  # the processor's scalar settings (JSON-able)
    top: TopK
    n_masked: np.ndarray  # (B,) int64, entries at -inf after this stage
    chosen_rank: np.ndarray  # (B,) int64, 0-based rank of the finally chosen token here
    chosen_logprob: np.ndarray  # (B,) float32, log-prob of the chosen token here (-inf: masked)
    kl: np.ndarray  # (B,) float32, KL(p_this || p_previous) in nats; 0 for stage 0
    entropy: np.ndarray | None = None  # (B,) float32, entropy of the full softmax row, nats


@dataclass(frozen=True)
class ProcessorEffect:
    """What one logits processor did at one step (derived from two consecutive stages)."""

    index: int  # position in the processor list, 0-based
    name: str
    params: Mapping[str, Any]
    before: TopK
    after: TopK
    newly_masked: np.ndarray  # (B,) int64, tokens this processor sent to -inf
    chosen_rank_before: np.ndarray  # (B,) int64
    chosen_rank_after: np.ndarray  # (B,) int64
    chosen_prob_before: np.ndarray  # (B,) float32
    chosen_prob_after: np.ndarray  # (B,) float32
    kl: np.ndarray  # (B,) float32, KL(after || before) in nats


@dataclass(frozen=True)
class StepInputs:
    """Exactly what ``prepare_inputs_for_generation`` fed the model at this step."""

    input_ids: np.ndarray  # (B, Q) int64: the whole prompt at step 0, one token after
    position_ids: np.ndarray | None  # (B, Q) int64
    cache_position: np.ndarray  # (Q,) int64, cache slots written (from the cache length)
    attention_mask_shape: tuple[int, ...] | None  # e.g. (B, T); None when generate dropped it
    cache_len_before: int  # tokens in the cache before this step


@dataclass(frozen=True)
class AttentionStats:
    """Cheap per-head summaries of the last query row, for the recorded layers."""

    layers: tuple[int, ...]  # the layer indices of axis 0
    entropy: np.ndarray  # (L_rec, B, H) float32, nats
    sink: np.ndarray  # (L_rec, B, H) float32, weight on the first attended key
    argmax: np.ndarray  # (L_rec, B, H) int64, key position with the highest weight


@dataclass(frozen=True)
class LogitLens:
    """The chosen token seen through each layer's last-position state (final norm + lm_head)."""

    layers: tuple[int, ...]  # decoder layer indices of axis 0
    chosen_rank: np.ndarray  # (L, B) int64
    chosen_prob: np.ndarray  # (L, B) float32
    top_id: np.ndarray  # (L, B) int64, the layer's own best token


@dataclass(frozen=True)
class StepRecord:
    """One iteration of the decoding loop (step 0 = prefill)."""

    index: int
    inputs: StepInputs
    stages: tuple[Stage, ...]
    chosen: np.ndarray  # (B,) int64, token appended (pad id for sequences already finished)
    sampled: bool  # multinomial sampling (True) or argmax (False)
    active: np.ndarray  # (B,) bool, sequence was still generating at this step
    finished: np.ndarray  # (B,) bool, sequence finished at this step
    stop_reasons: tuple[str | None, ...]  # per sequence: why it finished here, else None
    time_s: float  # host wall time from forward start to the stop check
    residual_norms: np.ndarray | None = None  # (P, B) float32, L2 norm of last position per point
    logit_lens: LogitLens | None = None
    attention_stats: AttentionStats | None = None

    @property
    def kind(self) -> str:
        return "prefill" if self.index == 0 else "decode"

    @property
    def logits(self) -> TopK:
        """Top-k of the raw last-position logits."""
        return self.stages[0].top

    @property
    def final(self) -> TopK:
        """Top-k of the scores the token was chosen from (after every processor)."""
        return self.stages[-1].top

    @property
    def chosen_prob(self) -> np.ndarray:
        """`(B,)` probability of the chosen token under the final distribution."""
        return np.exp(self.stages[-1].chosen_logprob).astype(np.float32)

    @property
    def processors(self) -> list[ProcessorEffect]:
        effects = []
        for i in range(1, len(self.stages)):
            b, a = self.stages[i - 1], self.stages[i]
            effects.append(
                ProcessorEffect(
                    index=i - 1,
                    name=a.name,
                    params=a.params,
                    before=b.top,
                    after=a.top,
                    newly_masked=np.maximum(a.n_masked - b.n_masked, 0),
                    chosen_rank_before=b.chosen_rank,
                    chosen_rank_after=a.chosen_rank,
                    chosen_prob_before=np.exp(b.chosen_logprob).astype(np.float32),
                    chosen_prob_after=np.exp(a.chosen_logprob).astype(np.float32),
                    kl=a.kl,
                )
            )
        return effects


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


# --------------------------------------------------------------------------------------
# The whole trace
# --------------------------------------------------------------------------------------


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


@dataclass
class Trace:
    """One traced ``generate`` call: prompts, per-step records, cache timeline, blobs."""

    meta: TraceMeta
    prompts: list[str] | None  # the prompt texts when the tracer knew them
    prompt_ids: np.ndarray  # (B, P) int64, the input_ids given to generate (left padded)
    prompt_mask: np.ndarray  # (B, P) int64 attention mask (1 = real token)
    sequences: np.ndarray  # (B, P + N) int64, what generate returned (or prompt + recorded steps)
    steps: list[StepRecord]
    cache: CacheTimeline | None = None
    token_text: dict[int, str] = field(default_factory=dict)  # id -> decoded text, every id used
    blobs: BlobStore = field(default_factory=MemoryStore)
    residual_points: tuple[str, ...] = ()  # names of the P rows of ``StepRecord.residual_norms``
    attention_layers: tuple[int, ...] = ()  # layers with recorded attention maps/stats
    attention_heads: tuple[int, ...] = ()  # query heads recorded (axis 1 of maps)
    kv_head_of: tuple[int, ...] = ()  # kv_head_of[h]: the KV head query head h reads (GQA)
    output_text: list[str] | None = None  # per sequence, the tokenizer's decode of the new tokens

    # -- the basics ------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def prompt_len(self) -> int:
        return int(self.prompt_ids.shape[1])

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def is_complete(self) -> bool:
        return self.meta.status == "complete"

    def generated_ids(self, seq: int = 0) -> np.ndarray:
        """The new tokens of sequence ``seq`` up to and including its stop token."""
        ids = []
        for step in self.steps:
            if not step.active[seq]:
                break
            ids.append(int(step.chosen[seq]))
        return np.asarray(ids, dtype=np.int64)

    @property
    def num_new_tokens(self) -> list[int]:
        return [len(self.generated_ids(b)) for b in range(self.batch_size)]

    def text_of(self, ids: Any) -> str:
        return "".join(self.token_text.get(int(i), f"<{int(i)}>") for i in np.asarray(ids).ravel())

    @property
    def generated_text(self) -> list[str]:
        """Per sequence: the new text, terminator tokens left out.

        Uses the tokenizer's own decode when the recorder had one (correct for characters
        split over several byte-level tokens), else joins the per-token texts."""
        if self.output_text is not None:
            return list(self.output_text)
        out = []
        for b in range(self.batch_size):
            ids = [i for i in self.generated_ids(b) if int(i) not in self.meta.terminators]
            out.append(self.text_of(ids))
        return out

    def prompt_tokens(self, seq: int = 0) -> np.ndarray:
        """The prompt ids of ``seq`` without left padding."""
        return self.prompt_ids[seq][self.prompt_mask[seq].astype(bool)]

    @property
    def stop_reasons(self) -> list[str]:
        """Per sequence: why it stopped ("eos:<|im_end|>", "max_length", ...)."""
        out: list[str] = []
        for b in range(self.batch_size):
            reason = next((s.stop_reasons[b] for s in self.steps if s.finished[b]), None)
            if reason is None:
                reason = "interrupted" if self.meta.status != "complete" else "unfinished"
            out.append(reason)
        return out

    @property
    def total_time_s(self) -> float:
        return float(sum(s.time_s for s in self.steps))

    # -- large arrays ----------------------------------------------------------------
    def attention(self, step: int, layer: int) -> np.ndarray:
        """`(B, H_rec, Q, T)` attention probabilities recorded at ``step`` in ``layer``.

        Step 0 holds the full prompt matrix (``Q = P``); later steps hold the new query row
        (``Q = 1``).  Heads are ``self.attention_heads``.  Rows of padding queries are zero."""
        maps = self.blobs.get(blob_key("attention", step, layer))
        if getattr(maps, "ndim", 0) != 4 or maps.shape[0] != self.batch_size or maps.shape[1] != len(self.attention_heads):
            raise TraceFormatError(f"attention/{step}/{layer} has shape {getattr(maps, 'shape', '?')}, expected "
                                   f"(batch {self.batch_size}, heads {len(self.attention_heads)}, q, k)")
        return maps

    def head_map(self, layer: int, head: int, seq: int = 0, *, upto_step: int | None = None) -> np.ndarray:
        """`(T, T)` one head's whole lower-triangular map, assembled from the prefill matrix
        and one row per decode step (``T = P + steps recorded``)."""
        if head not in self.attention_heads:
            raise KeyError(f"head {head} was not recorded (recorded: {list(self.attention_heads)})")
        h = self.attention_heads.index(head)
        last = self.num_steps - 1 if upto_step is None else upto_step
        rows = [self.attention(0, layer)[seq, h].astype(np.float32)]
        for s in range(1, last + 1):  # the new query row (use_cache=False re-feeds earlier rows)
            rows.append(self.attention(s, layer)[seq, h, -1:].astype(np.float32))
        return stack_rows(rows)

    def full_logits(self, step: int) -> np.ndarray:
        """`(B, V)` raw last-position logits (needs ``RecordConfig(full_logits=True)``)."""
        return self.blobs.get(blob_key("logits", step))

    def hidden(self, step: int, layer: int) -> np.ndarray:
        """`(B, D)` residual stream after decoder ``layer`` at the last position."""
        return self.blobs.get(blob_key("hidden", step, layer))

    def kv_snapshot(self, step: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """`(B, kv_heads, T, head_dim)` keys and values held by ``layer`` after ``step``."""
        return self.blobs.get(blob_key("keys", step, layer)), self.blobs.get(blob_key("values", step, layer))

    # -- tables for views ------------------------------------------------------------
    def attention_stats_table(self) -> dict[str, np.ndarray]:
        """Stack per-step head statistics: each `(S, L_rec, B, H)`."""
        steps = [s.attention_stats for s in self.steps if s.attention_stats is not None]
        if not steps:
            raise KeyError("no attention statistics recorded (RecordConfig(attention=True))")
        return {
            name: np.stack([getattr(st, name) for st in steps])
            for name in ("entropy", "sink", "argmax")
        }

    def table(self) -> Any:
        """pandas DataFrame of the steps, one row per sequence × step (``tracer.analysis``)."""
        from .analysis.table import trace_table

        return trace_table(self)

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.meta.model_name,
            "status": self.meta.status,
            "batch_size": self.batch_size,
            "prompt_len": self.prompt_len,
            "steps": self.num_steps,
            "new_tokens": self.num_new_tokens,
            "stop_reasons": self.stop_reasons,
            "time_s": round(self.total_time_s, 4),
            "generated_text": self.generated_text,
            "attention_layers": len(self.attention_layers),
            "cache": self.cache.summary(self.meta.num_heads) if self.cache is not None else None,
        }

    # -- output (implemented in tracer.storage, imported lazily) ---------------------
    def save(self, path: Any) -> Any:
        from .storage import save_trace

        return save_trace(self, path)

    def to_html(self, path: Any = None) -> str:
        from .export import trace_to_html

        return trace_to_html(self, path)

    def to_perfetto(self, path: Any = None) -> Any:
        from .export import trace_to_perfetto

        return trace_to_perfetto(self, path)

    def __repr__(self) -> str:
        return (
            f"Trace(model={self.meta.model_name!r}, batch={self.batch_size}, prompt_len={self.prompt_len}, "
            f"steps={self.num_steps}, stop={self.stop_reasons}, status={self.meta.status!r})"
        )

    def _repr_html_(self) -> str:
        from .export import trace_summary_html

        return trace_summary_html(self)


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


def replace(obj: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` re-exported for frozen records."""
    return dataclasses.replace(obj, **changes)
