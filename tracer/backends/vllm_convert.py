"""RequestOutput → Trace: the vLLM backend's conversion, without importing vLLM.

:func:`traces_from_outputs` needs only objects shaped like vLLM's ``RequestOutput`` /
``CompletionOutput`` / ``Logprob`` and the plain :class:`EngineFacts`; :mod:`tracer.backends.vllm`
runs the engine and calls it.  The tests feed it hand-made outputs in an environment without vLLM.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .. import records as _records
from ..byte_tokens import token_bytes as shared_token_bytes
from ..config import RecordConfig
from ..records import MemoryStore, NotSupportedError, Stage, StepInputs, StepRecord, TopK, Trace, TraceMeta, blob_key

LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs", "raw_logits", "processed_logits")
#: Blob kinds of prompt log-probs (step 0): ``(1, P)`` chosen, ``(1, P, K)`` top ids / values.
PROMPT_LOGPROB_KINDS = ("prompt_logprobs", "prompt_top_ids", "prompt_top_logprobs")
#: Sampling parameters copied into ``meta.generation_config`` (when the object has them).
SAMPLING_FIELDS = (
    "n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "max_tokens", "min_tokens", "stop", "stop_token_ids", "ignore_eos",
    "logprobs", "prompt_logprobs", "include_stop_str_in_output", "skip_special_tokens", "logit_bias",
    "allowed_token_ids", "bad_words",
)
NOT_RECORDED = (
    "not recorded by the vLLM backend: attention maps, hidden states, per-processor stages, "
    "the KV cache timeline (vLLM pages its cache; prefix-cache hits are step 0's cache_len_before)"
)


# --------------------------------------------------------------------------------------------
# Engine facts: what the converter needs to know about the LLM (plain values, no vLLM types)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineFacts:
    """What a trace says about the engine that produced it."""

    version: str = ""
    logprobs_mode: str = "raw_logprobs"
    model: str = ""
    hf_config: Mapping[str, Any] = field(default_factory=dict)
    dtype: str = ""
    device: str = ""
    tensor_parallel_size: int = 1
    prefix_caching: bool | None = None
    max_logprobs: int | None = None
    eos_token_id: int | None = None
    versions: Mapping[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# RequestOutput -> Trace
# --------------------------------------------------------------------------------------------


def traces_from_outputs(
    outputs: Sequence[Any],
    sampling_params: Sequence[Any] | Any,
    *,
    facts: EngineFacts,
    tokenizer: Any = None,
    record: RecordConfig | None = None,
    wall_time_s: float = 0.0,
) -> list[Trace]:
    """Traces of vLLM ``RequestOutput``s generated with logprobs ``>= record.top_k``.

    ``sampling_params``: one per output (or one for all), as the caller gave them (they are
    what ``meta.generation_config`` shows)."""
    record = record or RecordConfig()
    if facts.logprobs_mode not in LOGPROBS_MODES:
        raise NotSupportedError(f"unknown vLLM logprobs_mode {facts.logprobs_mode!r}")
    sps = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(outputs)
    if len(sps) != len(outputs):
        raise ValueError(f"{len(sps)} sampling parameter sets for {len(outputs)} outputs")
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    texts = TokenTexts(tokenizer)  # one decode per token id for the whole batch
    traces = []
    for out, sp in zip(outputs, sps):
        for completion in out.outputs:
            traces.append(_trace_of(out, completion, sp, facts, texts, record, wall_time_s, created))
    return traces


def _trace_of(out, completion, sp, facts, text_of, record, wall_time_s, created) -> Trace:
    tokenizer = text_of.tok
    prompt = [int(i) for i in (out.prompt_token_ids or [])]
    gen = [int(i) for i in completion.token_ids]
    lps = completion.logprobs
    if gen and (lps is None or len(lps) != len(gen)):
        raise ValueError(
            f"request {out.request_id}: {0 if lps is None else len(lps)} log-prob rows for {len(gen)} tokens "
            "(generate with SamplingParams(logprobs=k), as vllm_generate does)"
        )
    k = int(record.top_k)
    mode = facts.logprobs_mode
    exact = mode.endswith("_logprobs")
    cached = int(getattr(out, "num_cached_tokens", 0) or 0)
    sampled = float(getattr(sp, "temperature", 1.0) or 0.0) >= 1e-5
    reason = stop_reason_text(completion.finish_reason, completion.stop_reason, gen, facts.eos_token_id, text_of)
    times = _step_times(getattr(out, "metrics", None), len(gen))
    n_prompt = len(prompt)
    steps: list[StepRecord] = []
    for i, tok in enumerate(gen):
        row = lps[i]
        ids, values = _top(row, k)
        entry = row.get(tok)
        chosen_lp = float(entry.logprob) if entry is not None else math.nan
        rank = int(entry.rank) - 1 if entry is not None and entry.rank is not None else -1
        stage = Stage(
            name=mode,
            params={"logprobs_mode": mode, "exact_probs": exact},
            top=TopK(ids=ids[None], values=values[None],
                     logsumexp=np.array([0.0 if exact else np.nan], np.float32)),
            n_masked=np.array([int(np.sum(np.isneginf(values)))], np.int64),  # lower bound: top-k only
            chosen_rank=np.array([rank], np.int64),
            chosen_logprob=np.array([chosen_lp if exact else np.nan], np.float32),
            kl=np.zeros(1, np.float32),
        )
        if i == 0:
            q_ids, slots = prompt[cached:], np.arange(cached, n_prompt, dtype=np.int64)
        else:
            q_ids, slots = [gen[i - 1]], np.array([n_prompt + i - 1], np.int64)
        last = i == len(gen) - 1
        steps.append(StepRecord(
            index=i,
            inputs=make_step_inputs(np.asarray([q_ids], np.int64).reshape(1, -1), slots, int(slots[0]) if len(slots) else n_prompt),
            stages=(stage,),
            chosen=np.array([tok], np.int64),
            sampled=sampled,
            active=np.array([True]),
            finished=np.array([last and completion.finish_reason is not None]),
            stop_reasons=(_stop_value(reason) if last and completion.finish_reason is not None else None,),
            time_s=times[i],
        ))
    blobs = MemoryStore()
    if getattr(out, "prompt_logprobs", None):
        for kind, arr in zip(PROMPT_LOGPROB_KINDS, _prompt_arrays(out.prompt_logprobs, prompt)):
            blobs.put(blob_key(kind, 0), arr)
    ids_used = set(prompt) | set(gen)
    for s in steps:
        ids_used.update(int(x) for x in s.stages[0].top.ids.ravel() if x >= 0)
    ordered = sorted(ids_used)
    meta = _meta(out, completion, sp, facts, text_of, record, wall_time_s, created, reason, cached, times)
    trace = Trace(
        meta=meta,
        prompts=[out.prompt if out.prompt is not None else text_of.decode(prompt, special=True)],
        prompt_ids=np.asarray([prompt], np.int64).reshape(1, -1),
        prompt_mask=np.ones((1, n_prompt), np.int64),
        sequences=np.asarray([prompt + gen], np.int64),
        steps=steps,
        cache=None,
        token_text=text_of.each(ordered),
        blobs=blobs,
        output_text=[str(completion.text)],
    )
    raw = token_bytes(tokenizer, ordered) if hasattr(trace, "token_bytes") else None
    if raw is not None:
        trace.token_bytes = raw
    return trace


def _top(row: Mapping[int, Any], k: int) -> tuple[np.ndarray, np.ndarray]:
    """`(K,)` ids and values of the entries ranked 1..k (best first); -1/-inf pad if fewer."""
    ranked = sorted(((lp.rank, tid, lp.logprob) for tid, lp in row.items() if lp.rank is not None and lp.rank <= k))
    seen: dict[int, float] = {}
    for _, tid, value in ranked:
        seen.setdefault(int(tid), float(value))
    ids = np.full(k, -1, np.int64)
    values = np.full(k, -np.inf, np.float32)
    for j, (tid, value) in enumerate(list(seen.items())[:k]):
        ids[j], values[j] = tid, value
    return ids, values


def _prompt_arrays(rows: Sequence[Any], prompt: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(prompt)
    kk = max((sum(1 for lp in r.values() if lp.rank is not None) for r in rows if r), default=0)
    width = max(kk - 1, 1)  # the prompt token's own entry plus the top-k; keep the top-k
    chosen = np.full((1, n), np.nan, np.float32)
    ids = np.full((1, n, width), -1, np.int64)
    vals = np.full((1, n, width), -np.inf, np.float32)
    for p, row in enumerate(rows):
        if not row or p >= n:
            continue
        entry = row.get(prompt[p])
        if entry is not None:
            chosen[0, p] = entry.logprob
        top_ids, top_vals = _top(row, width)
        ids[0, p], vals[0, p] = top_ids, top_vals
    return chosen, ids, vals


def stop_reason_text(finish_reason: Any, stop_reason: Any, gen: Sequence[int], eos_token_id: int | None,
                     tokenizer: Any) -> str | None:
    """vLLM's ``finish_reason`` / ``stop_reason`` as the tracer's stop-reason string.

    ``stop`` + None: the eos token (``"eos:<text>"``); ``stop`` + an int: a ``stop_token_ids``
    entry (``"stop_token:<text>"``); ``stop`` + a str: a stop string (``"stop_string:<str>"``);
    ``length``: ``"max_length"``; ``abort``: ``"abort"``; None: still running."""
    if finish_reason is None:
        return None
    texts = tokenizer if isinstance(tokenizer, TokenTexts) else TokenTexts(tokenizer)
    fr = str(finish_reason).lower()
    fr = fr.rsplit(".", 1)[-1]  # an enum's str() on some versions
    if fr == "length":
        return "max_length"
    if fr == "stop":
        if isinstance(stop_reason, str):
            return f"stop_string:{stop_reason}"
        if isinstance(stop_reason, int):
            return f"stop_token:{texts.one(int(stop_reason))}"
        last = int(gen[-1]) if gen else eos_token_id
        return f"eos:{texts.one(last)}" if last is not None else "eos"
    return "abort"


def _stop_value(text: str | None) -> Any:
    """The contract's ``StopReason`` where records has it, else the string."""
    cls = getattr(_records, "StopReason", None)
    if text is None or cls is None or not hasattr(cls, "parse"):
        return text
    return cls.parse(text)


