"""Teacher-forced replays and what-if branches of a recorded run, recorded as traces.

* ``replay(model, tok, trace, mode="incremental")``: ``generate`` runs on the trace's prompt
  with a last logits processor (:class:`ForceTokens`) that puts every score but the recorded
  token at ``-inf``, so this model is fed the same tokens step by step through its cache, exactly
  as ``generate`` feeds it, and the tracer records it.  Stage 0 (the raw logits) is this model's
  own distribution; the processors the run used are rebuilt from its settings and run before the
  forcing stage, so every recorded stage is comparable.
* ``replay(..., mode="forward")``: one forward over prompt + response with the full causal mask
  (what a training step computes); the per-position distributions become the steps of a Trace.
* ``branch(model, tok, trace, step=k, token=t)``: steps before ``k`` forced to the recorded
  tokens, step ``k`` forced to ``t``, then ``generate`` goes on by itself; traced.

These functions run a model, so they use the tracer's public entry point (``tracer.trace``)
imported when called; comparing and reprocessing need no model.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

import numpy as np
import torch

from ..records import MemoryStore, StepInputs, StepRecord, Trace, TraceMeta, blob_key
from .processors import build_processors, merge_settings, run_processors, settings_of, stage_records

__all__ = ["ForceTokens", "replay", "branch"]

#: Settings that make ``generate`` build no processor of its own: the rebuilt list runs instead.
_NEUTRAL = {
    "do_sample": False, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0,
    "min_new_tokens": None, "sequence_bias": None, "bad_words_ids": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "remove_invalid_values": False, "exponential_decay_length_penalty": None, "renormalize_logits": False,
}
#: With sampling on, these keep ``generate`` from building warpers of its own as well.
_NEUTRAL_SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": None, "typical_p": 1.0,
                     "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


def _processor_base() -> type:
    from transformers import LogitsProcessor

    return LogitsProcessor


class ForceTokens(_processor_base()):  # type: ignore[misc]
    """Logits processor: at new-token index ``i < tokens.shape[1]`` every score but
    ``tokens[:, i]`` becomes ``-inf`` (the token is then chosen by argmax or by sampling with
    probability 1); later steps pass through unchanged."""

    def __init__(self, tokens: torch.Tensor, prompt_len: int):
        self._tokens = tokens  # (B, n) int64; private: not a setting to record
        self.prompt_len = int(prompt_len)
        self.forced_steps = int(tokens.shape[1])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        i = int(input_ids.shape[1]) - self.prompt_len
        if i >= self.forced_steps:
            return scores
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, self._tokens[:, i : i + 1].to(scores.device), 0.0)


def _check_model(model: Any, trace: Trace) -> None:
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if trace.meta.vocab_size and vocab and vocab != trace.meta.vocab_size:
        raise ValueError(f"the model's vocabulary ({vocab}) differs from the trace's ({trace.meta.vocab_size})")


def _forced_generate(model: Any, tokenizer: Any, trace: Trace, forced: np.ndarray, max_new_tokens: int,
                     settings: dict[str, Any], record: Any, note: str) -> Trace:
    import tracer

    device = next(model.parameters()).device
    prompt_len = trace.prompt_len
    processors = build_processors(settings, prompt_len=prompt_len, prompt_mask=trace.prompt_mask, device=device)
    processors.append(ForceTokens(torch.from_numpy(np.ascontiguousarray(forced, dtype=np.int64)).to(device),
                                  prompt_len))
    kwargs = dict(_NEUTRAL)
    if settings.get("do_sample"):
        kwargs.update(_NEUTRAL_SAMPLING, do_sample=True)
    eos = settings.get("eos_token_id")
    if eos is not None:
        kwargs["eos_token_id"] = eos
    if settings.get("pad_token_id") is not None:
        kwargs["pad_token_id"] = settings["pad_token_id"]
    gc = trace.meta.generation_config or {}
    for key in ("stop_strings", "cache_implementation", "use_cache"):
        if gc.get(key) is not None:
            kwargs[key] = gc[key]
    if kwargs.get("stop_strings") is not None:
        kwargs["tokenizer"] = tokenizer
    from transformers import LogitsProcessorList

    inputs = {
        "input_ids": torch.from_numpy(np.ascontiguousarray(trace.prompt_ids)).to(device),
        "attention_mask": torch.from_numpy(np.ascontiguousarray(trace.prompt_mask)).to(device),
    }
    with tracer.trace(model, tokenizer, record=record) as session:
        session.pending_prompts = list(trace.prompts) if trace.prompts is not None else None
        model.generate(**inputs, logits_processor=LogitsProcessorList(processors), max_new_tokens=max_new_tokens,
                       **kwargs)
    out = session.trace
    out.meta.notes.append(note)
    return out


def _forced_ids(trace: Trace, upto: int) -> np.ndarray:
    """`(B, upto)` the tokens the run appended at steps ``< upto`` (pad after a sequence stopped)."""
    return np.stack([trace.steps[s].chosen for s in range(upto)], axis=1) if upto else \
        np.zeros((trace.batch_size, 0), np.int64)


def replay(model: Any, tokenizer: Any, trace: Trace, mode: str = "incremental", record: Any = None) -> Trace:
    """Feed ``trace``'s prompt and generated tokens to ``model`` (teacher forcing); return a Trace.

    ``mode="incremental"``: step by step through the cache as ``generate`` does (a traced
    ``generate`` whose last processor forces the recorded token).  ``mode="forward"``: one
    forward over prompt + response with the full causal mask, as a training step computes it;
    its steps hold the distribution at each position (no cache, no timing per step)."""
    _check_model(model, trace)
    record = record or _default_record(trace)
    if mode == "incremental":
        n = trace.num_steps
        return _forced_generate(model, tokenizer, trace, _forced_ids(trace, n), n, settings_of(trace), record,
                                f"replay (incremental, teacher-forced) of {trace.meta.model_name} "
                                f"{trace.meta.created}: last stage ForceTokens")
    if mode == "forward":
        return _forward_replay(model, tokenizer, trace, record)
    raise ValueError(f"mode must be 'incremental' or 'forward', not {mode!r}")


def _default_record(trace: Trace) -> Any:
    """The original's top-k and full-logits choice (so both sides hold the same kinds of data)."""
    from ..config import RecordConfig

    k = int(trace.steps[0].stages[0].top.ids.shape[1]) if trace.steps else 10
    return RecordConfig(top_k=k, full_logits=bool((trace.meta.record_config or {}).get("full_logits", False)))


