"""Finished Traces as table rows: the ``sequences`` and ``steps`` tables of a corpus dataset.

Reads records only (never hooks).  One Trace holds one batch; row ``b`` of the batch is the
prompt ``ids[b]``.  Token texts follow :mod:`tracer.text`: ``token_text`` is what the token shows on
its own row (bytes of a character it does not complete escaped, the character shown whole on
the token that completes it); ``decoded`` is what the token adds to the decoded answer (joined
in step order they give the tokenizer's decode)."""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from ..records import Trace
from ..text import pieces

__all__ = ["STEP_SCHEMA", "SEQUENCE_SCHEMA", "trace_rows", "steps_table", "sequences_table"]


def table_schemas():
    import pyarrow as pa

    processor = pa.struct([("name", pa.string()), ("newly_masked", pa.int64()),
                           ("chosen_rank", pa.int64()), ("kl", pa.float32())])
    steps = pa.schema([
        ("prompt_id", pa.string()), ("seq", pa.int32()), ("step", pa.int32()), ("token_id", pa.int64()),
        ("token_text", pa.string()), ("decoded", pa.string()), ("logprob", pa.float32()), ("rank", pa.int64()),
        ("final_logprob", pa.float32()), ("final_rank", pa.int64()),
        ("entropy", pa.float32()), ("final_entropy", pa.float32()),
        ("topk_ids", pa.list_(pa.int64())), ("topk_logprobs", pa.list_(pa.float32())),
        ("n_masked", pa.int64()), ("processors", pa.list_(processor)),
        ("finished", pa.bool_()), ("stop_reason", pa.string()), ("time_s", pa.float64()),
    ])
    sequences = pa.schema([
        ("prompt_id", pa.string()), ("seq", pa.int32()), ("prompt", pa.string()), ("prompt_text", pa.string()),
        ("prompt_tokens", pa.int32()), ("generated_text", pa.string()), ("token_ids", pa.list_(pa.int64())),
        ("num_tokens", pa.int32()), ("stop_reason", pa.string()), ("engine", pa.string()),
        ("settings", pa.string()), ("batch_size", pa.int32()), ("batch_time_s", pa.float64()),
        ("time_s", pa.float64()), ("trace_file", pa.string()), ("trace_row", pa.int32()),
    ])
    return steps, sequences


def __getattr__(name: str) -> Any:
    if name in ("STEP_SCHEMA", "SEQUENCE_SCHEMA"):
        steps, seqs = table_schemas()
        return steps if name == "STEP_SCHEMA" else seqs
    raise AttributeError(name)


def _f(x: Any) -> float:
    return float(x) if x is not None else float("nan")


def trace_rows(trace: Trace, ids: Sequence[str], prompts: Sequence[str], *, engine: str,
               settings: dict[str, Any], trace_files: Sequence[str | None] | None = None,
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(sequence rows, step rows) of one batch trace; ``ids``/``prompts`` per batch row."""
    if len(ids) != trace.batch_size:
        raise ValueError(f"{len(ids)} prompt ids for a batch of {trace.batch_size}")
    settings_json = json.dumps(settings, sort_keys=True, default=str)
    texts = trace.generated_text
    reasons = trace.stop_reasons
    batch_time = float(getattr(trace.meta, "wall_time_s", 0.0) or trace.total_time_s)
    seq_rows, step_rows = [], []
    for b, pid in enumerate(ids):
        active = [s for s in trace.steps if s.active[b]]
        chosen = [int(s.chosen[b]) for s in active]
        shown = pieces(trace, chosen)  # the run decoded together: split characters come out whole
        for step, piece in zip(active, shown):
            raw, fin = step.stages[0], step.stages[-1]
            top = raw.top
            reason = step.stop_reasons[b] if b < len(step.stop_reasons) else None
            procs = [{"name": p.name, "newly_masked": int(p.newly_masked[b]),
                      "chosen_rank": int(p.chosen_rank_after[b]), "kl": _f(p.kl[b])} for p in step.processors]
            with np.errstate(invalid="ignore"):
                lp = (top.values[b].astype(np.float64) - float(top.logsumexp[b])).astype(np.float32)
            step_rows.append({
                "prompt_id": pid, "seq": 0, "step": int(step.index), "token_id": int(step.chosen[b]),
                "token_text": piece.display, "decoded": piece.text, "logprob": _f(raw.chosen_logprob[b]), "rank": int(raw.chosen_rank[b]),
                "final_logprob": _f(fin.chosen_logprob[b]), "final_rank": int(fin.chosen_rank[b]),
                "entropy": _f(raw.entropy[b]) if raw.entropy is not None else float("nan"),
                "final_entropy": _f(fin.entropy[b]) if fin.entropy is not None else float("nan"),
                "topk_ids": [int(i) for i in top.ids[b]], "topk_logprobs": [float(v) for v in lp],
                "n_masked": int(fin.n_masked[b]), "processors": procs, "finished": bool(step.finished[b]),
                "stop_reason": None if reason is None else str(reason), "time_s": float(step.time_s),
            })
        seq_rows.append({
            "prompt_id": pid, "seq": 0, "prompt": prompts[b],
            "prompt_text": (trace.prompts or [None] * trace.batch_size)[b],
            "prompt_tokens": int(trace.prompt_mask[b].sum()), "generated_text": texts[b], "token_ids": chosen,
            "num_tokens": len(chosen), "stop_reason": None if reasons[b] is None else str(reasons[b]),
            "engine": engine, "settings": settings_json, "batch_size": trace.batch_size,
            "batch_time_s": batch_time, "time_s": float(sum(s.time_s for s in active)),
            "trace_file": None if trace_files is None else trace_files[b],
            "trace_row": None if trace_files is None else b,
        })
    return seq_rows, step_rows


def steps_table(rows: list[dict[str, Any]]):
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=table_schemas()[0])


def sequences_table(rows: list[dict[str, Any]]):
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=table_schemas()[1])
