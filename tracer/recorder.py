"""The step recorder of one ``generate`` call: owns the whole per-step state machine.

The session (``tracer.session``) installs hooks and forwards typed events here; this module
decides what they mean: which forward is the step's own (not a nested call made by a
processor), when hooks are suspended (the logit lens runs the final norm itself), when the
attention recorder is enabled and collected, and what each step keeps.  It reads an immutable
:class:`~tracer.plan.ModelPlan` and never the session, so it can be driven by events without a
model (``tests/test_recorder_events.py``).

Events, in the order ``generate`` produces them per step::

    configure(generation_config, processors, input_len, model_kwargs)   # once, may refuse
    preparing() → prepared()   # generate prepares its inputs: the next forward is its own (gated)
    forward_start(args, kwargs) → layer_output(i, hidden)… / point("embed"|"norm", hidden)
    → forward_end(output, kwargs) → scores(None, logits) → scores(processor, scores)…
    → stop_check(input_ids, is_done, fired)

Small tensors stay on the device until :meth:`StepRecorder.finish` (one host transfer, no
per-step synchronisation).  A step only copies its score rows into a pool; their statistics
(top-k, log-sum-exp, entropy, KL, chosen rank and log-prob) are computed for many steps at once
(:mod:`tracer.stage_stats`).  A failure inside recording stops recording, never generation.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from . import _hf_compat as hf
from . import cache_inspector
from ._device import sync, to_host
from .assemble import FedInputs, FinishedStep, GenerationFacts, LensRows, StatsRows, build_trace, stage_params
from .config import RecordConfig
from .errors import MemoryBudgetError, NotSupportedError, TracerWarning
from .plan import ModelPlan, estimate_bytes
from .records import MemoryStore, Trace, blob_key
from .stage_stats import RowPool, Waiting

__all__ = ["StepRecorder", "CHOSEN_PACK", "MASK_KEEP_MAX", "TracerWarning"]

#: Steps whose chosen tokens are packed together (dropping each step's whole sequence).
CHOSEN_PACK = 64

#: The 2-D attention mask as fed is kept per step when it has at most this many entries; a
#: larger one keeps its shape and per-row padding only.
MASK_KEEP_MAX = 1 << 16


@dataclass
class _StepScratch:
    """Device-side state of the step in flight."""

    index: int
    t0: float
    inputs: FedInputs
    cache_len_before: int
    stages: list[tuple[str, dict]] = field(default_factory=list)  # (name, params) per stage
    first_row: int = 0  # the step's distinct score rows are pool rows first_row .. first_row + n_rows - 1
    n_rows: int = 0
    row_of: list[int] = field(default_factory=list)  # per stage: its row among the step's distinct rows
    layer_last: dict[int, torch.Tensor] = field(default_factory=dict)
    points: dict[str, torch.Tensor] = field(default_factory=dict)  # "embed", "norm"
    readings: Any = None
    full_logits: torch.Tensor | None = None
    last_scores: torch.Tensor | None = None
    last_version: int | None = None


class StepRecorder:
    """State of one traced ``generate`` call; produces one :class:`~tracer.records.Trace`."""

    def __init__(self, plan: ModelPlan, config: RecordConfig, *, tokenizer: Any = None,
                 input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 prompts: Sequence[str] | None = None, gated: bool = False):
        self.plan = plan
        self.config = config
        self.tokenizer = tokenizer
        self.prompts = list(prompts) if prompts is not None else None
        self.t_start = time.perf_counter()
        self.prompt_ids = input_ids.detach().cpu().numpy().astype(np.int64) if input_ids is not None else None
        if attention_mask is not None and input_ids is not None and attention_mask.shape == input_ids.shape:
            self.prompt_mask = attention_mask.detach().cpu().numpy().astype(np.int64)
        else:
            self.prompt_mask = None if self.prompt_ids is None else np.ones_like(self.prompt_ids)
        self.generation_config: Any = None
        # id(processor) -> (stage name, its settings); id(None): the raw logits
        self.stage_meta: dict[int, tuple[str, dict[str, Any]]] = {id(None): ("logits", {})}
        self.n_stages = 1
        self.sampled = False
        self.cur: _StepScratch | None = None
        self.done: list[FinishedStep] = []
        self.packed = 0  # steps before this one hold their chosen tokens packed (_pack_chosen)
        self.pool = RowPool(config.top_k, self.n_stages)  # rows waiting for statistics (remade in configure)
        self.readings: list[Any] = []
        self.cache_reader = cache_inspector.CacheReader()
        self.blobs = MemoryStore()
        self.blob_bytes = 0
        self.budget_exhausted = False
        self.notes: list[str] = []
        self.next_cache_len: int | None = None
        self.last_cache: Any = None
        self.reused_len = 0
        self.broken: str | None = None  # why recording stopped early, if it did
        self.own_forward = False  # inside this step's own model forward (not a nested call)
        self.nested = 0  # model calls made while a step is open (e.g. by a guidance processor)
        self.suspended = 0  # > 0 while the recorder runs model parts itself (logit lens)
        # gated: once generate is seen preparing its inputs (`prepared`), a step opens only at a
        # forward it prepared; a model call between steps (a streamer's, say) is then not taken for
        # the next step's forward.  Never seen (code that swapped the model's
        # prepare_inputs_for_generation for one calling the original it kept, as PEFT's generate
        # does): every forward with no step open opens one, as ungated
        self.gated = gated
        self.armed = False
        self.seen_prepared = False
        self.outside = 0  # model calls between steps, not recorded
        # a step's end does more than light's bookkeeping (model parts, device values, blobs)
        self.heavy = bool(plan.lens_layers or config.modules or plan.hidden_layers or config.full_logits
                          or plan.attention is not None or plan.routing is not None)

    # -- state -----------------------------------------------------------------------
    @property
    def configured(self) -> bool:
        return self.generation_config is not None

    @property
    def live(self) -> bool:
        """True while the step's own forward runs: layer/point events belong to the step."""
        return self.own_forward and not self.nested and not self.suspended and self.cur is not None

    @property
    def has_steps(self) -> bool:
        return bool(self.done)

    # -- containment -----------------------------------------------------------------
    def _guard(self, fn: Any, *args: Any) -> None:
        """Run a recording step; an error in it stops recording, never the generation."""
        if self.broken is not None:
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - tracing must not change (or break) the run
            self.fail(exc)

    def fail(self, exc: BaseException, step: int | None = None) -> None:
        if self.broken is not None:
            return
        if step is None:
            step = self.cur.index if self.cur is not None else len(self.done)
        self.broken = f"recording stopped at step {step}: {type(exc).__name__}: {exc}"
        self.notes.append(self.broken)
        self.cur = None
        self.own_forward = False
        if self.plan.attention is not None:
            self.plan.attention.reset()
        if self.plan.routing is not None:
            self.plan.routing.reset()
        warnings.warn(self.broken + " (generation itself went on unchanged)", TracerWarning, stacklevel=4)

    # -- configuration (may refuse: raised into generate before any forward) -----------
    def configure(self, generation_config: Any, processors: Sequence[Any], input_len: int,
                  model_kwargs: dict | None = None) -> None:
        mode = hf.generation_mode_supported(generation_config)
        if mode is not None:
            raise NotSupportedError(f"tracer records greedy search and multinomial sampling; {mode!r} is not supported yet")
        if getattr(generation_config, "prefill_chunk_size", None):
            raise NotSupportedError("tracer does not support chunked prefill (prefill_chunk_size) yet")
        if self.plan.auto_compiles(model_kwargs, generation_config):
            raise NotSupportedError(
                "generate would torch.compile the decoding step here (a static cache on CUDA); "
                "hooks cannot record inside a compiled graph. Pass disable_compile=True to "
                "generate (to the traced and the plain run alike)."
            )
        if self.plan.kv_layers and not getattr(generation_config, "use_cache", True):
            raise NotSupportedError("RecordConfig(kv_layers=...) snapshots the KV cache, and this generate runs with "
                                    "use_cache=False (no cache); trace without kv_layers, or with the cache")
        # each stage's (name, settings), read once and shared by every step: processors are the
        # same objects every step (and reading a CUDA tensor parameter would synchronise the device)
        self.stage_meta.update({id(p): (type(p).__name__, stage_params(p)) for p in processors})
        self.n_stages = len(processors) + 1  # score rows per step: the logits, then each processor
        self.pool = RowPool(self.config.top_k, self.n_stages)
        batch = 1 if self.prompt_ids is None else self.prompt_ids.shape[0]
        batch *= max(int(getattr(generation_config, "num_return_sequences", 1) or 1), 1)
        max_new = max(int(generation_config.max_length) - input_len, 1)
        estimate = estimate_bytes(self.plan, self.config, batch=batch, prompt_len=input_len, max_new_tokens=max_new,
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
        self.sampled = bool(generation_config.do_sample)
        self.generation_config = generation_config

    # -- events ------------------------------------------------------------------------
    def preparing(self) -> None:
        if self.cur is None:  # (a processor preparing inputs inside a step arms nothing)
            self.seen_prepared = True

    def prepared(self) -> None:
        if self.cur is None:
            self.armed = True

    def forward_start(self, args: tuple, kwargs: dict) -> None:
        if not self.configured or self.broken is not None or self.suspended:
            return
        if self.cur is None and (self.armed or not (self.gated and self.seen_prepared)):
            self.armed = False
            self._guard(self._start_step, args, kwargs)
        else:  # a model call made while the step is open (e.g. by a guidance processor) or between
            self.nested += 1  # steps (a streamer's): not the step's own forward
            if self.cur is None:
                self.outside += 1

    def forward_end(self, output: Any, kwargs: dict) -> None:
        if self.broken is not None or self.suspended:
            return
        if self.nested:
            self.nested -= 1
            return
        if self.own_forward:
            self.own_forward = False
            if self.plan.attention is not None:
                self.plan.attention.enabled = False  # later forwards in this step are not the step's
            if self.plan.routing is not None:
                self.plan.routing.enabled = False
            self._guard(self._after_forward, output, kwargs)

    def layer_output(self, index: int, output: Any) -> None:
        if self.live:
            hidden = output[0] if isinstance(output, tuple) else output
            self.cur.layer_last[index] = hidden.detach().select(1, -1).clone()  # (B, D), last position

    def point(self, name: str, output: Any) -> None:
        if self.live:
            hidden = output[0] if isinstance(output, tuple) else output
            self.cur.points[name] = hidden.detach().select(1, -1).clone()

    def scores(self, processor: Any, scores: torch.Tensor) -> None:
        if self.cur is not None and self.broken is None:
            self._guard(self._stage, processor, scores)

    def stop_check(self, input_ids: torch.Tensor, is_done: torch.Tensor, fired: list) -> None:
        if self.cur is not None and self.broken is None:
            self._guard(self._end_step, input_ids, is_done, fired)

    # -- per step --------------------------------------------------------------------
    def _start_step(self, args: tuple, kwargs: dict) -> None:
        if self.config.sync_timing:
            sync(self.plan.device)
        t0 = time.perf_counter()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None:  # use_cache=False: every step feeds the whole sequence again
            cache_len_before = 0
        elif self.next_cache_len is None:
            cache_position = kwargs.get("cache_position")
            if isinstance(cache_position, torch.Tensor) and cache_position.numel():
                cache_len_before = int(cache_position[0])
            else:
                cache_len_before = cache_inspector.seq_length(cache)
            self.reused_len = cache_len_before
        else:
            cache_len_before = self.next_cache_len
        q_len = int(input_ids.shape[1]) if input_ids is not None else int(kwargs["inputs_embeds"].shape[1])
        self.next_cache_len = cache_len_before + q_len if cache is not None else None
        self.nested = 0  # a model call that raised (caught) has no forward end: not counted on
        self.cur = _StepScratch(len(self.done), t0, _fed_inputs(args, kwargs, input_ids, cache, q_len), cache_len_before)
        self.own_forward = True
        if self.plan.attention is not None:
            self.plan.attention.begin_step(self.cur.index, cache_len_before)
        if self.plan.routing is not None:
            self.plan.routing.begin_step(self.cur.index)

    def _after_forward(self, output: Any, kwargs: dict) -> None:
        step = self.cur
        if step is None:
            return
        cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        if cache is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.last_cache = cache
        if self.config.cache:
            step.readings = self.cache_reader.read(cache)
        kv_layers = self.plan.kv_layers
        if kv_layers and (self.config.kv_steps is None or step.index in self.config.kv_steps):
            layers = cache_inspector.cache_layers(cache) or []
            for i in kv_layers:
                if i < len(layers) and getattr(layers[i], "keys", None) is not None:
                    reading = cache_inspector.read_layer(layers[i])
                    kept = reading.kept if isinstance(reading.kept, int) else min(self.next_cache_len or 0,
                                                                                  reading.allocated)
                    self._put_blob(blob_key("keys", step.index, i), layers[i].keys[..., :kept, :])
                    self._put_blob(blob_key("values", step.index, i), layers[i].values[..., :kept, :])

    def _stage(self, processor: Any, scores: torch.Tensor) -> None:
        """Keep a copy of the stage's scores row in the pool (a later processor may write in
        place); its statistics are computed later, with other steps' (:mod:`tracer.stage_stats`)."""
        step = self.cur
        last = step.last_scores
        try:
            version = scores._version
        except RuntimeError:  # an inference tensor (torch.inference_mode) has no version counter
            version = None
        # a processor that changed nothing.  On a CPU: equal values to the previous stage's row as
        # recorded (not to that tensor: the processor may have written it in place and returned a
        # copy, or written it through `.data` or numpy, which leaves its version counter as it was).
        # On an accelerator (a comparison would wait for the device): the same tensor, its version
        # counter unmoved
        if step.n_rows and ((torch.equal(scores, self.pool.rows[step.first_row + step.row_of[-1]])
                             if scores.is_cpu else
                             (scores is last and version is not None and version == step.last_version))):
            step.row_of.append(step.row_of[-1])
        else:
            row = self.pool.keep(scores.detach() if scores.requires_grad else scores)
            if not step.n_rows:
                step.first_row = row
                if self.config.full_logits:
                    step.full_logits = to_host(scores.detach().float())
            step.row_of.append(step.n_rows)
            step.n_rows += 1
        step.last_scores, step.last_version = scores, version
        meta = self.stage_meta.get(id(processor))
        step.stages.append(meta if meta is not None else (type(processor).__name__, {}))

    def _end_step(self, input_ids: torch.Tensor, is_done: torch.Tensor, fired: list) -> None:
        step = self.cur
        plan = self.plan
        chosen = input_ids.select(1, -1)
        lens = norms = attn_stats = None
        if self.heavy:  # anything beyond light: model parts run here, device values kept
            with torch.no_grad():
                lens = self._logit_lens(step, chosen) if plan.lens_layers else None
                norms = self._residual_norms(step)
                for i in plan.hidden_layers:
                    if i in step.layer_last:
                        self._put_blob(blob_key("hidden", step.index, i), step.layer_last[i].float())
                if step.full_logits is not None:
                    self._put_blob(blob_key("logits", step.index), step.full_logits, host=True)
                if plan.attention is not None:
                    if plan.attention.error is not None:
                        raise plan.attention.error
                    stats, maps = plan.attention.collect()
                    if stats is not None:
                        attn_stats = StatsRows(*stats)
                    for layer, probs in maps.items():
                        self._put_blob(blob_key("attention", step.index, layer), probs, host=True)
                if plan.routing is not None:
                    for layer, (experts, weights) in plan.routing.collect(int(chosen.shape[0])).items():
                        self._put_blob(blob_key("router_experts", step.index, layer), experts, host=True)
                        self._put_blob(blob_key("router_weights", step.index, layer), weights, host=True)
        if self.config.sync_timing:
            sync(plan.device)
        done = FinishedStep(
            index=step.index,
            time_s=time.perf_counter() - step.t0,
            inputs=step.inputs,
            cache_len_before=step.cache_len_before,
            stages=None if step.n_rows else [],  # from the pool rows, with other steps' (RowPool.flush)
            ranks=None,
            logps=None,
            chosen=chosen,
            is_done=is_done,  # a new tensor every step (the criteria list's own): never written in place
            fired=list(fired),
            lens=lens,
            norms=norms,
            attn_stats=attn_stats,
        )
        self.done.append(done)
        self.readings.append(step.readings)
        self.cur = None
        if step.n_rows:  # the pool keeps what the statistics need, not the step's tensors
            try:
                self.pool.add(Waiting(done, step.first_row, step.n_rows, step.stages, step.row_of))
            except Exception as exc:  # noqa: BLE001 - reported at the first step it lost
                self.fail(exc, step=self.pool.lost_from)
        if self.broken is None and len(self.done) - self.packed >= CHOSEN_PACK:
            self._pack_chosen()  # last: if it fails, this step is whole and recording stops at the next

    def _pack_chosen(self) -> None:
        """Each step's ``chosen`` is a view of that step's whole sequence (``input_ids[:, -1]``):
        kept as is, every step would hold its own sequence alive, memory growing with the square
        of the length.  Every :data:`CHOSEN_PACK` steps their values go into one small tensor
        (one op, no synchronisation) and the views are dropped."""
        steps = self.done[self.packed:]
        packed = torch.stack([d.chosen for d in steps])  # (n, B)
        for i, d in enumerate(steps):
            d.chosen = packed[i]
        self.packed = len(self.done)

    def _residual_norms(self, step: _StepScratch) -> torch.Tensor | None:
        if not self.config.modules:
            return None
        points = [step.points.get("embed")] + [step.layer_last.get(i) for i in range(self.plan.num_layers)] + [
            step.points.get("norm")]
        if any(p is None for p in points):
            return None
        return torch.stack(points).float().norm(dim=-1)  # (P, B)

    def _logit_lens(self, step: _StepScratch, chosen: torch.Tensor):
        plan = self.plan
        layers = [i for i in plan.lens_layers if i in step.layer_last]
        if not layers:
            return None
        states = torch.stack([step.layer_last[i] for i in layers])  # (L, B, D)
        self.suspended += 1  # the final norm's own hook must not record this call
        try:
            normed = plan.final_norm(states) if plan.final_norm is not None else states
            logits = plan.head(normed).float()
        finally:
            self.suspended -= 1
        logp = torch.log_softmax(logits, dim=-1)
        chosen_lp = logp.gather(-1, chosen.view(1, -1, 1).expand(len(layers), -1, 1))
        rank = (logp > chosen_lp).sum(-1)
        return LensRows(tuple(layers), rank, chosen_lp.squeeze(-1).exp(), logp.argmax(-1))

    def _put_blob(self, key: str, tensor: torch.Tensor, *, host: bool = False) -> None:
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
    def _check_cache(self) -> None:
        note = self.cache_reader.check(self.last_cache, self.readings[-1])
        if note is not None:
            self.notes.append(note)
            warnings.warn(note, TracerWarning, stacklevel=4)

    def finish(self, output: Any, error: BaseException | None) -> Trace:
        if self.plan.attention is not None:
            self.plan.attention.reset()  # drop references to this generation's tensors
        if self.plan.routing is not None:
            self.plan.routing.reset()
        self.cur, self.own_forward, self.nested = None, False, 0
        if self.plan.device.type != "cpu":
            sync(self.plan.device)
        if self.outside:
            self.notes.append(f"{self.outside} model call(s) between or after generate's steps (not generate's own "
                              "forward, e.g. made by a streamer) were not recorded")
        if error is None and self.config.cache and self.last_cache is not None and self.readings:
            self._guard(self._check_cache)  # once: the readings derived per step hold at the end
        failure: BaseException | None = None
        if self.pool.waiting:  # also after recording stopped: the steps before it keep their rows
            try:
                self.pool.flush()
            except BaseException as exc:  # noqa: BLE001 - the steps whose statistics exist are kept
                failure = exc  # (a second Ctrl-C here too: the generation's own stands)
            try:
                if self.plan.device.type != "cpu":
                    sync(self.plan.device)  # the statistics' host copies have landed
                self.pool.records()  # every group computed, those before a failure too
            except BaseException as exc:  # noqa: BLE001
                failure = failure or exc
            if failure is not None:
                self.pool = RowPool(self.config.top_k, self.n_stages)
        # a step whose statistics could not be computed is not kept, nor any after it
        cut = next((i for i, d in enumerate(self.done) if d.stages is None), None)
        if failure is not None:
            msg = (f"recording stopped at step {self.done[cut].index if cut is not None else len(self.done)}: "
                   f"{type(failure).__name__}: {failure}")
            self.broken = self.broken or msg
            self.notes.append(msg)
            warnings.warn(msg + " (generation itself went on unchanged)", TracerWarning, stacklevel=3)
        if cut is not None:
            self.done = self.done[:cut]
        facts = GenerationFacts(
            prompt_ids=self.prompt_ids,
            prompt_mask=self.prompt_mask,
            prompts=self.prompts,
            generation_config=self.generation_config,
            sampled=self.sampled,
            reused_len=self.reused_len,
            last_cache=self.last_cache if self.config.cache else None,
            readings=self.readings,
            notes=list(self.notes),
            broken=self.broken,
            wall_time_s=time.perf_counter() - self.t_start,
        )
        return build_trace(self.plan, self.config, self.tokenizer, facts, self.done, self.blobs, output, error)


def _fed_inputs(args: tuple, kwargs: dict, input_ids: torch.Tensor | None, cache: Any, q_len: int = 0) -> FedInputs:
    """What forward received.  ``position_ids`` and the mask are copied: they are small and
    generate may build the next step's from them."""
    pos = kwargs.get("position_ids")
    mask = kwargs.get("attention_mask")
    small = mask2d = pad = None
    if isinstance(mask, torch.Tensor):
        if mask.dim() == 2:
            mask2d = mask
            if mask.numel() <= MASK_KEEP_MAX:
                small = mask.detach().to(torch.int8, copy=True)
            else:
                pad = (mask.detach() == 0).sum(-1)
    keep = kwargs.get("logits_to_keep")
    names = (("input_ids",) if args else ()) + tuple(k for k, v in kwargs.items() if v is not None)
    return FedInputs(
        names=names,
        input_ids=input_ids.detach() if input_ids is not None else None,
        position_ids=pos.detach().clone() if isinstance(pos, torch.Tensor) else None,
        mask=small,
        mask_shape=tuple(mask.shape) if isinstance(mask, torch.Tensor) else None,
        mask_padding=pad if mask2d is not None else None,
        logits_to_keep=int(keep) if isinstance(keep, int) and not isinstance(keep, bool) else None,
        cache_class=type(cache).__name__ if cache is not None else None,
        q_len=q_len,
    )
