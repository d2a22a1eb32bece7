"""Logits processors rebuilt from generation settings, and the stage statistics of score rows.

``generate`` builds its :class:`~transformers.LogitsProcessorList` from a generation config
(``GenerationMixin._get_logits_processor``, a private method that needs a model).  Offline
analysis has only the settings a trace recorded, so :func:`build_processors` constructs the
same public processor classes, with the same arguments, in the same order as transformers 5.x
does for greedy search and multinomial sampling.  :func:`stage_records` computes, from a list of
score rows, exactly the statistics the recorder keeps per stage (same torch operations in the
same order), so a row run through rebuilt processors yields records equal to the recorded ones.

torch and transformers are imported here at module level: only :mod:`.replay` and
:mod:`.reprocess` import this module, and both run processors.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..assemble import stage_params
from ..records import NotSupportedError, Stage, TopK, Trace

__all__ = [
    "SAMPLING_KEYS",
    "PROCESSOR_KEYS",
    "settings_of",
    "merge_settings",
    "build_processors",
    "processor_params",
    "stage_records",
]

#: Settings of the warpers ``generate`` applies only when ``do_sample`` is true, in its order.
SAMPLING_KEYS = ("temperature", "top_h", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")
#: Settings of the processors ``generate`` applies in greedy search and sampling alike.
PROCESSOR_KEYS = (
    "sequence_bias", "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "min_length",
    "min_new_tokens", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "renormalize_logits",
)
_OTHER_KEYS = ("do_sample", "eos_token_id", "pad_token_id", "max_length")
#: Settings whose processors need more than a score row (a model, a callback): not rebuilt.
_UNSUPPORTED = ("guidance_scale", "watermarking_config")


def settings_of(trace: Trace) -> dict[str, Any]:
    """The processor-relevant generation settings a trace recorded (what ``generate`` used)."""
    gc = trace.meta.generation_config or {}
    return {k: gc[k] for k in (*_OTHER_KEYS, *PROCESSOR_KEYS, *SAMPLING_KEYS, *_UNSUPPORTED) if k in gc}


def merge_settings(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``changes``; giving a sampling setting turns ``do_sample`` on unless
    ``changes`` sets ``do_sample`` itself (warpers act only when sampling, as in ``generate``)."""
    unknown = sorted(set(changes) - {*_OTHER_KEYS, *PROCESSOR_KEYS, *SAMPLING_KEYS})
    if unknown:
        raise TypeError(f"unknown generation setting(s) {', '.join(unknown)}; known: "
                        f"{', '.join((*PROCESSOR_KEYS, *SAMPLING_KEYS, 'do_sample'))}")
    out = dict(base)
    out.update(changes)
    if "do_sample" not in changes and any(k in changes for k in SAMPLING_KEYS):
        out["do_sample"] = True
    return out


def _eos(settings: Mapping[str, Any]) -> list[int]:
    eos = settings.get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def build_processors(
    settings: Mapping[str, Any],
    *,
    prompt_len: int,
    prompt_mask: np.ndarray | None = None,
    device: Any = "cpu",
) -> list[Any]:
    """The logits processors ``generate`` would build from ``settings``, in its order.

    ``prompt_len`` is the padded prompt length (``input_ids_seq_length``), ``prompt_mask``
    the `(B, P)` attention mask (the repetition penalty skips left padding)."""
    from transformers import generation as g

    for key in _UNSUPPORTED:
        value = settings.get(key)
        if value is not None and not (key == "guidance_scale" and value == 1):
            raise NotSupportedError(f"{key}={value!r} needs a model inside its processor; it cannot be rebuilt offline")
    s = settings
    eos = torch.tensor(_eos(s), dtype=torch.long, device=device) if _eos(s) else None
    out: list[Any] = []
    if s.get("sequence_bias") is not None:
        out.append(g.SequenceBiasLogitsProcessor(sequence_bias=s["sequence_bias"]))
    if s.get("repetition_penalty") is not None and s["repetition_penalty"] != 1.0:
        pad = None
        if prompt_mask is not None:
            pad = (torch.as_tensor(np.asarray(prompt_mask), device=device) != 0).int().argmax(dim=1)
        try:  # transformers 5.20+: generate passes each row's left padding, as done here
            out.append(g.RepetitionPenaltyLogitsProcessor(s["repetition_penalty"], prompt_ignore_length=pad))
        except ValueError:  # older (5.19): the processor takes an int only and generate passes none
            out.append(g.RepetitionPenaltyLogitsProcessor(float(s["repetition_penalty"])))
    if s.get("no_repeat_ngram_size") is not None and s["no_repeat_ngram_size"] > 0:
        out.append(g.NoRepeatNGramLogitsProcessor(s["no_repeat_ngram_size"]))
    if s.get("bad_words_ids") is not None:
        out.append(g.NoBadWordsLogitsProcessor(s["bad_words_ids"], eos))
    if s.get("min_length") is not None and eos is not None and s["min_length"] > 0:
        out.append(g.MinLengthLogitsProcessor(s["min_length"], eos, device=device))
    if s.get("min_new_tokens") is not None and eos is not None and s["min_new_tokens"] > 0:
        out.append(g.MinNewTokensLengthLogitsProcessor(prompt_len, s["min_new_tokens"], eos, device=device))
    if s.get("forced_bos_token_id") is not None:
        out.append(g.ForcedBOSTokenLogitsProcessor(s["forced_bos_token_id"]))
    if s.get("forced_eos_token_id") is not None:
        out.append(g.ForcedEOSTokenLogitsProcessor(s["max_length"], s["forced_eos_token_id"], device=device))
    if s.get("remove_invalid_values") is True:
        out.append(g.InfNanRemoveLogitsProcessor())
    if s.get("exponential_decay_length_penalty") is not None:
        out.append(g.ExponentialDecayLengthPenalty(s["exponential_decay_length_penalty"], eos, prompt_len))
    if s.get("suppress_tokens") is not None:
        out.append(g.SuppressTokensLogitsProcessor(s["suppress_tokens"], device=device))
    if s.get("begin_suppress_tokens") is not None:
        out.append(g.SuppressTokensAtBeginLogitsProcessor(s["begin_suppress_tokens"], prompt_len, device=device))
    if s.get("do_sample"):
        if s.get("temperature") is not None and s["temperature"] != 1.0:
            out.append(g.TemperatureLogitsWarper(s["temperature"]))
        if s.get("top_h") is not None:
            out.append(g.TopHLogitsWarper(top_h=s["top_h"]))
        if s.get("top_k") is not None and s["top_k"] != 0:
            out.append(g.TopKLogitsWarper(top_k=s["top_k"], min_tokens_to_keep=1))
        if s.get("top_p") is not None and s["top_p"] < 1.0:
            out.append(g.TopPLogitsWarper(top_p=s["top_p"], min_tokens_to_keep=1))
        if s.get("min_p") is not None:
            out.append(g.MinPLogitsWarper(min_p=s["min_p"], min_tokens_to_keep=1))
        if s.get("typical_p") is not None and s["typical_p"] < 1.0:
            out.append(g.TypicalLogitsWarper(mass=s["typical_p"], min_tokens_to_keep=1))
        if s.get("epsilon_cutoff") is not None and 0.0 < s["epsilon_cutoff"] < 1.0:
            out.append(g.EpsilonLogitsWarper(epsilon=s["epsilon_cutoff"], min_tokens_to_keep=1))
        if s.get("eta_cutoff") is not None and 0.0 < s["eta_cutoff"] < 1.0:
            out.append(g.EtaLogitsWarper(epsilon=s["eta_cutoff"], min_tokens_to_keep=1, device=device))
    if s.get("renormalize_logits") is True:
        out.append(g.LogitNormalization())
    return out