def make_step_inputs(input_ids: np.ndarray, slots: np.ndarray, cache_len_before: int) -> StepInputs:
    """``StepInputs`` under either field name of the cache slots (``cache_position`` → ``cache_slots``)."""
    names = {f.name for f in dataclasses.fields(StepInputs)}
    kw: dict[str, Any] = {
        "input_ids": input_ids,
        "position_ids": slots[None, :].copy(),  # vLLM's positions are the cache slots here
        "attention_mask_shape": None,
        "cache_len_before": int(cache_len_before),
    }
    kw["cache_slots" if "cache_slots" in names else "cache_position"] = slots
    if "cache_class" in names:
        kw["cache_class"] = "vLLM paged KV cache"
    return StepInputs(**kw)


def _step_times(metrics: Any, n: int) -> list[float]:
    """Per step seconds from vLLM's request stats (``LLM(disable_log_stats=False)``): the
    prefill to the first token, then the mean inter-token time (vLLM keeps no per-token times)."""
    if n == 0:
        return []
    first = getattr(metrics, "first_token_ts", 0.0) or 0.0
    sched = getattr(metrics, "scheduled_ts", 0.0) or 0.0
    last = getattr(metrics, "last_token_ts", 0.0) or 0.0
    if not first or not sched:
        return [0.0] * n
    decode = (last - first) / (n - 1) if n > 1 else 0.0
    return [max(first - sched, 0.0)] + [max(decode, 0.0)] * (n - 1)


