"""llama.cpp steps → Trace: the llama.cpp backend's conversion, without importing llama.cpp.

:mod:`tracer.backends.llamacpp` drives llama.cpp (evaluation, then each sampler of the chain
applied one at a time on the raw logit row) and hands this module plain numpy captures:
:class:`StepCapture` per step, each holding the raw row and one :class:`Snapshot` per sampler
(the token-data array as that sampler left it: the ids still in it and their logits).  Here
they become ordinary :class:`~tracer.records.Stage` records with the recorder's arithmetic
(top-k of the row, log-sum-exp over the whole vocabulary, masked count, chosen rank and
log-prob, KL to the previous stage, entropy).  Tests feed hand-made captures.
"""

from __future__ import annotations

import datetime as _dt
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..config import RecordConfig
from ..records import (
    CacheLayerInfo,
    CacheTimeline,
    MemoryStore,
    Stage,
    StepInputs,
    StepRecord,
    StopReason,
    TopK,
    Trace,
    TraceMeta,
    blob_key,
)

#: What this backend cannot record (listed in every trace's notes and ``backend_info``).
NOT_RECORDED = (
    "not recorded by the llama.cpp backend: attention maps, attention statistics, residual-stream "
    "norms, hidden states, the logit lens, key/value snapshots (llama.cpp keeps them inside its "
    "graph; the bindings expose logits, the sampler chain and the KV cache's cell count)"
)
NOT_RECORDED_KINDS = ("attention", "residual_norms", "hidden_states", "logit_lens", "kv_snapshots")
#: Samplers that pick the token rather than change the row: not recorded as stages.
SELECTORS = ("dist", "greedy")


@dataclass(frozen=True)
class Snapshot:
    """The token-data array after one sampler: ``ids`` `(n,)` (llama.cpp's int32) still in it,
    their ``logits`` `(n,)` float32 (n = the vocabulary when the sampler removed nothing).  The
    final selector (``greedy``/``dist``) is kept by name only, with empty arrays."""

    name: str
    params: Mapping[str, Any]
    ids: np.ndarray
    logits: np.ndarray
    same_as_previous: bool = False  # the sampler left the array as it found it


@dataclass
class StepCapture:
    """One step as the engine saw it."""

    fed: Sequence[int]  # token ids evaluated before this step's sampling (prompt suffix / last token)
    cache_len_before: int  # KV cells in use before the evaluation
    kv_cells: int  # KV cells in use after it (llama_memory_seq_pos_max + 1)
    raw: np.ndarray  # (V,) float32, the logits row the sampler chain read
    snapshots: Sequence[Snapshot]
    chosen: int
    selector: str  # "greedy" | "dist"
    eval_s: float
    sample_s: float