def processor_params(processor: Any) -> dict[str, Any]:
    """A processor's public scalar settings, JSON-able (the recorder's own rule)."""
    return stage_params(processor)


def _np(x: torch.Tensor) -> np.ndarray:
    x = x.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    return (x.float() if x.dtype == torch.bfloat16 else x).numpy()


def stage_records(
    rows: Sequence[tuple[str, Mapping[str, Any], torch.Tensor]],
    chosen: torch.Tensor,
    top_k: int,
) -> tuple[Stage, ...]:
    """Stage records of score rows ``[(name, params, scores (B, V)), ...]`` (raw logits first),
    given the chosen token per sequence: the recorder's arithmetic, operation for operation."""
    kept: list[tuple] = []
    logps: list[torch.Tensor] = []
    prev_scores: torch.Tensor | None = None
    with torch.no_grad():
        for name, params, scores in rows:
            if kept and (scores is prev_scores or torch.equal(scores, prev_scores)):
                _, _, ids, values, lse, masked, _, entropy, _ = kept[-1]
                kl, logp = torch.zeros_like(lse), logps[-1]
                added = torch.zeros_like(masked)
            else:
                k = min(top_k, scores.shape[-1])
                values, ids = torch.topk(scores, k, dim=-1)
                s32 = scores.float()
                lse = torch.logsumexp(s32, dim=-1, keepdim=True)
                logp = s32 - lse
                lse = lse.squeeze(-1)
                masked = torch.isneginf(scores).sum(-1)
                p = logp.exp()
                entropy = torch.special.entr(p).sum(-1)
                kl = (p * (logp - logps[-1])).nansum(-1) if logps else torch.zeros_like(lse)
                added = ((torch.isneginf(scores) & ~torch.isneginf(prev_scores)).sum(-1) if prev_scores is not None
                         else torch.zeros_like(masked))
            kept.append((name, dict(params), ids, values, lse, masked, kl, entropy, added))
            logps.append(logp)
            prev_scores = scores
        stacked = torch.stack(logps)
        index = chosen.view(1, -1, 1).expand(stacked.shape[0], -1, 1)
        chosen_lp = stacked.gather(-1, index)
        ranks = (stacked > chosen_lp).sum(-1)
        chosen_lp = chosen_lp.squeeze(-1)
    return tuple(
        Stage(
            name=name,
            params=params,
            top=TopK(ids=_np(ids).astype(np.int64), values=_np(values).astype(np.float32),
                     logsumexp=_np(lse).astype(np.float32)),
            n_masked=_np(masked).astype(np.int64),
            chosen_rank=_np(ranks[j]).astype(np.int64),
            chosen_logprob=_np(chosen_lp[j]).astype(np.float32),
            kl=_np(kl).astype(np.float32),
            entropy=_np(entropy).astype(np.float32),
            newly_masked=_np(added).astype(np.int64),
        )
        for j, (name, params, ids, values, lse, masked, kl, entropy, added) in enumerate(kept)
    )


def run_processors(processors: Sequence[Any], input_ids: torch.Tensor, scores: torch.Tensor
                   ) -> list[tuple[str, dict[str, Any], torch.Tensor]]:
    """``[("logits", {}, scores), (name, params, after processor 1), ...]``: each processor
    applied in turn, as ``LogitsProcessorList`` does."""
    rows: list[tuple[str, dict[str, Any], torch.Tensor]] = [("logits", {}, scores)]
    with torch.no_grad():
        for proc in processors:
            scores = proc(input_ids, scores)
            rows.append((type(proc).__name__, processor_params(proc), scores))
    return rows