def _meta(out, completion, sp, facts, texts, record, wall_time_s, created, reason, cached, times) -> TraceMeta:
    tokenizer = texts.tok
    cfg = dict(facts.hf_config)
    heads = int(cfg.get("num_attention_heads", 0) or 0)
    hidden = int(cfg.get("hidden_size", 0) or 0)
    stop_ids = [facts.eos_token_id] if facts.eos_token_id is not None else []
    stop_ids += [int(i) for i in (getattr(sp, "stop_token_ids", None) or [])]
    gen_config = sampling_dict(sp)
    timing = {}
    metrics = getattr(out, "metrics", None)
    if metrics is not None and getattr(metrics, "first_token_ts", 0.0):
        timing = {
            "queued_s": float(metrics.scheduled_ts - metrics.queued_ts),
            "prefill_s": float(metrics.first_token_ts - metrics.scheduled_ts),
            "decode_s": float(metrics.last_token_ts - metrics.first_token_ts),
            "first_token_latency_s": float(getattr(metrics, "first_token_latency", 0.0) or 0.0),
        }
    info = {
        "engine": "vllm",
        "version": facts.version,
        "logprobs_mode": facts.logprobs_mode,
        "exact_probs": facts.logprobs_mode.endswith("_logprobs"),
        "sampling_params": gen_config,
        "traced_logprobs": int(record.top_k),
        "request_id": str(out.request_id),
        "sample_index": int(getattr(completion, "index", 0) or 0),
        "finish_reason": None if completion.finish_reason is None else str(completion.finish_reason),
        "stop_reason": completion.stop_reason if isinstance(completion.stop_reason, (int, str)) else None,
        "num_prompt_tokens": len(out.prompt_token_ids or []),
        "num_cached_tokens": cached,
        "cumulative_logprob": _finite(getattr(completion, "cumulative_logprob", None)),
        "tensor_parallel_size": facts.tensor_parallel_size,
        "prefix_caching": facts.prefix_caching,
        "timing": timing,
    }
    notes = [
        f"backend: vLLM {facts.version}, logprobs_mode={facts.logprobs_mode}"
        + (" (the model's raw distribution, before sampling parameters)" if facts.logprobs_mode.startswith("raw")
           else " (after temperature / penalties / top-k / top-p)"),
        f"prefix cache: {cached} of {len(out.prompt_token_ids or [])} prompt tokens reused",
        NOT_RECORDED,
        "step times: " + ("prefill, then vLLM's mean inter-token time" if timing else
                          "not reported (build the LLM with disable_log_stats=False)"),
    ]
    if not facts.logprobs_mode.endswith("_logprobs"):
        notes.append("logits mode: values are logits; probabilities and chosen log-probs are unknown (NaN)")
    kw: dict[str, Any] = dict(
        model_name=_short_name(facts.model),
        model_class=str((cfg.get("architectures") or [""])[0]),
        model_config=cfg,
        num_layers=int(cfg.get("num_hidden_layers", 0) or 0),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads", heads) or heads),
        head_dim=int(cfg.get("head_dim", 0) or (hidden // heads if heads else 0)),
        hidden_size=hidden,
        vocab_size=int(cfg.get("vocab_size", 0) or 0),
        dtype=facts.dtype,
        device=facts.device,
        attn_implementation="vllm",
        generation_config=gen_config,
        special_tokens=_special_tokens(tokenizer),
        pad_token_id=getattr(tokenizer, "pad_token_id", None),
        terminators={int(i): texts.one(int(i)) for i in dict.fromkeys(stop_ids)},
        record_config=record.to_dict(),
        versions={"tracer": _tracer_version(), **dict(facts.versions)},
        created=created,
        wall_time_s=float(wall_time_s),
        status="complete" if completion.finish_reason is not None else "interrupted",
        notes=notes,
    )
    names = {f.name for f in dataclasses.fields(TraceMeta)}
    if "backend" in names:
        kw["backend"] = "vllm"
    if "backend_info" in names:
        kw["backend_info"] = jsonable(info)
    else:  # until TraceMeta has the field: keep the facts where the file format already saves them
        kw["generation_config"] = {**gen_config, "backend": "vllm", "backend_info": jsonable(info)}
    return TraceMeta(**kw)


def backend_info(trace: Trace) -> dict[str, Any]:
    """``meta.backend_info`` (or, in files written before that field, its copy in the generation config)."""
    info = getattr(trace.meta, "backend_info", None)
    if info:
        return dict(info)
    return dict(trace.meta.generation_config.get("backend_info") or {})


def sampling_dict(sp: Any) -> dict[str, Any]:
    """The sampling parameters as a JSON-able dict (the fields vLLM users set)."""
    out = {}
    for name in SAMPLING_FIELDS:
        if hasattr(sp, name):
            out[name] = jsonable(getattr(sp, name))
    return out


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


class TokenTexts:
    """Token texts through the tokenizer (the HF recorder's way: each id decoded alone, special
    tokens kept, no clean-up), ``<id>`` without one.  Decoded once per id and batch of outputs."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.cache: dict[int, str] = {}

    def one(self, tid: int) -> str:
        return self.each([tid])[int(tid)]

    def each(self, ids: Sequence[int]) -> dict[int, str]:
        ids = [int(i) for i in ids]
        if self.tok is None:
            return {i: f"<{i}>" for i in ids}
        new = sorted({i for i in ids if i not in self.cache})
        if new:
            fast = getattr(self.tok, "backend_tokenizer", None)  # the Rust tokenizer: same text, far cheaper
            if fast is not None and hasattr(fast, "decode_batch"):
                texts = fast.decode_batch([[i] for i in new], skip_special_tokens=False)
            else:
                texts = self.tok.batch_decode([[i] for i in new], skip_special_tokens=False,
                                              clean_up_tokenization_spaces=False)
            self.cache.update(zip(new, texts))
        return {i: self.cache[i] for i in ids}

    def decode(self, ids: Sequence[int], special: bool) -> str:
        if self.tok is None:
            return "".join(f"<{int(i)}>" for i in ids)
        return self.tok.decode(list(ids), skip_special_tokens=not special)


def token_bytes(tokenizer: Any, ids: Sequence[int]) -> dict[int, bytes] | None:
    """Raw bytes per token id (the recorder's rule, :func:`tracer.byte_tokens.token_bytes`);
    None without a tokenizer that names its tokens."""
    if tokenizer is None or not hasattr(tokenizer, "convert_ids_to_tokens"):
        return None
    return shared_token_bytes(tokenizer, [int(i) for i in ids])


def _special_tokens(tok: Any) -> dict[str, Any]:
    out = {}
    for name, text in (getattr(tok, "special_tokens_map", {}) or {}).items():
        if isinstance(text, str):
            out[name] = {"text": text, "id": int(tok.convert_tokens_to_ids(text))}
    return out


def _short_name(model: str) -> str:
    parts = [p for p in str(model).replace("\\", "/").split("/") if p]
    return parts[-1] if str(model).startswith(("/", ".", "~")) and parts else str(model)


def _tracer_version() -> str:
    from .. import __version__

    return __version__


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.integer, np.floating, np.bool_)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)

