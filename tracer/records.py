"""Plain records of one traced ``generate`` call.

Records hold numpy arrays and Python scalars only, so a trace reloaded from a file needs
neither torch nor transformers.  The recorder (``tracer.recorder``) builds them; storage
(``tracer.storage``) and views (``tracer.viz``) read them.

Shape letters used in the field docs:
``B`` batch (sequences), ``K`` recorded top-k size, ``V`` vocabulary, ``Q`` query tokens fed
this step, ``T`` key positions, ``L`` layers, ``H`` query heads, ``D`` hidden size,
``S`` decode steps (step 0 is the prefill).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .blobs import BlobStore, MemoryStore, blob_key, parse_blob_key, stack_rows
from .cache_records import CacheLayerInfo, CacheTimeline
from .errors import MemoryBudgetError, NotSupportedError, TraceFormatError, TracerError, TracerWarning
from .stops import STOP_KINDS, StopReason
from .trace_meta import TraceMeta

__all__ = [
    "SCHEMA_VERSION", "STOP_KINDS", "StopReason", "TopK", "Stage", "ProcessorEffect", "StepInputs", "AttentionStats",
    "LogitLens", "StepRecord", "CacheLayerInfo", "CacheTimeline", "BlobStore", "MemoryStore", "TraceMeta",
    "Trace", "blob_key", "parse_blob_key", "stack_rows", "replace",
    "TracerError", "NotSupportedError", "MemoryBudgetError", "TraceFormatError", "TracerWarning",
]

#: Version of the record/trace-file schema, ``major.minor``.  A reader accepts any minor of its
#: own major and refuses a newer major.  1.1: StopReason objects, inputs as fed (names, 2-D mask,
#: logits_to_keep, cache class), ``cache_slots`` (was ``cache_position``), token bytes, backend.
SCHEMA_VERSION = "1.1"


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
    # (B,) int64, entries at -inf here that were not at the stage before (0 for stage 0); None
    # where not recorded (traces saved before it, engines that keep top-k only): then the net
    # change of n_masked stands in
    newly_masked: np.ndarray | None = None


@dataclass(frozen=True)
class ProcessorEffect:
    """What one logits processor did at one step (derived from two consecutive stages)."""

    index: int  # position in the processor list, 0-based
    name: str
    params: Mapping[str, Any]
    before: TopK
    after: TopK
    newly_masked: np.ndarray  # (B,) int64, entries it set to -inf (Stage.newly_masked; where a trace lacks it, the net change n_masked after - before, 0 if fewer)
    chosen_rank_before: np.ndarray  # (B,) int64
    chosen_rank_after: np.ndarray  # (B,) int64
    chosen_prob_before: np.ndarray  # (B,) float32
    chosen_prob_after: np.ndarray  # (B,) float32
    kl: np.ndarray  # (B,) float32, KL(after || before) in nats


@dataclass(frozen=True, init=False)
class StepInputs:
    """What the model's forward received at this step (step 0: the prefill).

    ``input_ids``, ``position_ids``, ``attention_mask`` (2-D, as fed), ``logits_to_keep`` and
    the cache class are read from the forward call itself.  ``cache_slots`` is *computed* (the
    cache positions this step writes, ``cache_len_before + arange(Q)``): transformers 5.17+
    passes no ``cache_position``, and with left padding a row's ``position_ids`` differ from
    its cache slots."""

    input_ids: np.ndarray  # (B, Q) int64: the whole prompt at step 0, one token after
    position_ids: np.ndarray | None  # (B, Q) int64 as fed (per row: left padding shows); None: not fed
    cache_slots: np.ndarray  # (Q,) int64, cache slots written (computed from the cache length)
    attention_mask_shape: tuple[int, ...] | None  # shape of the mask as fed; None when not fed
    cache_len_before: int  # tokens in the cache before this step
    names: tuple[str, ...]  # keyword arguments forward received (those not None), in order
    attention_mask: np.ndarray | None  # (B, T) int8 2-D mask as fed; None: not fed, not 2-D or too large
    mask_padding: np.ndarray | None  # (B,) int64 zeros per row of the 2-D mask (kept when the mask is not)
    logits_to_keep: int | None  # as fed (1: only the last position's logits); None: not fed
    cache_class: str | None  # class of the cache object fed, e.g. "DynamicCache"; None: no cache

    def __init__(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray | None,
        cache_slots: np.ndarray | None = None,
        attention_mask_shape: tuple[int, ...] | None = None,
        cache_len_before: int = 0,
        names: tuple[str, ...] = (),
        attention_mask: np.ndarray | None = None,
        mask_padding: np.ndarray | None = None,
        logits_to_keep: int | None = None,
        cache_class: str | None = None,
        *,
        cache_position: np.ndarray | None = None,  # deprecated spelling of cache_slots
    ):
        if cache_slots is None:
            cache_slots = cache_position
        if cache_slots is None:
            q = int(np.shape(input_ids)[1]) if np.ndim(input_ids) == 2 else 0
            cache_slots = np.arange(cache_len_before, cache_len_before + q, dtype=np.int64)
        if mask_padding is None and attention_mask is not None and np.ndim(attention_mask) == 2:
            mask_padding = (np.asarray(attention_mask) == 0).sum(axis=1).astype(np.int64)
        for name, value in (("input_ids", input_ids), ("position_ids", position_ids), ("cache_slots", cache_slots),
                            ("attention_mask_shape", None if attention_mask_shape is None else tuple(attention_mask_shape)),
                            ("cache_len_before", int(cache_len_before)), ("names", tuple(names)),
                            ("attention_mask", attention_mask), ("mask_padding", mask_padding),
                            ("logits_to_keep", logits_to_keep), ("cache_class", cache_class)):
            object.__setattr__(self, name, value)

    @property
    def cache_position(self) -> np.ndarray:
        """Deprecated alias of :attr:`cache_slots` (computed, not fed by ``generate``)."""
        return self.cache_slots


@dataclass(frozen=True)
class AttentionStats:
    """Cheap per-head summaries of the last query row, for the recorded layers."""

    layers: tuple[int, ...]  # the layer indices of axis 0
    entropy: np.ndarray  # (L_rec, B, H) float32, nats
    sink: np.ndarray  # (L_rec, B, H) float32, weight on the first attended key
    argmax: np.ndarray  # (L_rec, B, H) int64, key position with the highest weight


@dataclass(frozen=True)
class LogitLens:
    """The chosen token seen through each layer's last-position state (final norm + lm_head, with
    the family's own output scaling / soft-capping / projection: RecordConfig.logit_lens)."""

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
    stop_reasons: tuple[StopReason | None, ...]  # per sequence: why it finished here, else None
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
                    newly_masked=(a.newly_masked if a.newly_masked is not None
                                  else np.maximum(a.n_masked - b.n_masked, 0)),
                    chosen_rank_before=b.chosen_rank,
                    chosen_rank_after=a.chosen_rank,
                    chosen_prob_before=np.exp(b.chosen_logprob).astype(np.float32),
                    chosen_prob_after=np.exp(a.chosen_logprob).astype(np.float32),
                    kl=a.kl,
                )
            )
        return effects


