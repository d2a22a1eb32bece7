"""Encode a :class:`~tracer.records.Trace` into a manifest and tables, section by section
(inputs, stages, extras, cache); :mod:`tracer.decode` mirrors each section."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from .manifest import FORMAT_NAME, jsonable
from .records import SCHEMA_VERSION, CacheTimeline, StepRecord, StopReason, Trace

__all__ = ["encode_trace", "STAGE_COLUMNS", "LENS_COLUMNS", "STATS_COLUMNS"]


def _stack(arrays: Sequence[np.ndarray], empty_shape: tuple[int, ...], dtype: Any, what: str) -> np.ndarray:
    if not arrays:
        return np.zeros(empty_shape, dtype=dtype)
    try:
        return np.ascontiguousarray(np.stack([np.asarray(a, dtype=dtype) for a in arrays]))
    except ValueError as exc:
        raise ValueError(f"cannot save trace: {what} changes shape between steps ({exc})") from None


def _concat(arrays: Sequence[np.ndarray], axis: int, empty_shape: tuple[int, ...], what: str,
            dtype: Any = np.int64) -> np.ndarray:
    if not arrays:
        return np.zeros(empty_shape, dtype=dtype)
    try:
        return np.ascontiguousarray(np.concatenate([np.asarray(a, dtype=dtype) for a in arrays], axis=axis))
    except ValueError as exc:
        raise ValueError(f"cannot save trace: {what} has inconsistent shapes ({exc})") from None


def _same_layers(values: list[tuple[int, ...]], what: str) -> list[int]:
    if not values:
        return []
    first = tuple(int(v) for v in values[0])
    if any(tuple(int(v) for v in other) != first for other in values[1:]):
        raise ValueError(f"cannot save trace: {what} layers differ between steps")
    return list(first)


def _encode_inputs(steps: Sequence[StepRecord], b: int, t: dict[str, np.ndarray]) -> dict[str, Any]:
    """Inputs are ragged (the prefill feeds the prompt, a decode step one token): concatenated
    along the query (or key) axis, each step's length in the manifest."""
    ins = [s.inputs for s in steps]
    t["inputs.input_ids"] = _concat([i.input_ids for i in ins], 1, (b, 0), "input_ids")
    t["inputs.position_ids"] = _concat([i.position_ids for i in ins if i.position_ids is not None], 1, (b, 0),
                                       "position_ids")
    t["inputs.cache_slots"] = _concat([i.cache_slots for i in ins], 0, (0,), "cache_slots")
    masks = [i.attention_mask for i in ins if i.attention_mask is not None]
    t["inputs.attention_mask"] = _concat(masks, 1, (b, 0), "attention_mask", np.int8)
    pads = [i.mask_padding for i in ins if i.mask_padding is not None]
    t["inputs.mask_padding"] = _stack(pads, (0, b), np.int64, "mask_padding")
    doc: dict[str, Any] = {}
    fed_len = [int(np.shape(i.cache_slots)[0]) for i in ins]
    if any(f != int(np.shape(i.input_ids)[1]) for f, i in zip(fed_len, ins)):
        doc["fed_len"] = fed_len  # embeddings fed (inputs_embeds): positions and slots without ids
    return doc | {
        "cache_len_before": [int(i.cache_len_before) for i in ins],
        "attention_mask_shape": [None if i.attention_mask_shape is None else [int(d) for d in i.attention_mask_shape]
                                 for i in ins],
        "query_len": [int(np.shape(i.input_ids)[1]) for i in ins],
        "has_position_ids": [i.position_ids is not None for i in ins],
        "input_names": [[str(x) for x in i.names] for i in ins],
        "mask_len": [None if i.attention_mask is None else int(np.shape(i.attention_mask)[1]) for i in ins],
        "has_mask_padding": [i.mask_padding is not None for i in ins],
        "logits_to_keep": [None if i.logits_to_keep is None else int(i.logits_to_keep) for i in ins],
        "cache_class": [None if i.cache_class is None else str(i.cache_class) for i in ins],
    }


def _encode_stages(steps: Sequence[StepRecord], b: int, t: dict[str, np.ndarray]) -> dict[str, Any]:
    n_stages = len(steps[0].stages) if steps else 0
    if any(len(s.stages) != n_stages for s in steps):
        raise ValueError("cannot save trace: the number of logits stages changes between steps")

    def col(get: Any, dtype: Any, tail: tuple[int, ...], what: str) -> np.ndarray:
        rows = [_stack([get(st) for st in s.stages], (0, *tail), dtype, what) for s in steps]
        return _stack(rows, (0, 0, *tail), dtype, what)

    t["stages.top_ids"] = col(lambda st: st.top.ids, np.int64, (b, 0), "stage top-k ids")
    t["stages.top_values"] = col(lambda st: st.top.values, np.float32, (b, 0), "stage top-k values")
    t["stages.logsumexp"] = col(lambda st: st.top.logsumexp, np.float32, (b,), "stage logsumexp")
    for name, dtype in STAGE_COLUMNS:
        t[f"stages.{name}"] = col(lambda st, name=name: getattr(st, name), dtype, (b,), f"stage {name}")
    nan = np.full(b, np.nan, np.float32)  # entropy is optional per stage: NaN where absent (flags in manifest)
    t["stages.entropy"] = col(lambda st: nan if st.entropy is None else st.entropy, np.float32, (b,), "stage entropy")
    # newly masked per stage: kept when every stage has it (a trace from tracer's recorder); else
    # left out, and read back as None (the net change of n_masked stands in)
    newly = bool(steps) and all(st.newly_masked is not None for s in steps for st in s.stages)
    if newly:
        t["stages.newly_masked"] = col(lambda st: st.newly_masked, np.int64, (b,), "stage newly_masked")
    return {
        "stage_names": [[str(st.name) for st in s.stages] for s in steps],
        "stage_params": [[jsonable(dict(st.params)) for st in s.stages] for s in steps],
        "stage_has_entropy": [[st.entropy is not None for st in s.stages] for s in steps],
        "stage_has_newly_masked": newly,
    }


