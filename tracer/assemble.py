"""Turn what the step recorder kept (device tensors, typed rows) into one
:class:`~tracer.records.Trace`, built once through :meth:`Trace.from_steps`.

Also the tokenizer-facing pieces of a trace: each token's text and raw bytes, stop reasons.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from . import cache_inspector
from .byte_tokens import token_bytes
from .config import RecordConfig
from .plan import ModelPlan, jsonable
from .records import (
    AttentionStats,
    LogitLens,
    MemoryStore,
    Stage,
    StepInputs,
    StepRecord,
    StopReason,
    TopK,
    Trace,
    TraceMeta,
)

__all__ = [
    "FedInputs", "StageRows", "LensRows", "StatsRows", "FinishedStep", "GenerationFacts", "build_trace",
    "stage_params", "stop_reason_of", "token_bytes", "token_texts",
]


# ----------------------------------------------------------------------------------------
# What the recorder hands over (device tensors)
# ----------------------------------------------------------------------------------------


@dataclass
class FedInputs:
    """What the step's own forward received."""

    names: tuple[str, ...]
    input_ids: torch.Tensor | None
    position_ids: torch.Tensor | None
    mask: torch.Tensor | None  # (B, T) int8 copy of a small 2-D mask
    mask_shape: tuple[int, ...] | None
    mask_padding: torch.Tensor | None  # (B,) zeros per row of a large 2-D mask
    logits_to_keep: int | None
    cache_class: str | None
    q_len: int = 0  # positions fed (the ids', or the embeddings': inputs_embeds)


@dataclass
class StageRows:
    """One score row's summary (host arrays, from :mod:`tracer.stage_stats`)."""

    name: str
    params: dict[str, Any]
    ids: np.ndarray
    values: np.ndarray
    lse: np.ndarray
    masked: np.ndarray
    kl: np.ndarray
    entropy: np.ndarray
    added: np.ndarray  # entries at -inf here and not in the step's previous row (0: the first row)


@dataclass
class LensRows:
    layers: tuple[int, ...]
    rank: torch.Tensor
    prob: torch.Tensor
    top: torch.Tensor


@dataclass
class StatsRows:
    layers: tuple[int, ...]
    entropy: torch.Tensor
    sink: torch.Tensor
    argmax: torch.Tensor


@dataclass
class FinishedStep:
    index: int
    time_s: float
    inputs: FedInputs
    cache_len_before: int
    stages: list[StageRows] | None  # None until the row pool has computed them
    ranks: Sequence[np.ndarray] | None  # per stage (B,)
    logps: Sequence[np.ndarray] | None  # per stage (B,)
    chosen: torch.Tensor
    is_done: torch.Tensor  # (B,) what the stopping criteria returned: active and finished follow at the end
    fired: list[tuple[Any, Any]]  # (criterion, its (B,) result)
    lens: LensRows | None
    norms: torch.Tensor | None
    attn_stats: StatsRows | None


@dataclass
class GenerationFacts:
    prompt_ids: np.ndarray | None
    prompt_mask: np.ndarray | None
    prompts: list[str] | None
    generation_config: Any
    sampled: bool
    reused_len: int
    last_cache: Any
    readings: list[Any]
    notes: list[str]
    broken: str | None
    wall_time_s: float


# ----------------------------------------------------------------------------------------
# Building the trace
# ----------------------------------------------------------------------------------------


