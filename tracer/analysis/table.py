"""``trace.table()``: the steps of a trace as a pandas DataFrame (one row per sequence × step)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..records import Trace
from ..text import piece_of, token_pieces

__all__ = ["trace_table"]


def trace_table(trace: Trace):
    """One row per (sequence, step) while the sequence was generating: the chosen token and its
    text, its log-prob and rank under the raw logits (stage 0) and under the final distribution,
    the raw and final best token, entropies, masked count, stop reason and step time."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for b in range(trace.batch_size):
        active = [s for s in trace.steps if s.active[b]]
        shown = token_pieces(trace, [int(s.chosen[b]) for s in active])  # multibyte-safe, in context
        for step, text in zip(active, shown):
            raw, fin = step.stages[0], step.stages[-1]
            tok = int(step.chosen[b])
            reason = step.stop_reasons[b] if b < len(step.stop_reasons) else None
            rows.append({
                "seq": b, "step": step.index, "kind": step.kind, "token": tok, "text": text,
                "logprob": float(raw.chosen_logprob[b]), "rank": int(raw.chosen_rank[b]),
                "final_logprob": float(fin.chosen_logprob[b]), "final_rank": int(fin.chosen_rank[b]),
                "top_token": int(raw.top.ids[b, 0]), "top_text": piece_of(trace, int(raw.top.ids[b, 0])).display,
                "top_prob": float(raw.top.probs[b, 0]),
                "entropy": float(raw.entropy[b]) if raw.entropy is not None else np.nan,
                "final_entropy": float(fin.entropy[b]) if fin.entropy is not None else np.nan,
                "n_masked": int(fin.n_masked[b]), "sampled": bool(step.sampled),
                "finished": bool(step.finished[b]), "stop_reason": None if reason is None else str(reason),
                "time_s": float(step.time_s),
            })
    return pd.DataFrame(rows)
