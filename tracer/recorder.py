"""The step recorder of one ``generate`` call: turns what the hooks see into records.

``tracer.hooks`` owns the session (installing and removing hooks and wrappers); this module
owns the per-step state: the recording ``LogitsProcessorList`` / ``StoppingCriteriaList``
subclasses, the device-side scratch of the step in flight, and the conversion of finished
steps into :mod:`tracer.records` once generation ends (one host transfer, no per-step sync).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import time
import warnings
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from . import cache_inspector
from ._device import sync, to_host
from .records import (
    AttentionStats,
    LogitLens,
    MemoryBudgetError,
    MemoryStore,
    NotSupportedError,
    Stage,
    StepInputs,
    StepRecord,
    TopK,
    Trace,
    TraceMeta,
    blob_key,
)

if TYPE_CHECKING:
    from .hooks import TraceSession


class TracerWarning(UserWarning):
    """Something was recorded partially (e.g. the memory budget ran out mid-run)."""



# ----------------------------------------------------------------------------------------
# Recording lists (same processors / criteria, same order, same arithmetic)
# ----------------------------------------------------------------------------------------


def _processor_params(processor: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in vars(processor).items():
        if key.startswith("_"):
            continue
        if value is None:
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


def _make_processor_list(base: type) -> type:
    class RecordingLogitsProcessorList(base):  # type: ignore[misc, valid-type]
        """``LogitsProcessorList`` that records the scores after every processor.

        Each processor is applied through the installed ``LogitsProcessorList.__call__`` on a
        one-element list, so argument handling is transformers' own whatever its version."""

        _tracer_generation: "Generation | None" = None

        def __call__(self, input_ids, scores, **kwargs):
            gen = self._tracer_generation
            if gen is not None:
                gen.guard(gen.stage, None, scores)
            for processor in self:
                scores = base.__call__(base([processor]), input_ids, scores, **kwargs)
                if gen is not None:
                    gen.guard(gen.stage, processor, scores)
            return scores

    return RecordingLogitsProcessorList


def _make_criteria_list(base: type) -> type:
    class RecordingStoppingCriteriaList(base):  # type: ignore[misc, valid-type]
        """``StoppingCriteriaList`` that records which criterion stopped which sequence
        (each criterion through the installed ``StoppingCriteriaList.__call__``)."""

        _tracer_generation: "Generation | None" = None

        def __call__(self, input_ids, scores, **kwargs):
            is_done = torch.full((input_ids.shape[0],), False, device=input_ids.device, dtype=torch.bool)
            fired = []
            for criteria in self:
                result = base.__call__(base([criteria]), input_ids, scores, **kwargs)
                fired.append((criteria, result))
                is_done = is_done | result
            gen = self._tracer_generation
            if gen is not None:
                gen.guard(gen.end_step, input_ids, is_done, fired)
            return is_done

    return RecordingStoppingCriteriaList


def _stop_reason(criteria: Any, token_text: str) -> str:
    name = type(criteria).__name__
    if hasattr(criteria, "eos_token_id"):
        return f"eos:{token_text}"
    return {
        "MaxLengthCriteria": "max_length",
        "MaxTimeCriteria": "max_time",
        "StopStringCriteria": "stop_string",
        "ConfidenceCriteria": "confidence",
    }.get(name, name)


_REASON_PRIORITY = ("eos:", "stop_string")