STAGE_COLUMNS = (("n_masked", np.int64), ("chosen_rank", np.int64), ("chosen_logprob", np.float32),
                  ("kl", np.float32))
LENS_COLUMNS = (("chosen_rank", np.int64), ("chosen_prob", np.float32), ("top_id", np.int64))
STATS_COLUMNS = (("entropy", np.float32), ("sink", np.float32), ("argmax", np.int64))


def _encode_extras(trace: Trace, b: int, t: dict[str, np.ndarray]) -> dict[str, Any]:
    """Residual norms, logit lens and attention statistics (each optional per step)."""
    steps = trace.steps
    rn = [s.residual_norms for s in steps if s.residual_norms is not None]
    t["residual_norms"] = _stack(rn, (0, len(trace.residual_points), b), np.float32, "residual_norms")
    lens = [s.logit_lens for s in steps if s.logit_lens is not None]
    for name, dtype in LENS_COLUMNS:
        t[f"logit_lens.{name}"] = _stack([getattr(x, name) for x in lens], (0, 0, b), dtype, f"logit lens {name}")
    stats = [s.attention_stats for s in steps if s.attention_stats is not None]
    for name, dtype in STATS_COLUMNS:
        t[f"attention_stats.{name}"] = _stack([getattr(x, name) for x in stats], (0, 0, b, 0), dtype,
                                              f"attention stats {name}")
    return {
        "has_residual_norms": [s.residual_norms is not None for s in steps],
        "has_logit_lens": [s.logit_lens is not None for s in steps],
        "has_attention_stats": [s.attention_stats is not None for s in steps],
        "logit_lens_layers": _same_layers([x.layers for x in lens], "logit lens"),
        "attention_stats_layers": _same_layers([x.layers for x in stats], "attention stats"),
    }


def _encode_cache(cache: CacheTimeline | None, t: dict[str, np.ndarray]) -> dict[str, Any] | None:
    if cache is None:
        return None
    for name in ("seq_len", "kept_len", "allocated_len", "nbytes"):
        t[f"cache.{name}"] = np.ascontiguousarray(getattr(cache, name), dtype=np.int64).reshape(-1, len(cache.layers))
    return {
        "cache_class": cache.cache_class,
        "batch_size": int(cache.batch_size),
        "reused_len": int(cache.reused_len),
        "num_rows": int(t["cache.seq_len"].shape[0]),
        "layers": [jsonable(dataclasses.asdict(info)) for info in cache.layers],
    }


def _encode_reason(r: Any) -> Any:
    if r is None:
        return None
    return StopReason.parse(r).to_json()


def encode_trace(trace: Trace) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The manifest (without its file table) and the tables of ``trace``."""
    steps = trace.steps
    b = trace.batch_size
    t: dict[str, np.ndarray] = {
        "prompt_ids": np.ascontiguousarray(trace.prompt_ids, dtype=np.int64),
        "prompt_mask": np.ascontiguousarray(trace.prompt_mask, dtype=np.int64),
        "sequences": np.ascontiguousarray(trace.sequences, dtype=np.int64),
        "steps.chosen": _stack([s.chosen for s in steps], (0, b), np.int64, "chosen"),
        "steps.active": _stack([s.active for s in steps], (0, b), np.bool_, "active"),
        "steps.finished": _stack([s.finished for s in steps], (0, b), np.bool_, "finished"),
    }
    step_doc: dict[str, Any] = {
        "index": [int(s.index) for s in steps],
        "sampled": [bool(s.sampled) for s in steps],
        "time_s": [float(s.time_s) for s in steps],
        "stop_reasons": [[_encode_reason(r) for r in s.stop_reasons] for s in steps],
    }
    step_doc.update(_encode_inputs(steps, b, t))
    step_doc.update(_encode_stages(steps, b, t))
    step_doc.update(_encode_extras(trace, b, t))
    manifest = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "writer": "tracer.storage",
        "batch_size": b,
        "prompt_len": trace.prompt_len,
        "num_steps": len(steps),
        "meta": jsonable(dataclasses.asdict(trace.meta)),
        "prompts": None if trace.prompts is None else [str(p) for p in trace.prompts],
        "output_text": None if trace.output_text is None else [str(x) for x in trace.output_text],
        "token_text": {str(int(k)): str(v) for k, v in trace.token_text.items()},
        "token_bytes": {str(int(k)): bytes(v).hex() for k, v in trace.token_bytes.items()},
        "residual_points": [str(p) for p in trace.residual_points],
        "attention_layers": [int(x) for x in trace.attention_layers],
        "attention_heads": [int(x) for x in trace.attention_heads],
        "kv_head_of": [int(x) for x in trace.kv_head_of],
        "steps": step_doc,
        "cache": _encode_cache(trace.cache, t),
    }
    return manifest, t