def build_trace(plan: ModelPlan, config: RecordConfig, tokenizer: Any, facts: GenerationFacts,
                done: list[FinishedStep], blobs: MemoryStore, output: Any, error: BaseException | None) -> Trace:
    status = "complete" if error is None else "interrupted" if isinstance(error, KeyboardInterrupt) else "error"
    sequences = getattr(output, "sequences", output) if output is not None else None
    n_steps = len(done)
    if isinstance(sequences, torch.Tensor) and facts.prompt_ids is not None:
        # mps defers the stop check by one step and undoes it: keep the steps generate kept
        n_steps = min(n_steps, int(sequences.shape[1]) - int(facts.prompt_ids.shape[1]))
    kept = done[:n_steps]
    host = _HostCopies(kept)  # every tensor the steps hold, in one transfer (or copy) per dtype
    meta = _meta(plan, config, tokenizer, facts, status, error)
    reason_of = _ReasonOf(tokenizer, meta.terminators)
    active, finished = _active_finished([host(d.is_done) for d in kept])
    steps = [_to_record(d, facts.sampled, host, reason_of, a, f) for d, a, f in zip(kept, active, finished)]
    lens_note = _lens_disagrees(steps, plan.num_layers)
    if lens_note:
        meta.notes.append(lens_note)
    batch = int(steps[0].chosen.shape[0]) if steps else (0 if facts.prompt_ids is None else facts.prompt_ids.shape[0])
    prompt_ids = facts.prompt_ids if facts.prompt_ids is not None else np.zeros((batch, 0), np.int64)
    prompt_mask = facts.prompt_mask if facts.prompt_mask is not None else np.ones_like(prompt_ids)
    if steps and prompt_ids.shape[0] != batch and batch % max(prompt_ids.shape[0], 1) == 0:
        repeat = batch // prompt_ids.shape[0]  # num_return_sequences
        prompt_ids, prompt_mask = np.repeat(prompt_ids, repeat, 0), np.repeat(prompt_mask, repeat, 0)
    if isinstance(sequences, torch.Tensor):
        seqs = _np(sequences).astype(np.int64)
    else:
        new = np.stack([s.chosen for s in steps], axis=1) if steps else np.zeros((batch, 0), np.int64)
        seqs = np.concatenate([prompt_ids, new], axis=1)
    cache = None
    if facts.last_cache is not None:
        cache = cache_inspector.build_timeline(facts.last_cache, facts.readings[:n_steps], batch_size=batch,
                                               reused_len=facts.reused_len)
    for key in list(blobs.keys()):  # host tensors -> numpy, after the one sync in finish
        blobs.put(key, _np(blobs.get(key)))
    ordered = _shown_ids(seqs, steps)
    texts = token_texts(tokenizer, ordered)
    output_text = prompts = None
    if tokenizer is not None:
        terms = set(meta.terminators)
        output_text = [tokenizer.decode([i for i in _generated(steps, b) if i not in terms], skip_special_tokens=True)
                       for b in range(batch)]
        if facts.prompts is None:
            prompts = [tokenizer.decode(prompt_ids[b][prompt_mask[b].astype(bool)].tolist(), skip_special_tokens=False)
                       for b in range(prompt_ids.shape[0])]
    return Trace.from_steps(
        meta,
        steps,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        sequences=seqs,
        prompts=facts.prompts if facts.prompts is not None else prompts,
        cache=cache,
        blobs=blobs,
        residual_points=("embed", *[f"layer.{i}" for i in range(plan.num_layers)], "norm") if config.modules else (),
        attention_layers=plan.attention_layers,
        attention_heads=plan.attention_heads,
        kv_head_of=plan.kv_head_of,
        token_text=texts,
        token_bytes=token_bytes(tokenizer, ordered, texts),
        output_text=output_text,
    )


def _lens_disagrees(steps: Sequence[StepRecord], num_layers: int) -> str | None:
    """The logit lens at the last layer is the model's own distribution (final norm, lm_head and
    the family's known logit transform: tracer._hf_compat.lens_head): where step 0 says otherwise,
    a model transforms its output in a way tracer does not reproduce, and the trace says so."""
    if not steps or steps[0].logit_lens is None or not steps[0].stages:
        return None
    lens, raw = steps[0].logit_lens, steps[0].stages[0]
    if not lens.layers or lens.layers[-1] != num_layers - 1:
        return None
    own = np.exp(raw.chosen_logprob.astype(np.float64))
    seen = lens.chosen_prob[-1].astype(np.float64)
    off = np.abs(seen - own) > 1e-3 + 0.02 * own
    if not off.any():
        return None
    b = int(np.argmax(off))
    return (f"the logit lens does not reproduce this model's own output at its last layer (step 0, sequence {b}: "
            f"chosen token p={seen[b]:.4g} through the lens, {own[b]:.4g} from the model's logits): the model "
            "transforms its last hidden state or logits in a way tracer does not know; the lens's probabilities "
            "are not the model's (its ranks hold only if that transform keeps the order)")