class _Step:
    """Device-side scratch of the step in flight."""

    __slots__ = (
        "index", "t0", "inputs", "cache_len_before", "stages", "logps", "layer_last", "embed_last",
        "norm_last", "readings", "full_logits", "last_scores", "last_version",
    )

    def __init__(self, index: int, t0: float):
        self.index = index
        self.t0 = t0
        self.inputs: dict[str, Any] = {}
        self.cache_len_before = 0
        self.stages: list[tuple[str, dict, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.logps: list[torch.Tensor] = []
        self.layer_last: dict[int, torch.Tensor] = {}
        self.embed_last: torch.Tensor | None = None
        self.norm_last: torch.Tensor | None = None
        self.readings = None
        self.full_logits: torch.Tensor | None = None
        self.last_scores: torch.Tensor | None = None
        self.last_version = -1


class Generation:
    """State of one traced ``generate`` call; produces one :class:`Trace`."""

    def __init__(self, session: "TraceSession", input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None):
        self.session = session
        self.config = session.config
        self.t_start = time.perf_counter()
        self.prompt_ids = input_ids.detach().cpu().numpy().astype(np.int64) if input_ids is not None else None
        if attention_mask is not None and input_ids is not None and attention_mask.shape == input_ids.shape:
            self.prompt_mask = attention_mask.detach().cpu().numpy().astype(np.int64)
        elif self.prompt_ids is not None:
            self.prompt_mask = np.ones_like(self.prompt_ids)
        else:
            self.prompt_mask = None
        self.generation_config: Any = None
        self.processor_params: dict[int, dict[str, Any]] = {}  # id(processor) -> its settings
        self.cur: _Step | None = None
        self.pending: list[dict[str, Any]] = []
        self.readings: list[Any] = []
        self.blobs = MemoryStore()
        self.blob_bytes = 0
        self.budget_exhausted = False
        self.notes: list[str] = []
        self.unfinished: torch.Tensor | None = None
        self.next_cache_len: int | None = None
        self.last_cache: Any = None
        self.reused_len = 0
        self.sampled = False
        self.broken: str | None = None  # why recording stopped early, if it did
        self.own_forward = False  # inside this step's own model forward (not a nested call)
        self.nested = 0  # model calls made while a step is open (e.g. by a guidance processor)

    # -- containment -----------------------------------------------------------------
    def guard(self, fn: Any, *args: Any) -> Any:
        """Run a recording callback; an error in it stops recording, never the generation."""
        if self.broken is not None:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - tracing must not change (or break) the run
            self.fail(exc)
            return None

    def fail(self, exc: BaseException) -> None:
        if self.broken is not None:
            return
        step = self.cur.index if self.cur is not None else len(self.pending)
        self.broken = f"recording stopped at step {step}: {type(exc).__name__}: {exc}"
        self.notes.append(self.broken)
        self.cur = None
        if self.session.attention is not None:
            self.session.attention.reset()
        warnings.warn(self.broken + " (generation itself went on unchanged)", TracerWarning, stacklevel=3)

    # -- configuration ---------------------------------------------------------------
    def on_config(self, generation_config: Any, processors: Sequence[Any], input_len: int,
                  model_kwargs: dict | None = None) -> None:
        from transformers.generation.configuration_utils import GenerationMode

        self.generation_config = generation_config
        mode = generation_config.get_generation_mode()
        if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
            raise NotSupportedError(
                f"tracer records greedy search and multinomial sampling; {mode.value!r} is not supported yet"
            )
        if getattr(generation_config, "prefill_chunk_size", None):
            raise NotSupportedError("tracer does not support chunked prefill (prefill_chunk_size) yet")
        auto_compile = getattr(self.session.model, "_valid_auto_compile_criteria", None)
        if auto_compile is not None and model_kwargs is not None:
            try:
                compiled = bool(auto_compile(model_kwargs, generation_config))
            except Exception:  # noqa: BLE001 - the check itself is transformers-internal
                compiled = False
            if compiled:
                raise NotSupportedError(
                    "generate would torch.compile the decoding step here (a static cache on CUDA); "
                    "hooks cannot record inside a compiled graph. Pass disable_compile=True to "
                    "generate (to the traced and the plain run alike)."
                )
        self.sampled = bool(generation_config.do_sample)
        # read once: processors are the same objects every step (and reading a CUDA tensor
        # parameter would synchronise the device)
        self.processor_params = {id(p): _processor_params(p) for p in processors}
        batch = 1 if self.prompt_ids is None else self.prompt_ids.shape[0]
        batch *= max(int(getattr(generation_config, "num_return_sequences", 1) or 1), 1)
        max_new = max(int(generation_config.max_length) - input_len, 1)
        estimate = self.session.estimate_bytes(batch=batch, prompt_len=input_len, max_new_tokens=max_new,
                                               n_stages=len(processors) + 1,
                                               use_cache=bool(getattr(generation_config, "use_cache", True)))
        total = sum(estimate.values())
        if total > self.config.max_bytes:
            parts = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in estimate.items() if v)
            raise MemoryBudgetError(
                f"recording this generation would take about {total / 2**20:.1f} MiB ({parts}) for "
                f"{max_new} new tokens × batch {batch}, over the budget RecordConfig(max_bytes="
                f"{self.config.max_bytes / 2**20:.1f} MiB). Select fewer attention layers/heads/steps, "
                "set attention_maps=False, lower max_new_tokens, or raise max_bytes."
            )

    # -- per step --------------------------------------------------------------------
    def start_step(self, args: tuple, kwargs: dict) -> None:
        session = self.session
        if self.config.sync_timing:
            sync(session.device)
        step = _Step(len(self.pending), time.perf_counter())
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None:  # use_cache=False: every step feeds the whole sequence again
            step.cache_len_before = 0
        elif self.next_cache_len is None:
            cache_position = kwargs.get("cache_position")
            if cache_position is not None and cache_position.numel():
                step.cache_len_before = int(cache_position[0])
            else:
                step.cache_len_before = cache_inspector.seq_length(cache)
            self.reused_len = step.cache_len_before
        else:
            step.cache_len_before = self.next_cache_len
        q_len = int(input_ids.shape[1]) if input_ids is not None else int(kwargs["inputs_embeds"].shape[1])
        self.next_cache_len = step.cache_len_before + q_len if cache is not None else None
        mask = kwargs.get("attention_mask")
        step.inputs = {
            "input_ids": input_ids.detach() if input_ids is not None else None,
            "position_ids": kwargs.get("position_ids"),
            "mask_shape": tuple(mask.shape) if isinstance(mask, torch.Tensor) else None,
        }
        self.cur = step
        self.own_forward = True
        if session.attention is not None:
            session.attention.begin_step(step.index, step.cache_len_before)

    def after_forward(self, output: Any, kwargs: dict) -> None:
        step = self.cur
        if step is None:
            return
        cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        if cache is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.last_cache = cache
        if self.config.cache:
            step.readings = cache_inspector.read_cache(cache)
        kv_layers = self.session.kv_layers
        if kv_layers and (self.config.kv_steps is None or step.index in self.config.kv_steps):
            layers = cache_inspector.cache_layers(cache) or []
            for i in kv_layers:
                if i < len(layers) and getattr(layers[i], "keys", None) is not None:
                    reading = cache_inspector.read_layer(layers[i])
                    kept = reading.kept if isinstance(reading.kept, int) else min(self.next_cache_len or 0,
                                                                                  reading.allocated)
                    self.put_blob(blob_key("keys", step.index, i), layers[i].keys[..., :kept, :])
                    self.put_blob(blob_key("values", step.index, i), layers[i].values[..., :kept, :])

    def stage(self, processor: Any, scores: torch.Tensor) -> None:
        step = self.cur
        if step is None:
            return
        with torch.no_grad():
            prev = step.stages[-1] if step.stages else None
            same_object = scores is step.last_scores and scores._version == step.last_version
            if prev is not None and (same_object or (
                    scores is not step.last_scores and scores.device.type == "cpu"
                    and torch.equal(scores, step.last_scores))):
                # a processor that changed nothing (e.g. min-length once reached): same stats
                _, _, ids, values, lse, masked, _, entropy = prev
                kl, logp = torch.zeros_like(lse), step.logps[-1]
            else:
                k = min(self.config.top_k, scores.shape[-1])
                values, ids = torch.topk(scores, k, dim=-1)
                s32 = scores.float()
                lse = torch.logsumexp(s32, dim=-1, keepdim=True)
                logp = s32 - lse  # -inf stays -inf
                lse = lse.squeeze(-1)
                masked = torch.isneginf(scores).sum(-1)
                p = logp.exp()
                entropy = torch.special.entr(p).sum(-1)
                if step.logps:  # KL(p || previous); 0·log0 terms are nan and dropped
                    kl = (p * (logp - step.logps[-1])).nansum(-1)
                else:
                    kl = torch.zeros_like(lse)
                    if self.config.full_logits:
                        step.full_logits = to_host(scores.detach().float())
            step.last_scores, step.last_version = scores, scores._version
        name = "logits" if processor is None else type(processor).__name__
        params = {} if processor is None else self.processor_params.get(id(processor), {})
        step.stages.append((name, params, ids, values, lse, masked, kl, entropy))
        step.logps.append(logp)

    def end_step(self, input_ids: torch.Tensor, is_done: torch.Tensor, fired: list) -> None:
        step = self.cur
        if step is None:
            return
        session = self.session
        with torch.no_grad():
            chosen = input_ids[:, -1].detach()
            if self.unfinished is None:
                self.unfinished = torch.ones_like(is_done)
            active = self.unfinished.clone()
            finished = active & is_done
            self.unfinished = active & ~is_done
            ranks = logps = None
            if step.logps:
                stacked = torch.stack(step.logps)  # (n_stages, B, V)
                index = chosen.view(1, -1, 1).expand(stacked.shape[0], -1, 1)
                chosen_lp = stacked.gather(-1, index)
                ranks = (stacked > chosen_lp).sum(-1)
                logps = chosen_lp.squeeze(-1)
            lens = self._logit_lens(step, chosen) if session.lens_layers else None
            norms = self._residual_norms(step)
            for i in session.hidden_layers:
                if i in step.layer_last:
                    self.put_blob(blob_key("hidden", step.index, i), step.layer_last[i].float())
            if step.full_logits is not None:
                self.put_blob(blob_key("logits", step.index), step.full_logits, host=True)
            attn_stats = None
            if session.attention is not None:
                if session.attention.error is not None:
                    raise session.attention.error
                stats, maps = session.attention.collect()
                if stats:
                    layers = sorted(stats)
                    attn_stats = (tuple(layers), *[torch.stack([stats[l][j] for l in layers]) for j in range(3)])
                for layer, probs in maps.items():
                    self.put_blob(blob_key("attention", step.index, layer), probs, host=True)
        if self.config.sync_timing:
            sync(session.device)
        self.pending.append(
            {
                "index": step.index,
                "time_s": time.perf_counter() - step.t0,
                "inputs": step.inputs,
                "cache_len_before": step.cache_len_before,
                "stages": step.stages,
                "ranks": ranks,
                "logps": logps,
                "chosen": chosen,
                "active": active,
                "finished": finished,
                "fired": [(c, r) for c, r in fired],
                "lens": lens,
                "norms": norms,
                "attn_stats": attn_stats,
            }
        )
        self.readings.append(step.readings)
        self.cur = None

    def _residual_norms(self, step: _Step) -> torch.Tensor | None:
        if not self.config.modules:
            return None
        points = [step.embed_last] + [step.layer_last.get(i) for i in range(self.session.num_layers)] + [step.norm_last]
        if any(p is None for p in points):
            return None
        return torch.stack(points).float().norm(dim=-1)  # (P, B)

    def _logit_lens(self, step: _Step, chosen: torch.Tensor):
        session = self.session
        layers = [i for i in session.lens_layers if i in step.layer_last]
        if not layers:
            return None
        states = torch.stack([step.layer_last[i] for i in layers])  # (L, B, D)
        with session.suspended():
            normed = session.final_norm(states) if session.final_norm is not None else states
            logits = session.lm_head(normed).float()
        logp = torch.log_softmax(logits, dim=-1)
        chosen_lp = logp.gather(-1, chosen.view(1, -1, 1).expand(len(layers), -1, 1))
        rank = (logp > chosen_lp).sum(-1)
        return tuple(layers), rank, chosen_lp.squeeze(-1).exp(), logp.argmax(-1)

    def put_blob(self, key: str, tensor: torch.Tensor, *, host: bool = False) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.budget_exhausted or self.blob_bytes + nbytes > self.config.max_bytes:
            if not self.budget_exhausted:
                self.budget_exhausted = True
                msg = (
                    f"memory budget of {self.config.max_bytes / 2**20:.1f} MiB reached at step "
                    f"{self.cur.index if self.cur else '?'}: later attention maps / logits / hidden vectors "
                    "were not recorded (generation itself is unaffected)"
                )
                self.notes.append(msg)
                warnings.warn(msg, TracerWarning, stacklevel=2)
            return
        self.blob_bytes += nbytes
        self.blobs.put(key, tensor if host else to_host(tensor.detach()))

    # -- the end ---------------------------------------------------------------------
    def finish(self, output: Any, error: BaseException | None) -> Trace:
        session = self.session
        if session.attention is not None:
            session.attention.reset()  # drop references to this generation's tensors
        if error is None:
            status = "complete"
        elif isinstance(error, KeyboardInterrupt):
            status = "interrupted"
        else:
            status = "error"
        if self.session.device.type != "cpu":
            sync(self.session.device)
        sequences = getattr(output, "sequences", output) if output is not None else None
        n_steps = len(self.pending)
        if isinstance(sequences, torch.Tensor) and self.prompt_ids is not None:
            # mps defers the stop check by one step and undoes it: keep the steps generate kept
            n_steps = min(n_steps, int(sequences.shape[1]) - int(self.prompt_ids.shape[1]))
        pending = self.pending[:n_steps]
        steps = [self._to_record(p) for p in pending]
        batch = int(steps[0].chosen.shape[0]) if steps else (0 if self.prompt_ids is None else self.prompt_ids.shape[0])
        prompt_ids = self.prompt_ids if self.prompt_ids is not None else np.zeros((batch, 0), np.int64)
        prompt_mask = self.prompt_mask if self.prompt_mask is not None else np.ones_like(prompt_ids)
        if steps and prompt_ids.shape[0] != batch and batch % max(prompt_ids.shape[0], 1) == 0:
            repeat = batch // prompt_ids.shape[0]  # num_return_sequences
            prompt_ids, prompt_mask = np.repeat(prompt_ids, repeat, 0), np.repeat(prompt_mask, repeat, 0)
        if isinstance(sequences, torch.Tensor):
            seqs = sequences.detach().cpu().numpy().astype(np.int64)
        else:
            new = np.stack([s.chosen for s in steps], axis=1) if steps else np.zeros((batch, 0), np.int64)
            seqs = np.concatenate([prompt_ids, new], axis=1)
        cache = None
        if self.config.cache and self.last_cache is not None:
            cache = cache_inspector.build_timeline(
                self.last_cache, self.readings[:n_steps], batch_size=batch, reused_len=self.reused_len
            )
        self._resolve_stop_reasons(steps, pending)
        trace = Trace(
            meta=self._meta(status, error),
            prompts=session.pending_prompts,
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            sequences=seqs,
            steps=steps,
            cache=cache,
            blobs=self.blobs,
            residual_points=("embed", *[f"layer.{i}" for i in range(session.num_layers)], "norm")
            if self.config.modules
            else (),
            attention_layers=tuple(session.attention_layers),
            attention_heads=tuple(session.attention_heads),
            kv_head_of=tuple(h // max(session.num_heads // max(session.num_kv_heads, 1), 1) for h in range(session.num_heads)),
        )
        for key in list(self.blobs.keys()):  # host tensors -> numpy, after the one sync above
            self.blobs.put(key, _np(self.blobs.get(key)))
        self._attach_text(trace)
        return trace

    def _to_record(self, p: dict[str, Any]) -> StepRecord:
        inputs = p["inputs"]
        ids = _np(inputs["input_ids"]).astype(np.int64) if inputs["input_ids"] is not None else np.zeros((0, 0), np.int64)
        q_len = ids.shape[1] if ids.ndim == 2 else 0
        stages = []
        for j, (name, params, top_ids, values, lse, masked, kl, entropy) in enumerate(p["stages"]):
            stages.append(
                Stage(
                    name=name,
                    params=params,
                    top=TopK(ids=_np(top_ids).astype(np.int64), values=_np(values).astype(np.float32),
                             logsumexp=_np(lse).astype(np.float32)),
                    n_masked=_np(masked).astype(np.int64),
                    chosen_rank=_np(p["ranks"][j]).astype(np.int64),
                    chosen_logprob=_np(p["logps"][j]).astype(np.float32),
                    kl=_np(kl).astype(np.float32),
                    entropy=_np(entropy).astype(np.float32),
                )
            )
        lens = None
        if p["lens"] is not None:
            layers, rank, prob, top = p["lens"]
            lens = LogitLens(layers=layers, chosen_rank=_np(rank).astype(np.int64),
                             chosen_prob=_np(prob).astype(np.float32), top_id=_np(top).astype(np.int64))
        stats = None
        if p["attn_stats"] is not None:
            layers, ent, sink, amax = p["attn_stats"]
            stats = AttentionStats(layers=layers, entropy=_np(ent).astype(np.float32),
                                   sink=_np(sink).astype(np.float32), argmax=_np(amax).astype(np.int64))
        pos = inputs["position_ids"]
        return StepRecord(
            index=p["index"],
            inputs=StepInputs(
                input_ids=ids,
                position_ids=_np(pos).astype(np.int64) if isinstance(pos, torch.Tensor) else None,
                cache_position=np.arange(p["cache_len_before"], p["cache_len_before"] + q_len, dtype=np.int64),
                attention_mask_shape=inputs["mask_shape"],
                cache_len_before=int(p["cache_len_before"]),
            ),
            stages=tuple(stages),
            chosen=_np(p["chosen"]).astype(np.int64),
            sampled=self.sampled,
            active=_np(p["active"]).astype(bool),
            finished=_np(p["finished"]).astype(bool),
            stop_reasons=(),  # resolved once token texts are known
            time_s=float(p["time_s"]),
            residual_norms=_np(p["norms"]).astype(np.float32) if p["norms"] is not None else None,
            logit_lens=lens,
            attention_stats=stats,
        )

    def _resolve_stop_reasons(self, steps: list[StepRecord], pending: list[dict]) -> None:
        tok = self.session.tokenizer
        for n, (step, p) in enumerate(zip(steps, pending)):
            fired = [(c, _np(r).astype(bool).reshape(-1)) for c, r in p["fired"]]
            reasons: list[str | None] = []
            for b in range(step.chosen.shape[0]):
                if not step.finished[b]:
                    reasons.append(None)
                    continue
                text = _token_text(tok, int(step.chosen[b]))
                names = [_stop_reason(c, text) for c, r in fired if r.shape[0] > b and r[b]]
                names.sort(key=lambda s: next((i for i, pre in enumerate(_REASON_PRIORITY) if s.startswith(pre)), 9))
                reasons.append(names[0] if names else "stopped")
            steps[n] = dataclasses.replace(step, stop_reasons=tuple(reasons))

    def _meta(self, status: str, error: BaseException | None) -> TraceMeta:
        session = self.session
        model = session.model
        config = model.config
        gc = self.generation_config
        eos = getattr(gc, "eos_token_id", None) if gc is not None else None
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if isinstance(eos, torch.Tensor):
            eos_ids = [int(x) for x in eos.reshape(-1)]
        tok = session.tokenizer
        special = {}
        if tok is not None:
            for name, text in (getattr(tok, "special_tokens_map", {}) or {}).items():
                if isinstance(text, str):
                    special[name] = {"text": text, "id": tok.convert_tokens_to_ids(text)}
        import transformers

        from . import __version__

        return TraceMeta(
            model_name=_model_name(config, model),
            model_class=type(model).__name__,
            model_config=_jsonable(config.to_dict()),
            num_layers=session.num_layers,
            num_heads=session.num_heads,
            num_kv_heads=session.num_kv_heads,
            head_dim=session.head_dim,
            hidden_size=int(getattr(config, "hidden_size", 0) or 0),
            vocab_size=int(getattr(config, "vocab_size", 0) or 0),
            dtype=str(next(model.parameters()).dtype),
            device=str(session.device),
            attn_implementation=session.original_attn,
            generation_config=_jsonable(gc.to_diff_dict()) if gc is not None else {},
            special_tokens=special,
            pad_token_id=_int_or_none(getattr(gc, "pad_token_id", None)) if gc is not None else None,
            terminators={int(i): _token_text(tok, int(i)) for i in eos_ids},
            record_config=self.config.to_dict(),
            versions={"tracer": __version__, "torch": str(torch.__version__), "transformers": str(transformers.__version__)},
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            wall_time_s=time.perf_counter() - self.t_start,
            status=status if self.broken is None or status != "complete" else "error",
            error=(None if error is None else f"{type(error).__name__}: {error}") or self.broken,
            notes=list(self.notes),
        )

    def _attach_text(self, trace: Trace) -> None:
        ids: set[int] = set(np.unique(trace.sequences).tolist())
        for step in trace.steps:
            for stage in step.stages:
                ids.update(np.unique(stage.top.ids).tolist())
            if step.logit_lens is not None:
                ids.update(np.unique(step.logit_lens.top_id).tolist())
        tok = self.session.tokenizer
        ordered = sorted(i for i in ids if i >= 0)
        if tok is not None:
            texts = tok.batch_decode([[i] for i in ordered], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
            trace.token_text = dict(zip(ordered, texts))
            terminators = set(trace.meta.terminators)
            outs = []
            for b in range(trace.batch_size):
                new = [i for i in trace.generated_ids(b).tolist() if i not in terminators]
                outs.append(tok.decode(new, skip_special_tokens=True))
            trace.output_text = outs
            if trace.prompts is None:
                trace.prompts = [tok.decode(trace.prompt_tokens(b).tolist(), skip_special_tokens=False)
                                 for b in range(trace.batch_size)]
        else:
            trace.token_text = {i: f"<{i}>" for i in ordered}


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


def _model_name(config: Any, model: Any) -> str:
    """The model's name: the last part of a local path, or the hub-style id as given."""
    name = str(getattr(config, "_name_or_path", "") or "")
    if not name:
        return type(model).__name__
    parts = [p for p in name.replace("\\", "/").split("/") if p]
    return parts[-1] if name.startswith(("/", ".", "~")) and parts else name


def _int_or_none(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1)[0].item()
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 64 else f"tensor{tuple(value.shape)}"
    return str(value)