def _token_id(tokenizer: Any, token: int | str, model: Any = None) -> int:
    if isinstance(token, (int, np.integer)):
        vocab = _vocab_size(model, tokenizer)
        if not 0 <= int(token) < (vocab if vocab is not None else int(token) + 1):
            raise ValueError(f"token {int(token)} is not a token id of this model (ids 0..{vocab - 1})")
        return int(token)
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{token!r} is {len(ids)} tokens ({ids}); pass one token (its id or its exact text)")
    return int(ids[0])


def _vocab_size(model: Any, tokenizer: Any) -> int | None:
    """Rows of the model's output layer (the ids it can score), else the tokenizer's length."""
    head = getattr(model, "get_output_embeddings", lambda: None)() if model is not None else None
    weight = getattr(head, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    return len(tokenizer) if tokenizer is not None else None


def branch(model: Any, tokenizer: Any, trace: Trace, step: int, token: int | str, *, record: Any = None,
           **generate_kwargs: Any) -> Trace:
    """What if step ``step`` had chosen ``token``: steps ``< step`` forced to the recorded tokens,
    step ``step`` forced to ``token`` (an id, or a text that is exactly one token), then
    ``generate`` continues on its own; returns the whole run traced.

    Generation settings are the run's own, updated by ``generate_kwargs`` (e.g.
    ``do_sample=False``, ``max_new_tokens=16``: new tokens after the forced one; default: as many
    as the run had left).  Every sequence of a batch is forced to the same ``token``."""
    _check_model(model, trace)
    if not 0 <= step < trace.num_steps:
        raise IndexError(f"step {step} out of range: the trace has {trace.num_steps} steps")
    tid = _token_id(tokenizer, token, model)
    after = generate_kwargs.pop("max_new_tokens", trace.num_steps - step - 1)
    settings = merge_settings(settings_of(trace), generate_kwargs)
    forced = np.concatenate([_forced_ids(trace, step), np.full((trace.batch_size, 1), tid, np.int64)], axis=1)
    record = record or _default_record(trace)
    return _forced_generate(model, tokenizer, trace, forced, step + 1 + int(after), settings, record,
                            f"branch of {trace.meta.model_name} {trace.meta.created}: steps < {step} forced to the "
                            f"recorded tokens, step {step} forced to token {tid}")


# ----------------------------------------------------------------------------------------
# forward mode
# ----------------------------------------------------------------------------------------


def _forward_replay(model: Any, tokenizer: Any, trace: Trace, record: Any) -> Trace:
    import time

    device = next(model.parameters()).device
    p, n, batch = trace.prompt_len, trace.num_steps, trace.batch_size
    seqs = np.ascontiguousarray(trace.sequences[:, : p + n])
    active = np.stack([s.active for s in trace.steps], axis=1) if n else np.zeros((batch, 0), bool)
    # the token appended at step s sits at position p + s; it is attended to only while generating
    mask = np.concatenate([trace.prompt_mask, active.astype(np.int64)], axis=1)
    position_ids = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    ids_t = torch.from_numpy(seqs).to(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=ids_t, attention_mask=torch.from_numpy(mask).to(device),
                    position_ids=torch.from_numpy(position_ids).to(device), use_cache=False)
    logits = out.logits[:, p - 1 : p + n - 1, :].float()  # position p-1+s predicts the token of step s
    forward_s = time.perf_counter() - t0
    settings = settings_of(trace)
    processors = build_processors(settings, prompt_len=p, prompt_mask=trace.prompt_mask, device=device)
    store = MemoryStore()
    steps: list[StepRecord] = []
    for s in range(n):
        scores = logits[:, s, :]
        rows = run_processors(processors, ids_t[:, : p + s], scores)
        chosen = trace.steps[s].chosen
        stages = stage_records(rows, torch.from_numpy(chosen.astype(np.int64)).to(device), record.top_k)
        if record.full_logits:
            store.put(blob_key("logits", s), scores.detach().cpu().numpy().astype(np.float32))
        steps.append(StepRecord(
            index=s,
            inputs=StepInputs(seqs[:, p + s - 1 : p + s] if s else seqs[:, :p], position_ids[:, p - 1 + s : p + s],
                              np.arange(p - 1 + s, p + s, dtype=np.int64) if s else np.arange(p, dtype=np.int64),
                              tuple(mask.shape), 0),
            stages=stages, chosen=chosen.copy(), sampled=False, active=trace.steps[s].active.copy(),
            finished=trace.steps[s].finished.copy(), stop_reasons=tuple(trace.steps[s].stop_reasons),
            time_s=forward_s / max(n, 1),
        ))
    meta = _forward_meta(model, trace, record, forward_s)
    ids = set(np.unique(seqs).tolist())
    for st in steps:
        for stage in st.stages:
            ids.update(np.unique(stage.top.ids).tolist())
    ordered = sorted(i for i in ids if i >= 0)
    if tokenizer is not None:
        texts = tokenizer.batch_decode([[i] for i in ordered], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
        token_text = dict(zip(ordered, texts))
    else:
        token_text = {i: trace.token_text.get(i, f"<{i}>") for i in ordered}
    return Trace(meta=meta, prompts=list(trace.prompts) if trace.prompts is not None else None,
                 prompt_ids=trace.prompt_ids.copy(), prompt_mask=trace.prompt_mask.copy(), sequences=seqs.copy(),
                 steps=steps, cache=None, token_text=token_text, blobs=store,
                 output_text=list(trace.output_text) if trace.output_text is not None else None)


def _forward_meta(model: Any, trace: Trace, record: Any, seconds: float) -> TraceMeta:
    import dataclasses

    import transformers

    cfg = model.config
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    extra = {"backend": "transformers", "backend_info": {}} if hasattr(trace.meta, "backend") else {}
    meta = dataclasses.replace(
        trace.meta,
        **extra,
        model_name=str(getattr(cfg, "_name_or_path", "") or type(model).__name__).rstrip("/").split("/")[-1],
        model_class=type(model).__name__,
        num_layers=int(getattr(cfg, "num_hidden_layers", 0) or 0),
        num_heads=heads,
        num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
        vocab_size=int(getattr(cfg, "vocab_size", 0) or 0),
        dtype=str(next(model.parameters()).dtype),
        device=str(next(model.parameters()).device),
        attn_implementation=str(getattr(cfg, "_attn_implementation", "")),
        record_config=record.to_dict(),
        versions={**trace.meta.versions, "torch": str(torch.__version__), "transformers": transformers.__version__},
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        wall_time_s=seconds,
        status="complete",
        error=None,
        notes=[f"replay (forward: one pass over prompt + response, no cache) of {trace.meta.model_name} "
               f"{trace.meta.created}"],
    )
    return meta
