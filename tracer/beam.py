"""Recording a beam search (``num_beams > 1``, with or without sampling).

While a traced ``generate`` runs beam search, the three per-step helpers of transformers'
``_beam_search`` (:data:`tracer._hf_compat.BEAM_METHODS`) are wrapped on the model instance.
Each wrapper calls the original with the very same arguments and returns its result untouched;
it only reads the tensors: the accumulated log-probs of every running beam (each beam's best
candidates), the K continuations kept, the running beams chosen among them, the finished set.
No random numbers are drawn, so the output (sampling included) is identical to untraced.

The selections are re-derived with transformers' own rule and checked against its outputs; a
mismatch (or any recording error) stops recording with a ``TracerWarning`` and never changes
the generation.  Records: :class:`tracer.beam_records.BeamTrace`.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from . import _hf_compat as hf
from .beam_records import BeamStep, BeamTrace
from .generate_modes import end_status, given_and_returned, refuse_step_records, run_patched, token_maps

__all__ = ["BeamRecorder", "generate", "refuse_step_records"]

def _np(t: torch.Tensor, dtype: Any = None) -> np.ndarray:
    out = t.detach().to("cpu").numpy()
    return out.astype(dtype) if dtype is not None else out


class BeamRecorder:
    """Collects :class:`BeamStep` records from the wrapped beam-search helpers."""

    def __init__(self, top_c: int):
        self.top_c = top_c
        self.steps: list[BeamStep] = []
        self.error: str | None = None
        self._cur: dict[str, Any] = {}
        self._running: torch.Tensor | None = None  # (B, N) running scores entering the step
        self._from: torch.Tensor | None = None  # (B, N, 2) origin of each finished slot
        self.config: dict[str, Any] = {}

    # -- wrappers -----------------------------------------------------------------------
    def wrap(self, name: str, original: Any) -> Any:
        handler = getattr(self, f"_after{name}")

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            if self.error is None:
                try:
                    with torch.no_grad():
                        handler(hf.bind(original, args, kwargs), result)
                except Exception as exc:  # noqa: BLE001 - recording never aborts generation
                    self.error = f"{type(exc).__name__}: {exc}"
            return result

        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        return wrapper

    def _after_get_top_k_continuations(self, a: dict, result: tuple) -> None:
        topk_log_probs, topk_sequences, topk_beam_indices = result
        acc = a["accumulated_log_probs"]
        b, n, cur_len = int(a["batch_size"]), int(a["num_beams"]), int(a["cur_len"])
        prompt = int(a["decoder_prompt_len"])
        if self._running is None:  # transformers starts beam 0 at 0 and the others at -1e9
            self._running = torch.zeros(b, n, device=acc.device)
            self._running[:, 1:] = -1e9
            self._from = torch.full((b, n, 2), -1, dtype=torch.long, device=acc.device)
        per_beam = acc.view(b, n, -1)
        top = per_beam.topk(min(self.top_c, per_beam.shape[-1]), dim=-1)
        offset = torch.arange(b, device=acc.device).view(-1, 1) * n
        parent = topk_beam_indices[:, :, cur_len - prompt].long() - offset
        self._cur = {
            "step": len(self.steps), "running_before": _np(self._running, np.float32),
            "beam_top_ids": _np(top.indices, np.int64), "beam_top_scores": _np(top.values, np.float32),
            "cand_ids": _np(topk_sequences[:, :, cur_len], np.int64), "cand_parent": _np(parent, np.int64),
            "cand_scores": _np(topk_log_probs, np.float32),
        }
        self.config.setdefault("do_sample", bool(a["do_sample"]))

    def _after_get_running_beams_for_next_iteration(self, a: dict, result: tuple) -> None:
        _, running_scores, _ = result
        hits = a["next_token_hits_stopping_criteria"]
        masked = a["topk_log_probs"] + hits.to(torch.float32) * -1.0e9
        chosen = torch.topk(masked, k=int(a["num_beams"]))[1]  # transformers' own rule
        if not torch.equal(masked.gather(1, chosen), running_scores):
            raise RuntimeError("re-derived surviving beams differ from transformers' (beam search changed)")
        self._cur.update(cand_stop=_np(hits, bool), survivors=_np(chosen, np.int64))
        self._running = running_scores.clone()

    def _after_update_finished_beams(self, a: dict, result: tuple) -> None:
        _, beam_scores, _, _ = result
        hits, top_mask = a["next_token_hits_stopping_criteria"], a["top_num_beam_mask"]
        cur_len, prompt = int(a["cur_len"]), int(a["decoder_prompt_len"])
        penalty = float(a["length_penalty"])
        did = hits & top_mask[None, :]
        scores = a["topk_log_probs"] / ((cur_len + 1 - prompt) ** penalty)
        full = torch.all(a["is_sent_finished"], dim=-1, keepdim=True) & (a["early_stopping"] is True)
        scores = scores + full.to(torch.float32) * -1.0e9
        scores = scores + (~a["is_early_stop_heuristic_unsatisfied"]).to(torch.float32) * -1.0e9
        scores = scores + (~did) * -1.0e9
        merged = torch.cat((a["beam_scores"], scores), dim=1)
        idx = torch.topk(merged, k=int(a["num_beams"]))[1]
        if not torch.equal(merged.gather(1, idx), beam_scores):
            raise RuntimeError("re-derived finished set differs from transformers' (beam search changed)")
        b, k = scores.shape
        step = self._cur["step"]
        new_from = torch.stack([torch.full((b, k), step, device=idx.device, dtype=torch.long),
                                torch.arange(k, device=idx.device).expand(b, k)], dim=-1)
        merged_from = torch.cat((self._from, new_from), dim=1)
        self._from = merged_from.gather(1, idx[..., None].expand(-1, -1, 2))
        self.config.update(length_penalty=penalty, early_stopping=a["early_stopping"])
        self.steps.append(BeamStep(**self._cur, finished_scores=_np(beam_scores, np.float32),
                                   finished_from=_np(self._from, np.int64)))
        self._cur = {}


def generate(session: Any, original: Any, args: tuple, kwargs: dict) -> Any:
    """Run ``original(*args, **kwargs)`` (a beam search) with the beam helpers wrapped; the
    :class:`BeamTrace` goes to ``session.beam_traces``."""
    refuse_step_records(session.config, "beam search")
    model = session.model
    recorder = BeamRecorder(top_c=max(int(session.config.top_k), 1))
    patches = {name: recorder.wrap(name, getattr(model, name)) for name in hf.BEAM_METHODS}
    return run_patched(session, patches, original, args, kwargs, into=session.beam_traces, what="beam",
                       build=functools.partial(_build, session, recorder, args, kwargs))


def _build(session: Any, rec: BeamRecorder, args: tuple, kwargs: dict, output: Any, status: str) -> BeamTrace:
    status = end_status(rec, bool(rec.steps), output, status, what="beam",
                        nothing="generate ran no beam-search step tracer could see (transformers' beam search changed?)")
    ids, seqs = given_and_returned(args, kwargs, output)
    mask = kwargs.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) else torch.ones_like(ids)
    def setting(name: str, default: Any) -> Any:  # what generate used (transformers' defaults last)
        return rec.config.get(name, hf.generation_setting(session.model, args, kwargs, name, default))

    used = {int(t) for s in rec.steps for t in np.concatenate([s.cand_ids.ravel(), s.beam_top_ids.ravel()])}
    used |= {int(t) for t in seqs.reshape(-1).tolist()}
    return BeamTrace(
        num_beams=int(setting("num_beams", 1)),
        num_return_sequences=int(setting("num_return_sequences", 1)),
        length_penalty=float(setting("length_penalty", 1.0)),
        early_stopping=setting("early_stopping", False),
        do_sample=bool(setting("do_sample", False)),
        prompt_ids=_np(ids, np.int64), prompt_mask=_np(mask, np.int64), sequences=_np(seqs, np.int64),
        steps=rec.steps, **token_maps(session.tokenizer, used), status=status,
    )