def _shown_ids(sequences: np.ndarray, steps: Sequence[StepRecord]) -> list[int]:
    """Every token id the trace shows: sequences, every stage's top-k, the logit lens's best."""
    parts = [sequences.reshape(-1)]
    for step in steps:
        parts += [stage.top.ids.reshape(-1) for stage in step.stages]
        if step.logit_lens is not None:
            parts.append(step.logit_lens.top_id.reshape(-1))
    ids = np.unique(np.concatenate([p.astype(np.int64, copy=False) for p in parts]))
    return ids[ids >= 0].tolist()


def _generated(steps: Sequence[StepRecord], b: int) -> list[int]:
    out = []
    for step in steps:
        if not step.active[b]:
            break
        out.append(int(step.chosen[b]))
    return out


def _active_finished(is_done: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per step ``(n, B)``: which sequences were still generating (``active``: no earlier step
    was done for them) and which finished at that step (``active & is_done``), from what the
    stopping criteria returned each step; generate's own ``unfinished_sequences``, for all steps
    at once instead of two device ops a step."""
    if not is_done:
        return np.zeros((0, 0), bool), np.zeros((0, 0), bool)
    done = np.stack([_stops(x) for x in is_done])
    active = np.ones_like(done)
    np.logical_not(np.logical_or.accumulate(done[:-1], axis=0), out=active[1:])
    return active, active & done


def _stops(x: Any) -> np.ndarray:
    """What a stopping result means to generate, per sequence: generate keeps a sequence while
    ``unfinished & ~is_done`` is 1, so a bool stops it when True and an integer (a criterion may
    return one) only when odd: 2 is truthy, yet ``1 & ~2 == 1`` generates on."""
    a = np.asarray(x).reshape(-1)
    return a if a.dtype == bool else (a.astype(np.int64) & 1).astype(bool)


def _to_record(d: FinishedStep, sampled: bool, host: "_HostCopies", reason_of: "_ReasonOf",
               active: np.ndarray, finished: np.ndarray) -> StepRecord:
    fed = d.inputs
    chosen = host(d.chosen).astype(np.int64)
    ids = (host(fed.input_ids).astype(np.int64) if fed.input_ids is not None
           else np.zeros((chosen.shape[0], 0), np.int64))  # (embeddings fed: no ids)
    q_len = fed.q_len  # positions fed: the ids', or the embeddings' (inputs_embeds)
    own = np.asarray  # the stage statistics are the recorder's own host arrays: not copied again
    stages = tuple(
        Stage(
            name=st.name,
            params=st.params,
            top=TopK(ids=own(st.ids, np.int64), values=own(st.values, np.float32), logsumexp=own(st.lse, np.float32)),
            n_masked=own(st.masked, np.int64),
            chosen_rank=own(d.ranks[j], np.int64),
            chosen_logprob=own(d.logps[j], np.float32),
            kl=own(st.kl, np.float32),
            entropy=own(st.entropy, np.float32),
            newly_masked=own(st.added, np.int64),
        )
        for j, st in enumerate(d.stages)
    )
    lens = None
    if d.lens is not None:
        lens = LogitLens(layers=d.lens.layers, chosen_rank=host(d.lens.rank).astype(np.int64),
                         chosen_prob=host(d.lens.prob).astype(np.float32), top_id=host(d.lens.top).astype(np.int64))
    stats = None
    if d.attn_stats is not None:
        a = d.attn_stats
        stats = AttentionStats(layers=a.layers, entropy=host(a.entropy).astype(np.float32),
                               sink=host(a.sink).astype(np.float32), argmax=host(a.argmax).astype(np.int64))
    mask = host(fed.mask).astype(np.int8) if fed.mask is not None else None
    return StepRecord(
        index=d.index,
        inputs=StepInputs(
            input_ids=ids,
            position_ids=host(fed.position_ids).astype(np.int64) if fed.position_ids is not None else None,
            cache_slots=np.arange(d.cache_len_before, d.cache_len_before + q_len, dtype=np.int64),
            attention_mask_shape=fed.mask_shape,
            cache_len_before=int(d.cache_len_before),
            names=fed.names,
            attention_mask=mask,
            mask_padding=host(fed.mask_padding).astype(np.int64) if fed.mask_padding is not None else None,
            logits_to_keep=fed.logits_to_keep,
            cache_class=fed.cache_class,
        ),
        stages=stages,
        chosen=chosen,
        sampled=sampled,
        active=active,
        finished=finished,
        stop_reasons=reason_of(d.fired, chosen, finished, host) if finished.any() else (None,) * len(chosen),
        time_s=float(d.time_s),
        residual_norms=host(d.norms).astype(np.float32) if d.norms is not None else None,
        logit_lens=lens,
        attention_stats=stats,
    )


def stop_reason_of(criteria: Any, token_id: int, token_text: str) -> StopReason:
    """The :class:`StopReason` a stopping criterion stands for when it fired on ``token_id``."""
    name = type(criteria).__name__
    eos = getattr(criteria, "eos_token_id", None)
    if eos is not None and token_id in _np(eos).reshape(-1).tolist():  # it stops on the token it holds
        return StopReason("eos", token_id, token_text)
    if name == "MaxLengthCriteria":
        return StopReason("max_length")
    if name == "MaxTimeCriteria":
        return StopReason("max_time")
    if name == "StopStringCriteria":
        return StopReason("stop_string")
    return StopReason("criteria", None, "confidence" if name == "ConfidenceCriteria" else name)


class _ReasonOf:
    """A step's stop reasons per sequence (None: not finished at this step), from what each
    stopping criterion returned and the chosen token's text."""

    def __init__(self, tokenizer: Any, terminators: dict[int, str]):
        self.tokenizer, self.terminators = tokenizer, terminators

    def __call__(self, fired: list, chosen: np.ndarray, finished: np.ndarray,
                 host: "_HostCopies") -> tuple[StopReason | None, ...]:
        results = [(c, _stops(host(r))) for c, r in fired]
        reasons: list[StopReason | None] = []
        for b in range(chosen.shape[0]):
            if not finished[b]:
                reasons.append(None)
                continue
            token = int(chosen[b])
            text = self.terminators[token] if token in self.terminators else _token_text(self.tokenizer, token)
            candidates = [stop_reason_of(c, token, text) for c, r in results if r.shape[0] > b and r[b]]
            reasons.append(StopReason.first(candidates) or StopReason("criteria"))
        return tuple(reasons)


def _meta(plan: ModelPlan, config: RecordConfig, tokenizer: Any, facts: GenerationFacts, status: str,
          error: BaseException | None) -> TraceMeta:
    import transformers

    from . import __version__

    gc = facts.generation_config
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if isinstance(eos, torch.Tensor):
        eos_ids = [int(x) for x in eos.reshape(-1)]
    special = {}
    if tokenizer is not None:
        for name, text in (getattr(tokenizer, "special_tokens_map", {}) or {}).items():
            if isinstance(text, str):
                special[name] = {"text": text, "id": tokenizer.convert_tokens_to_ids(text)}
    mf = plan.model_facts
    return TraceMeta(
        model_name=mf.get("model_name", ""),
        model_class=mf.get("model_class", ""),
        model_config=mf.get("model_config", {}),
        num_layers=plan.num_layers,
        num_heads=plan.num_heads,
        num_kv_heads=plan.num_kv_heads,
        head_dim=plan.head_dim,
        hidden_size=plan.hidden_size,
        vocab_size=plan.vocab_size,
        dtype=mf.get("dtype", ""),
        device=str(plan.device),
        attn_implementation=plan.attn_implementation,
        generation_config=jsonable(gc.to_diff_dict()) if gc is not None else {},
        special_tokens=special,
        pad_token_id=_int_or_none(getattr(gc, "pad_token_id", None)) if gc is not None else None,
        terminators={int(i): _token_text(tokenizer, int(i)) for i in eos_ids},
        record_config=config.to_dict(),
        versions={"tracer": __version__, "torch": str(torch.__version__), "transformers": str(transformers.__version__)},
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        wall_time_s=facts.wall_time_s,
        status=status if facts.broken is None or status != "complete" else "error",
        error=(None if error is None else f"{type(error).__name__}: {error}") or facts.broken,
        notes=list(facts.notes),
        backend="transformers",
        backend_info={"transformers": str(transformers.__version__)},
    )


# ----------------------------------------------------------------------------------------
# Tokens: text and raw bytes
# ----------------------------------------------------------------------------------------


def token_texts(tokenizer: Any, ids: Sequence[int]) -> dict[int, str]:
    if tokenizer is None:
        return {i: f"<{i}>" for i in ids}
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return dict(zip(ids, texts))


# ----------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------


def stage_params(processor: Any) -> dict[str, Any]:
    """A processor's scalar settings (JSON-able)."""
    out: dict[str, Any] = {}
    for key, value in vars(processor).items():
        if key.startswith("_") or value is None:
            continue
        if isinstance(value, (bool, int, str)):
            out[key] = value
        elif isinstance(value, float):
            out[key] = value if np.isfinite(value) else str(value)  # -inf: JSON has no infinities
        elif isinstance(value, torch.Tensor) and value.numel() <= 16:
            out[key] = value.detach().cpu().tolist()
        elif isinstance(value, (list, tuple)) and len(value) <= 16 and all(isinstance(v, (int, float, str)) for v in value):
            out[key] = list(value)
    return out


class _HostCopies:
    """``host(x)``: the numpy array of ``x``, like :func:`_np`; the device tensors of the given
    steps are copied to the host together (one transfer per dtype) instead of one by one, which
    on a GPU would be a synchronisation each."""

    include_cpu = False  # tests set it to run the bulk path on CPU tensors too

    def __init__(self, steps: Sequence[FinishedStep]):
        self.arrays: dict[int, np.ndarray] = {}
        groups: dict[tuple, dict[int, torch.Tensor]] = {}
        for d in steps:
            for t in _step_tensors(d):
                if isinstance(t, torch.Tensor) and (t.device.type != "cpu" or self.include_cpu):
                    groups.setdefault((t.device, t.dtype), {})[id(t)] = t
        self.keep = groups  # the ids stay valid while the tensors live
        for tensors in groups.values():
            flat = torch.cat([t.detach().reshape(-1) for t in tensors.values()]).cpu()
            if flat.dtype == torch.bfloat16:
                flat = flat.float()
            start = 0
            for key, t in tensors.items():
                self.arrays[key] = flat[start : start + t.numel()].numpy().reshape(tuple(t.shape))
                start += t.numel()

    def __call__(self, x: Any) -> np.ndarray:
        if type(x) is np.ndarray:  # the recorder's statistics arrive as host arrays
            return x
        got = self.arrays.get(id(x)) if isinstance(x, torch.Tensor) else None
        return got if got is not None else _np(x)


def _step_tensors(d: FinishedStep) -> list[Any]:
    fed = d.inputs
    # (the stage statistics arrive as host arrays: tracer.stage_stats copies them itself)
    out = [fed.input_ids, fed.position_ids, fed.mask, fed.mask_padding, d.chosen, d.is_done, d.norms]
    out += [r for _, r in d.fired]
    if d.lens is not None:
        out += [d.lens.rank, d.lens.prob, d.lens.top]
    if d.attn_stats is not None:
        out += [d.attn_stats.entropy, d.attn_stats.sink, d.attn_stats.argmax]
    return out


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _token_text(tokenizer: Any, token_id: int) -> str:
    if tokenizer is None:
        return f"<{token_id}>"
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _int_or_none(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1)[0].item()
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)
