"""Recording assisted / speculative decoding (``assistant_model=``, ``prompt_lookup_num_tokens=``).

transformers' ``_assisted_decoding`` asks a candidate generator for drafted tokens, verifies them
with one forward of the model, appends the accepted prefix plus the verifier's own next token,
then calls ``candidate_generator.update_candidate_strategy(input_ids, scores, num_matches)`` with
the verifier's processed scores at every drafted position.  ``GenerationMixin._get_candidate_generator``
is wrapped on the instance (:data:`tracer._hf_compat.CANDIDATE_GENERATOR_METHOD`) and, on the
generator it returns, ``get_candidates`` and ``update_candidate_strategy``: each wrapper calls the
original with the same arguments and returns its result untouched, so the output (sampling
included: no random numbers are drawn) is identical to untraced.

The draft model's own steps: trace the assistant in its own ``tracer.trace(assistant)`` block
(nested ``with``); each drafting round is then one trace of that session.  Batch 1 only
(transformers' own limit); different assistant tokenizers (universal assisted decoding),
``assistant_early_exit``, ``assistant_ensemble_weight`` and an assistant with ``num_beams > 1``
(transformers ignores the assistant then) are refused.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from . import _hf_compat as hf
from .assisted_records import AssistedTrace, DraftRound
from .errors import NotSupportedError
from .generate_modes import end_status, given_and_returned, refuse_step_records, run_patched, token_maps

__all__ = ["AssistedRecorder", "generate", "requested"]


def requested(model: Any, args: tuple, kwargs: dict) -> bool:
    """Whether ``model.generate(*args, **kwargs)`` runs assisted decoding (a draft model or prompt
    lookup, by keyword, by position or through a generation config)."""
    return (hf.generate_argument(args, kwargs, "assistant_model") is not None
            or hf.generation_setting(model, args, kwargs, "prompt_lookup_num_tokens") is not None)


class AssistedRecorder:
    def __init__(self, top_c: int):
        self.top_c = top_c
        self.rounds: list[DraftRound] = []
        self.error: str | None = None
        self._pending: dict[str, Any] | None = None
        self.do_sample = False

    def _guard(self, fn: Any, *args: Any) -> None:
        if self.error is None:
            try:
                with torch.no_grad():
                    fn(*args)
            except Exception as exc:  # noqa: BLE001 - recording never aborts generation
                self.error = f"{type(exc).__name__}: {exc}"

    def wrap_factory(self, original: Any) -> Any:
        def get_candidate_generator(*args: Any, **kwargs: Any) -> Any:
            generator = original(*args, **kwargs)
            self.do_sample = bool(hf.bind(original, args, kwargs)["generation_config"].do_sample)
            get, update = generator.get_candidates, generator.update_candidate_strategy

            def get_candidates(input_ids: torch.Tensor, *a: Any, **kw: Any) -> Any:
                result = get(input_ids, *a, **kw)
                self._guard(self._drafted, input_ids, result)
                return result

            def update_candidate_strategy(input_ids: torch.Tensor, scores: torch.Tensor, num_matches: Any) -> Any:
                self._guard(self._verified, input_ids, scores)
                return update(input_ids, scores, num_matches)

            generator.get_candidates = get_candidates  # this generator lives for this generate call only
            generator.update_candidate_strategy = update_candidate_strategy
            return generator

        get_candidate_generator.__wrapped__ = original  # type: ignore[attr-defined]
        return get_candidate_generator

    def _drafted(self, input_ids: torch.Tensor, result: tuple) -> None:
        candidate_ids, candidate_logits = result
        cur_len = int(input_ids.shape[1])
        drafted = candidate_ids[0, cur_len:].to("cpu")
        draft_p = None
        if candidate_logits is not None and drafted.numel():
            q = candidate_logits[0].float().softmax(-1).to("cpu")
            draft_p = q[torch.arange(drafted.numel()), drafted].numpy().astype(np.float32)
        self._pending = {"cur_len": cur_len, "drafted": drafted.numpy().astype(np.int64), "draft_p": draft_p}

    def _verified(self, input_ids: torch.Tensor, scores: torch.Tensor) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("verification without drafted tokens (assisted decoding changed)")
        cur_len, drafted = pending["cur_len"], pending["drafted"]
        n = drafted.shape[0]
        appended = input_ids[0, cur_len:].to("cpu").numpy().astype(np.int64)
        probs = scores[0, : n + 1].float().softmax(-1).to("cpu")  # (L + 1, V) processed verifier scores
        top = probs.topk(min(self.top_c, probs.shape[-1]), dim=-1)
        d = torch.as_tensor(drafted)
        p_d = probs[torch.arange(n), d] if n else torch.zeros(0)
        rank = (probs[:n] > p_d[:, None]).sum(-1) if n else torch.zeros(0, dtype=torch.long)
        accepted = 0
        while accepted < min(n, len(appended)) and appended[accepted] == drafted[accepted]:
            accepted += 1
        self.rounds.append(DraftRound(
            step=len(self.rounds), cur_len=cur_len, drafted=drafted, appended=appended, accepted=accepted,
            verifier_top_ids=top.indices.numpy().astype(np.int64), verifier_top_probs=top.values.numpy(),
            verifier_p_drafted=p_d.numpy().astype(np.float32), verifier_rank_drafted=rank.numpy().astype(np.int64),
            draft_p_drafted=pending["draft_p"],
            reason=self._reason(drafted, appended, accepted, probs, pending["draft_p"]),
        ))

    def _reason(self, drafted: np.ndarray, appended: np.ndarray, accepted: int, probs: torch.Tensor,
                draft_p: np.ndarray | None) -> str:
        n = drafted.shape[0]
        if n == 0:
            return "nothing drafted: one ordinary step"
        if accepted == n:
            return "all drafted tokens accepted" + ("" if len(appended) > n else " (the run stopped there)")
        if len(appended) <= accepted:
            return f"the run stopped (eos or max_length) after {accepted} accepted"
        j, got = accepted, int(appended[accepted])
        want = int(drafted[j])
        p_want, p_got = float(probs[j, want]), float(probs[j, got])
        if not self.do_sample:
            return (f"position {j}: the verifier's arg-max is {got} (p={p_got:.4f}), drafted {want} has "
                    f"p={p_want:.4f} (rank {int((probs[j] > probs[j, want]).sum())})")
        if draft_p is not None:
            ratio = p_want / max(float(draft_p[j]), 1e-30)
            return (f"position {j}: speculative sampling kept drafted {want} with probability min(1, p/q) = "
                    f"min(1, {p_want:.4f}/{float(draft_p[j]):.4f}) = {min(1.0, ratio):.4f}; it was rejected and "
                    f"{got} drawn from max(p - q, 0)")
        return f"position {j}: the verifier sampled {got} (p={p_got:.4f}) instead of drafted {want} (p={p_want:.4f})"


def generate(session: Any, original: Any, args: tuple, kwargs: dict) -> Any:
    """Run an assisted ``generate`` with the candidate generator wrapped; the
    :class:`AssistedTrace` goes to ``session.assisted_traces``."""
    model = session.model
    if kwargs.get("assistant_tokenizer") is not None:
        raise NotSupportedError("tracer does not record assistant_tokenizer= (assisted decoding across tokenizers)")
    refuse_step_records(session.config, "assisted decoding")
    if hf.generate_argument(args, kwargs, "assistant_model") is model:
        raise NotSupportedError("assistant_model is the traced model itself; pass a separate draft model "
                                "(or prompt_lookup_num_tokens=) to trace assisted decoding")
    recorder = AssistedRecorder(top_c=max(int(session.config.top_k), 1))
    name = hf.CANDIDATE_GENERATOR_METHOD
    return run_patched(session, {name: recorder.wrap_factory(getattr(model, name))}, original, args, kwargs,
                       into=session.assisted_traces, what="assisted-decoding",
                       build=functools.partial(_build, session, recorder, args, kwargs))


def _build(session: Any, rec: AssistedRecorder, args: tuple, kwargs: dict, output: Any, status: str) -> AssistedTrace:
    status = end_status(rec, bool(rec.rounds), output, status, what="assisted-decoding",
                        nothing="generate ran no draft/verify round tracer could see (transformers' assisted decoding changed?)")
    ids, seqs = given_and_returned(args, kwargs, output)
    assistant = hf.generate_argument(args, kwargs, "assistant_model")
    source = f"assistant_model:{type(assistant).__name__}" if assistant is not None else "prompt_lookup"
    used = {int(t) for r in rec.rounds for t in np.concatenate([r.drafted, r.appended, r.verifier_top_ids.ravel()])}
    used |= {int(t) for t in seqs.reshape(-1).tolist()}
    return AssistedTrace(source=source, do_sample=rec.do_sample, prompt_ids=ids.to("cpu").numpy().astype(np.int64),
                         sequences=seqs.to("cpu").numpy().astype(np.int64), rounds=rec.rounds, **token_maps(session.tokenizer, used),
                         status=status)