@dataclass(frozen=True)
class LlamaCppFacts:
    """What a trace says about the engine and model (plain values, no llama.cpp types)."""

    version: str = ""
    model_path: str = ""
    model_name: str = ""  # the name the generate path records for the same GGUF (tracer.models.gguf_model_name)
    gguf_name: str = ""  # the GGUF's own general.name
    architecture: str = ""
    n_vocab: int = 0
    n_ctx: int = 0
    n_batch: int = 0
    n_threads: int = 0
    num_layers: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    hidden_size: int = 0
    file_type: str = ""
    kv_dtype: str = "float16"
    eog_ids: tuple[int, ...] = ()  # every id llama_vocab_is_eog holds: what ends a run
    eos_id: int = -1  # the GGUF's eos token (tokenizer.ggml.eos_token_id)
    metadata: Mapping[str, str] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Stages from snapshots (the recorder's arithmetic on a sparse row)
# --------------------------------------------------------------------------------------------


def _dense_logp(ids: np.ndarray, logp: np.ndarray, vocab: int) -> np.ndarray:
    out = np.full(vocab, -np.inf, np.float32)
    out[ids] = logp
    return out


def _top_order(ids: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` best entries, best first, ties by id: every entry at least as good
    as the k-th best value (found by ``torch.topk``, ~5x faster than ``np.argpartition`` on a
    49,152-entry row) is a candidate, so a tie across the k-th place goes to the lowest ids."""
    if k < values.size:
        kth = torch.topk(torch.from_numpy(values), k, sorted=False).values.min()
        part = np.flatnonzero(values >= kth.item())
    else:
        part = np.arange(values.size)
    return part[np.lexsort((ids[part], -values[part]))][:k]


@functools.lru_cache(maxsize=4)
def _all_ids(vocab: int) -> np.ndarray:
    ids = np.arange(vocab, dtype=np.int32)
    ids.flags.writeable = False
    return ids


def stages_of(step: StepCapture, vocab: int, top_k: int) -> tuple[Stage, ...]:
    """Stage 0 = the raw row (``"logits"``), then one stage per non-selecting sampler."""
    # ids stay in the integer type they came in (llama.cpp's int32): only the top-k leave as int64
    all_ids = _all_ids(vocab)
    rows: list[tuple[str, Mapping[str, Any], np.ndarray, np.ndarray, bool]] = [
        ("logits", {}, all_ids, np.asarray(step.raw, np.float32), False)]
    for snap in step.snapshots:
        if snap.name in SELECTORS:
            continue
        rows.append((snap.name, dict(snap.params), np.asarray(snap.ids), np.asarray(snap.logits, np.float32),
                     snap.same_as_previous))
    chosen = int(step.chosen)
    stages: list[Stage] = []
    prev_dense: np.ndarray | None = None
    prev: Stage | None = None
    for name, params, ids, logits, same in rows:
        if same and prev is not None:
            stages.append(Stage(name=name, params=params, top=prev.top, n_masked=prev.n_masked,
                                chosen_rank=prev.chosen_rank, chosen_logprob=prev.chosen_logprob,
                                kl=np.zeros(1, np.float32), entropy=prev.entropy))
            continue
        finite = np.isfinite(logits)
        if finite.all():  # the raw row, and every sampler that masks nothing: no gather
            f_ids, f_logits = ids, logits.astype(np.float64)
        else:
            f_ids, f_logits = ids[finite], logits[finite].astype(np.float64)
        m = f_logits.max() if f_logits.size else 0.0
        lse = m + np.log(np.exp(f_logits - m).sum()) if f_logits.size else -np.inf
        logp = (f_logits - lse).astype(np.float32)
        k = min(top_k, f_ids.size)
        if k:
            order = _top_order(f_ids, f_logits, k)
            top_ids, top_vals = f_ids[order], f_logits[order].astype(np.float32)
        else:
            top_ids, top_vals = np.zeros(0, np.int64), np.zeros(0, np.float32)
        if k < top_k:  # fewer tokens left than recorded: pad
            top_ids = np.concatenate([top_ids, np.full(top_k - k, -1, np.int64)])
            top_vals = np.concatenate([top_vals, np.full(top_k - k, -np.inf, np.float32)])
        hit = np.flatnonzero(f_ids == chosen)
        chosen_lp = float(logp[hit[0]]) if hit.size else -np.inf
        rank = int((logp > chosen_lp).sum())
        p = np.exp(logp.astype(np.float64))
        entropy = float(-(p * np.where(p > 0, logp, 0.0)).sum())
        if prev_dense is None:
            kl = 0.0
        else:
            with np.errstate(invalid="ignore"):
                kl = float(np.nansum(p * (logp - prev_dense[f_ids])))
        stage = Stage(
            name=name,
            params=params,
            top=TopK(ids=top_ids[None].astype(np.int64), values=top_vals[None].astype(np.float32),
                     logsumexp=np.array([lse], np.float32)),
            n_masked=np.array([vocab - int(f_ids.size)], np.int64),
            chosen_rank=np.array([rank], np.int64),
            chosen_logprob=np.array([chosen_lp], np.float32),
            kl=np.array([kl], np.float32),
            entropy=np.array([entropy], np.float32),
        )
        stages.append(stage)
        prev = stage
        if f_ids.size == vocab and (f_ids is all_ids or np.array_equal(f_ids, all_ids)):
            prev_dense = logp  # the whole vocabulary in id order: already the dense row
        else:
            prev_dense = _dense_logp(f_ids, logp, vocab)
    return tuple(stages)


def mt19937_uniforms(seed: int, n: int) -> np.ndarray:
    """The first ``n`` draws of ``std::uniform_real_distribution<double>(0, 1)`` on a
    ``std::mt19937(seed)`` (libstdc++'s ``generate_canonical``: two 32-bit outputs per draw),
    as llama.cpp's ``dist`` sampler makes them, one per step."""
    bg = np.random.MT19937()
    bg._legacy_seeding(int(seed) & 0xFFFFFFFF)  # init_genrand(seed), as std::mt19937(seed)
    raw = bg.random_raw(2 * n).astype(np.float64).reshape(n, 2)
    u = (raw[:, 0] + raw[:, 1] * 2.0**32) / 2.0**64
    return np.where(u >= 1.0, np.nextafter(1.0, 0.0), u)


def dist_pick(ids: np.ndarray, logits: np.ndarray, u: float) -> int:
    """The token llama.cpp's ``dist`` sampler picks from the candidates ``ids``/``logits`` (in
    the array's order: best first after top-k) with the uniform draw ``u``: float32
    ``expf(logit - max)``, a double running sum, the first index reaching ``u × total``."""
    logits = np.asarray(logits, np.float32)
    keep = np.isfinite(logits)
    ids, logits = np.asarray(ids)[keep], logits[keep]
    p = np.exp(logits - logits.max()).astype(np.float32).astype(np.float64)
    run = np.cumsum(p)
    i = int(np.searchsorted(run, run[-1] * u, side="left"))
    return int(ids[min(i, len(ids) - 1)])


# --------------------------------------------------------------------------------------------
# The trace
# --------------------------------------------------------------------------------------------


def trace_from_steps(
    captures: Sequence[StepCapture],
    *,
    facts: LlamaCppFacts,
    prompt_ids: Sequence[int],
    prompt_text: str | None,
    settings: Mapping[str, Any],
    stop: StopReason | None,
    output_text: str,
    token_piece: Callable[[int], bytes],
    record: RecordConfig | None = None,
    reused: int = 0,
    info: Mapping[str, Any] | None = None,
    wall_time_s: float = 0.0,
    status: str = "complete",
    error: str | None = None,
    notes: Sequence[str] = (),
) -> Trace:
    """One :class:`Trace` of a llama.cpp run (batch size 1).

    ``stop``: why the last step ended the run (None: not finished).  ``token_piece(id)``: the raw
    bytes of a token (called for every id the trace uses: prompt, chosen, recorded top-k).  ``reused``: prompt
    tokens whose KV cells were kept from the previous run (multi-turn).  ``notes``: added to the
    trace's notes (e.g. what the seed did)."""
    record = record or RecordConfig()
    vocab = int(facts.n_vocab)
    k = int(record.top_k)
    prompt = [int(i) for i in prompt_ids]
    n_prompt = len(prompt)
    steps: list[StepRecord] = []
    store = MemoryStore()
    for i, cap in enumerate(captures):
        fed = np.asarray([list(cap.fed)], np.int64).reshape(1, -1)
        slots = np.arange(cap.cache_len_before, cap.cache_len_before + fed.shape[1], dtype=np.int64)
        last = i == len(captures) - 1
        done = last and stop is not None
        steps.append(StepRecord(
            index=i,
            inputs=StepInputs(input_ids=fed, position_ids=slots[None].copy(), cache_slots=slots,
                              attention_mask_shape=None, cache_len_before=int(cap.cache_len_before),
                              names=("tokens", "n_past"), logits_to_keep=1,
                              cache_class="llama.cpp KV cache (llama_memory)"),
            stages=stages_of(cap, vocab, k),
            chosen=np.array([int(cap.chosen)], np.int64),
            sampled=cap.selector == "dist",
            active=np.array([True]),
            finished=np.array([done]),
            stop_reasons=(stop if done else None,),
            time_s=float(cap.eval_s + cap.sample_s),
        ))
        if record.full_logits:
            store.put(blob_key("logits", i), np.asarray(cap.raw, np.float32)[None])
    cache = _cache_timeline(captures, facts, reused)
    ids_used = set(prompt) | {int(c.chosen) for c in captures}
    for s in steps:
        for st in s.stages:
            ids_used.update(int(x) for x in st.top.ids.ravel() if x >= 0)
    raw = {i: bytes(token_piece(i)) for i in sorted(ids_used | set(facts.eog_ids))}
    text = {i: b.decode("utf-8", "replace") for i, b in raw.items()}
    meta = _meta(facts, settings, record, info or {}, captures, reused, n_prompt, wall_time_s, status, error)
    meta.notes[1:1] = [str(n) for n in notes]
    meta.terminators = {int(i): text[int(i)] for i in facts.eog_ids}
    others = [int(i) for i in facts.eog_ids if int(i) != int(facts.eos_id)]
    if others:  # say it where generate would stop on the eos token only
        meta.notes.insert(1, "terminators: llama.cpp ends the run on every end-of-generation token of the GGUF "
                          "vocabulary (llama_vocab_is_eog): " + ", ".join(f"{i} {text[int(i)]!r}" for i in facts.eog_ids)
                          + (f"; the GGUF's eos token is {facts.eos_id} {text.get(int(facts.eos_id), '')!r}"
                             if facts.eos_id >= 0 else ""))
    return Trace.from_steps(
        meta, steps,
        prompt_ids=np.asarray([prompt], np.int64).reshape(1, -1),
        prompts=[prompt_text] if prompt_text is not None else None,
        cache=cache, token_text=text, token_bytes=raw, blobs=store,
        output_text=[output_text],
    )


def _cache_timeline(captures: Sequence[StepCapture], facts: LlamaCppFacts, reused: int) -> CacheTimeline | None:
    """The KV cache's cell count after each step, as every layer (llama.cpp keeps one cell
    range for all layers); bytes are computed (cells × kv heads × head dim × 2 × dtype size),
    llama.cpp reports no per-layer size."""
    if not captures or not facts.num_layers:
        return None
    layers = max(int(facts.num_layers), 1)
    head_dim = facts.hidden_size // facts.num_heads if facts.num_heads else 0
    info = CacheLayerInfo(kind="llama.cpp unified KV cells", dtype=facts.kv_dtype, device="cpu",
                          kv_heads=int(facts.num_kv_heads), head_dim=int(head_dim), max_len=int(facts.n_ctx) or None)
    cells = np.array([c.kv_cells for c in captures], np.int64)[:, None].repeat(layers, axis=1)
    elem = 2 if facts.kv_dtype in ("float16", "bfloat16") else 4
    nbytes = 2 * cells * int(facts.num_kv_heads) * int(head_dim) * elem
    return CacheTimeline(cache_class="llama.cpp KV cache (llama_memory)", layers=(info,) * layers, seq_len=cells,
                         kept_len=cells.copy(), allocated_len=np.full_like(cells, int(facts.n_ctx)),
                         nbytes=nbytes, batch_size=1, reused_len=int(reused))


def _meta(facts, settings, record, info, captures, reused, n_prompt, wall_time_s, status, error) -> TraceMeta:
    heads = int(facts.num_heads)
    eval_s = sum(c.eval_s for c in captures)
    sample_s = sum(c.sample_s for c in captures)
    timing = {
        "prefill_s": float(captures[0].eval_s) if captures else 0.0,
        "decode_eval_s": float(eval_s - (captures[0].eval_s if captures else 0.0)),
        "sampling_s": float(sample_s),
        "tokens_per_s": float(len(captures) / (eval_s + sample_s)) if captures and eval_s + sample_s > 0 else 0.0,
    }
    chain = [s.name for s in (captures[0].snapshots if captures else ())]
    backend_info = {
        "engine": "llama.cpp",
        "version": facts.version,
        "model_path": facts.model_path,
        "gguf_name": facts.gguf_name,
        "file_type": facts.file_type,
        "n_ctx": facts.n_ctx,
        "n_batch": facts.n_batch,
        "n_threads": facts.n_threads,
        "sampler_chain": chain,
        "sampling": dict(settings),
        "reused_tokens": int(reused),
        "evaluated_prompt_tokens": int(len(captures[0].fed)) if captures else 0,
        "num_prompt_tokens": int(n_prompt),
        "timing": timing,
        "not_recorded": list(NOT_RECORDED_KINDS),
        **dict(info),
    }
    notes = [
        f"backend: llama.cpp (llama-cpp-python {facts.version}), {facts.file_type or 'GGUF'} weights, "
        f"sampler chain {' -> '.join(chain) or '-'}; each stage is the token-data array as that sampler "
        "left it, the chosen token is the chain's own pick",
        f"KV cache: {reused} of {n_prompt} prompt tokens reused from the previous run; "
        "bytes computed from the cell count (llama.cpp reports no per-layer size)",
        NOT_RECORDED,
    ]
    gen_config = {k: v for k, v in settings.items()}
    gen_config["eos_token_id"] = list(facts.eog_ids)
    return TraceMeta(
        model_name=facts.model_name,
        model_class=facts.architecture,
        model_config={"architecture": facts.architecture, "file_type": facts.file_type,
                      "quantization_config": {"quant_method": "gguf", "file_type": facts.file_type}},
        num_layers=int(facts.num_layers),
        num_heads=heads,
        num_kv_heads=int(facts.num_kv_heads or heads),
        head_dim=int(facts.hidden_size // heads) if heads else 0,
        hidden_size=int(facts.hidden_size),
        vocab_size=int(facts.n_vocab),
        dtype=facts.file_type,
        device="cpu",
        attn_implementation="llama.cpp",
        generation_config=gen_config,
        special_tokens={},
        pad_token_id=None,
        terminators={int(i): "" for i in facts.eog_ids},
        record_config=record.to_dict(),
        versions={"tracer": _tracer_version(), "llama_cpp_python": facts.version, **dict(facts.versions)},
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        wall_time_s=float(wall_time_s),
        status=status,
        error=error,
        notes=notes,
        backend="llama.cpp",
        backend_info=backend_info,
    )


def _tracer_version() -> str:
    from .. import __version__

    return __version__
