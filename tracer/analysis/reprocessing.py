"""Offline what-if of the sampler: a step's recorded raw logits through other processor settings.

``tracer.reprocess(trace, step, top_p=0.5)`` rebuilds transformers' own processor classes from
the run's generation settings updated by the keywords (:mod:`.processors`), runs the recorded
raw logits row of ``step`` through them and returns the stage records — the same
:class:`~tracer.records.Stage` objects a traced run records — with the token the run actually
chose ranked at every stage.  No model is needed.

With ``RecordConfig(full_logits=True)`` the full raw row is used and, with the run's own
settings, the result equals the recorded stages exactly.  Without it only the top-K raw logits
are known: the row is rebuilt with those K entries and ``-inf`` elsewhere, and
:attr:`Reprocessed.note` says so (masked counts and probabilities are then relative to those K
candidates).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..records import Stage, Trace, blob_key
from .processors import build_processors, merge_settings, run_processors, settings_of, stage_records

__all__ = ["Reprocessed", "reprocess"]


@dataclass(frozen=True)
class Reprocessed:
    """The stages one step's raw logits go through under ``settings``."""

    step: int
    settings: dict[str, Any]
    stages: tuple[Stage, ...]  # stage 0: the raw logits, then one per processor
    chosen: np.ndarray  # (B,) the token the run chose at this step
    full_row: bool  # True: the recorded full raw row; False: its top-K only
    token_text: dict[int, str] = field(default_factory=dict, repr=False)

    @property
    def note(self) -> str:
        if self.full_row:
            return ""
        k = self.stages[0].top.ids.shape[1] if self.stages else 0
        return (f"full logits were not recorded (RecordConfig(full_logits=True)); reprocessed from the "
                f"top-{k} raw logits with the rest of the vocabulary at -inf: masked counts and "
                f"probabilities are relative to those {k} candidates")

    def table(self):
        """pandas DataFrame, one row per (sequence, stage): name, settings, masked counts, the
        chosen token's rank and probability, KL to the previous stage, entropy, the best token."""
        import pandas as pd

        rows = []
        for b in range(self.chosen.shape[0]):
            prev_masked = 0
            for i, st in enumerate(self.stages):
                best = int(st.top.ids[b, 0])
                rows.append({
                    "seq": b, "stage": i, "name": st.name, "params": dict(st.params),
                    "n_masked": int(st.n_masked[b]),
                    "newly_masked": (int(st.newly_masked[b]) if st.newly_masked is not None
                                     else max(int(st.n_masked[b]) - prev_masked, 0)),
                    "chosen": int(self.chosen[b]), "chosen_text": self.token_text.get(int(self.chosen[b]), ""),
                    "chosen_rank": int(st.chosen_rank[b]),
                    "chosen_prob": float(np.exp(np.float64(st.chosen_logprob[b]))),
                    "kl": float(st.kl[b]), "entropy": float(st.entropy[b]) if st.entropy is not None else np.nan,
                    "top_id": best, "top_text": self.token_text.get(best, ""),
                    "top_prob": float(st.top.probs[b, 0]),
                })
                prev_masked = int(st.n_masked[b])
        return pd.DataFrame(rows)

    def text(self, seq: int = 0) -> str:
        lines = [f"step {self.step}, sequence {seq}: chosen {self.token_text.get(int(self.chosen[seq]), '')!r}"]
        if self.note:
            lines.append("note: " + self.note)
        for i, st in enumerate(self.stages):
            p = float(np.exp(np.float64(st.chosen_logprob[seq])))
            lines.append(f"{i:>2} {st.name:<34} masked {int(st.n_masked[seq]):>6}  chosen rank "
                         f"{int(st.chosen_rank[seq]):>5} p={p:.4f}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Reprocessed(step={self.step}, stages={[s.name for s in self.stages]}, full_row={self.full_row})"

    def _repr_html_(self) -> str:
        df = self.table()
        shown = df.drop(columns=["params"]).copy()
        return ("<div>" + (f"<p><b>note:</b> {html.escape(self.note)}</p>" if self.note else "")
                + shown.to_html(index=False, escape=True) + "</div>")


def _raw_row(trace: Trace, step: int) -> tuple[torch.Tensor, bool]:
    key = blob_key("logits", step)
    if key in trace.blobs:
        return torch.from_numpy(np.array(trace.blobs.get(key), dtype=np.float32)), True
    top = trace.steps[step].stages[0].top
    vocab = int(trace.meta.vocab_size or (int(top.ids.max()) + 1))
    row = torch.full((top.ids.shape[0], vocab), float("-inf"), dtype=torch.float32)
    row.scatter_(1, torch.from_numpy(top.ids), torch.from_numpy(top.values.astype(np.float32)))
    return row, False


def reprocess(trace: Trace, step: int, *, top_k_recorded: int | None = None, **generation_settings: Any) -> Reprocessed:
    """Run the recorded raw logits of ``step`` through processors built from the run's own
    generation settings updated by ``generation_settings`` (e.g. ``top_p=0.5``,
    ``temperature=1.2``, ``repetition_penalty=1.3``).  A sampling setting turns ``do_sample`` on
    unless ``do_sample`` is given.  ``top_k_recorded`` sets how many candidates each stage keeps
    (default: as many as the trace recorded)."""
    if not 0 <= step < trace.num_steps:
        raise IndexError(f"step {step} out of range: the trace has {trace.num_steps} steps")
    settings = merge_settings(settings_of(trace), generation_settings)
    scores, full = _raw_row(trace, step)
    prompt_len = trace.prompt_len
    input_ids = torch.from_numpy(np.ascontiguousarray(trace.sequences[:, : prompt_len + step]))
    processors = build_processors(settings, prompt_len=prompt_len, prompt_mask=trace.prompt_mask)
    rows = run_processors(processors, input_ids, scores)
    chosen = trace.steps[step].chosen
    k = top_k_recorded or int(trace.steps[step].stages[0].top.ids.shape[1])
    stages = stage_records(rows, torch.from_numpy(chosen.astype(np.int64)), k)
    return Reprocessed(step=step, settings=settings, stages=stages, chosen=chosen.copy(), full_row=full,
                       token_text=dict(trace.token_text))