# --------------------------------------------------------------------------------------
# The whole trace
# --------------------------------------------------------------------------------------


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
    token_bytes: dict[int, bytes] = field(default_factory=dict)  # id -> the token's raw UTF-8 bytes

    def __post_init__(self) -> None:
        # old callers may pass strings: every recorded reason is a StopReason
        for i, step in enumerate(self.steps):
            if any(r is not None and not isinstance(r, StopReason) for r in step.stop_reasons):
                self.steps[i] = dataclasses.replace(
                    step, stop_reasons=tuple(StopReason.parse(r) for r in step.stop_reasons))

    @classmethod
    def from_steps(
        cls,
        meta: TraceMeta,
        steps: Sequence[StepRecord],
        *,
        prompt_ids: np.ndarray,
        prompt_mask: np.ndarray | None = None,
        sequences: np.ndarray | None = None,
        prompts: Sequence[str] | None = None,
        cache: CacheTimeline | None = None,
        token_text: Mapping[int, str] | None = None,
        token_bytes: Mapping[int, bytes] | None = None,
        blobs: "BlobStore | Mapping[str, np.ndarray] | None" = None,
        residual_points: Sequence[str] = (),
        attention_layers: Sequence[int] = (),
        attention_heads: Sequence[int] = (),
        kv_head_of: Sequence[int] | None = None,
        output_text: Sequence[str] | None = None,
    ) -> "Trace":
        """Build a whole trace in one go (the recorder and the vLLM backend use this).

        ``prompt_mask`` defaults to all ones; ``sequences`` to the prompt followed by each step's
        chosen token; ``kv_head_of`` to the grouped-query mapping of ``meta``'s head counts;
        ``token_bytes`` to the UTF-8 of ``token_text``; a plain mapping of ``blobs`` becomes a
        :class:`MemoryStore`."""
        prompt_ids = np.asarray(prompt_ids, dtype=np.int64)
        prompt_mask = np.ones_like(prompt_ids) if prompt_mask is None else np.asarray(prompt_mask, dtype=np.int64)
        steps = list(steps)
        batch = prompt_ids.shape[0]
        for s in steps:
            if s.chosen.shape[0] != batch:
                raise ValueError(f"step {s.index} has {s.chosen.shape[0]} sequences, the prompt has {batch}")
        if sequences is None:
            new = np.stack([s.chosen for s in steps], axis=1) if steps else np.zeros((batch, 0), np.int64)
            sequences = np.concatenate([prompt_ids, new.astype(np.int64)], axis=1)
        if kv_head_of is None:
            group = max(meta.num_heads // max(meta.num_kv_heads, 1), 1)
            kv_head_of = tuple(h // group for h in range(meta.num_heads))
        text = dict(token_text or {})
        raw = dict(token_bytes) if token_bytes is not None else {i: t.encode("utf-8", "surrogatepass")
                                                                 for i, t in text.items()}
        if blobs is None:
            store: BlobStore = MemoryStore()
        elif isinstance(blobs, Mapping):
            store = MemoryStore(dict(blobs))
        else:
            store = blobs
        return cls(
            meta=meta,
            prompts=None if prompts is None else list(prompts),
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            sequences=np.asarray(sequences, dtype=np.int64),
            steps=steps,
            cache=cache,
            token_text=text,
            blobs=store,
            residual_points=tuple(residual_points),
            attention_layers=tuple(int(x) for x in attention_layers),
            attention_heads=tuple(int(x) for x in attention_heads),
            kv_head_of=tuple(int(x) for x in kv_head_of),
            output_text=None if output_text is None else list(output_text),
            token_bytes=raw,
        )

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
        """The text of a run of tokens: their bytes decoded together (characters split over
        tokens come out whole) when every token's bytes are known, else the per-token texts."""
        ids = [int(i) for i in np.asarray(ids).ravel()]
        if ids and all(i in self.token_bytes for i in ids):
            return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", "replace")
        return "".join(self.token_text.get(i, f"<{i}>") for i in ids)

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
    def stop_reasons(self) -> list[StopReason | None]:
        """Per sequence: why it stopped (a :class:`StopReason`, equal to its string form such as
        ``"eos:<|im_end|>"`` or ``"max_length"``); ``"interrupted"`` when the run ended early
        before the sequence finished, None when a complete run left it unfinished."""
        out: list[StopReason | None] = []
        for b in range(self.batch_size):
            reason = next((s.stop_reasons[b] for s in self.steps if s.finished[b] and b < len(s.stop_reasons)), None)
            if reason is None and self.meta.status != "complete":
                reason = StopReason("interrupted")
            out.append(StopReason.parse(reason))
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
            "stop_reasons": [str(r) if r is not None else "unfinished" for r in self.stop_reasons],
            "time_s": round(self.total_time_s, 4),
            "generated_text": self.generated_text,
            "attention_layers": len(self.attention_layers),
            "cache": self.cache.summary(self.meta.num_heads) if self.cache is not None else None,
        }

    # -- output (implemented in tracer.storage, imported lazily) ---------------------
    def save(self, path: Any) -> Any:
        from .storage import save_trace

        return save_trace(self, path)

    def to_html(self, path: Any = None) -> Any:
        """The HTML report: the string, or with ``path`` written there and the path returned."""
        from .export import trace_to_html

        return trace_to_html(self, path)

    def to_perfetto(self, path: Any = None) -> Any:
        """Perfetto/Chrome trace JSON: the dict, or with ``path`` written there and the path returned."""
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


def replace(obj: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` re-exported for frozen records."""
    return dataclasses.replace(obj, **changes)
