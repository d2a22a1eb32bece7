"""The recording session: ``tracer.trace(model, tokenizer, record=...)``.

Inside the ``with`` block every ``model.generate`` call is recorded step by step:

* a forward pre-hook / hook on the model sees exactly what ``prepare_inputs_for_generation``
  fed the model, and the cache it returned;
* ``generate``'s own ``LogitsProcessorList`` and ``StoppingCriteriaList`` are swapped for
  subclasses that run the very same processors/criteria in the same order while recording each
  one's output (the chosen token is ``input_ids[:, -1]`` when the criteria run);
* optional forward hooks on the embedding, decoder layers and final norm give residual-stream
  summaries, hidden vectors and the logit lens;
* optional attention recording swaps in a function of transformers' ``AttentionInterface`` that
  calls the original kernel and records probabilities on the side (``tracer.attention``).

The session only installs, uninstalls and forwards typed events; the step recorder
(``tracer.recorder``) owns what a step is and what it keeps, from an immutable model plan
(``tracer.plan``).  Every private transformers touch goes through ``tracer._hf_compat``.

Threads: a traced model belongs to the thread that opened the ``with`` block.  A ``generate``
on it from another thread while the block is open is refused with ``NotSupportedError`` (it
would otherwise be mixed into this trace); forwards from other threads are never recorded.

Nothing here draws random numbers or writes into a tensor the model uses, so the generated
tokens are identical with and without tracing.  Small per-step tensors stay on the model's
device until the generation ends and are copied to the host then, so the recorder adds no
device synchronisation per step or per layer.  Every hook, wrapper and the attention
implementation are removed/restored in ``__exit__`` even when generation raised, and the steps
recorded up to an exception or ``KeyboardInterrupt`` stay in ``session.trace``.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Sequence

import torch

from . import _hf_compat as hf
from . import attention as _attention
from .config import RecordConfig
from .errors import MemoryBudgetError, NotSupportedError, TracerError, TracerWarning
from .plan import ModelPlan, build_plan, estimate_bytes
from .records import Trace
from .recorder import StepRecorder

__all__ = [
    "TraceSession",
    "TracerWarning",
    "trace",
    "trace_generate",
    "prepare_generate",
    "encode_prompts",
    "default_terminators",
    "decoder_parts",
]

_MISSING = object()
#: generate's arguments and GenerationConfig fields whose decoding tracer's step recorder does not
#: follow (assisted decoding has its own recorder, tracer.assisted, outside a step trace)
_UNSUPPORTED_ARGUMENTS = ("assistant_model", "custom_generate")
#: assisted-decoding settings refused in every mode (why, after the name)
_REFUSED_SETTINGS = {
    "assistant_early_exit": "self-speculative early exit",
    "assistant_ensemble_weight": "its rounds would be explained by the verifier's own probabilities, not the "
                                 "weighted mix transformers accepts by",
}


def decoder_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, Any, torch.nn.Module | None]:
    """(embedding, decoder layers, final norm) of a decoder-only causal LM, or NotSupportedError."""
    if getattr(model, "config", None) is None or not hasattr(model, "generate"):
        raise NotSupportedError(f"{type(model).__name__} is not a transformers generation model")
    parts = hf.decoder_parts(model)
    return parts.embedding, parts.layers, parts.final_norm


class TraceSession:
    """Context manager returned by :func:`trace`; ``session.trace`` is the last recorded
    generation and ``session.traces`` all of them (one per ``generate`` call)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, *, record: RecordConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = record or RecordConfig()
        self.traces: list[Trace] = []
        self.beam_traces: list[Any] = []  # tracer.beam_records.BeamTrace, one per beam-search generate
        self.assisted_traces: list[Any] = []  # tracer.assisted_records.AssistedTrace, one per assisted generate
        self.pending_prompts: list[str] | None = None  # prompt texts of the next generate (trace_generate)
        self.plan: ModelPlan
        self.plan, self._parts = build_plan(model, self.config)
        self._recorder: StepRecorder | None = None
        self._thread: int | None = None  # the thread that opened the block
        self._handles: list[Any] = []
        self._patched: dict[str, Any] = {}

    # -- public ----------------------------------------------------------------------
    @property
    def trace(self) -> Trace:
        if not self.traces:
            raise TracerError("nothing was traced: call model.generate(...) inside the `with tracer.trace(...)` block")
        return self.traces[-1]

    @property
    def beam(self) -> Any:
        """The last recorded beam search (:class:`tracer.beam_records.BeamTrace`)."""
        if not self.beam_traces:
            raise TracerError("no beam search was traced: call model.generate(..., num_beams=N) inside the block")
        return self.beam_traces[-1]

    @property
    def assisted(self) -> Any:
        """The last recorded assisted/speculative decoding (:class:`tracer.assisted_records.AssistedTrace`)."""
        if not self.assisted_traces:
            raise TracerError("no assisted decoding was traced: call model.generate(..., assistant_model=... or "
                              "prompt_lookup_num_tokens=...) inside the block")
        return self.assisted_traces[-1]

    @property
    def attention(self) -> "_attention.AttentionRecorder | None":
        return self.plan.attention

    def __enter__(self) -> "TraceSession":
        if getattr(self.model, "_tracer_session", None) is not None:
            raise NotSupportedError("this model is already being traced (nested tracer.trace on one model)")
        self._thread = threading.get_ident()
        try:
            self._install()
        except BaseException:
            self._uninstall()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if self._recorder is not None:  # generate raised through a path the wrapper did not see
                self._finish(None, exc if exc is not None else RuntimeError("generation did not finish"))
        finally:
            self._uninstall()
        return False

    def estimate_bytes(self, *, batch: int, prompt_len: int, max_new_tokens: int, n_stages: int,
                       use_cache: bool = True) -> dict[str, int]:
        """Upper bound of what recording ``max_new_tokens`` steps will keep, by kind."""
        return estimate_bytes(self.plan, self.config, batch=batch, prompt_len=prompt_len,
                              max_new_tokens=max_new_tokens, n_stages=n_stages, use_cache=use_cache)

    # -- install / uninstall -----------------------------------------------------------
    def _install(self) -> None:
        model, plan, parts = self.model, self.plan, self._parts
        model._tracer_session = self
        self._patch("generate", self._wrap_generate(model.generate))
        self._patch(hf.LOGITS_PROCESSOR_METHOD, self._wrap_logits_processor(getattr(model, hf.LOGITS_PROCESSOR_METHOD)))
        self._patch(hf.STOPPING_CRITERIA_METHOD, self._wrap_stopping_criteria(getattr(model, hf.STOPPING_CRITERIA_METHOD)))
        self._patch(hf.PREPARE_INPUTS_METHOD, self._wrap_prepare_inputs(getattr(model, hf.PREPARE_INPUTS_METHOD)))
        self._handles.append(model.register_forward_pre_hook(self._on_forward_pre, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._on_forward, with_kwargs=True))
        # residual norms and the logit lens read every layer; hidden vectors only the chosen ones
        every = self.config.modules or plan.hooks_every_layer
        for i in range(plan.num_layers) if every else plan.hidden_layers:
            self._handles.append(parts.layers[i].register_forward_hook(self._layer_hook(i)))
        if self.config.modules:
            self._handles.append(parts.embedding.register_forward_hook(self._point_hook("embed")))
            if parts.final_norm is not None:
                self._handles.append(parts.final_norm.register_forward_hook(self._point_hook("norm")))
        if plan.routing is not None:
            self._handles.extend(plan.routing.install())
        if plan.attention is not None:
            self._patched["__attn__"] = plan.attn_implementation  # before install: undone even if it fails
            _attention.install(model, plan.attention)

    def _uninstall(self) -> None:
        """Remove every hook and restore every attribute; each part is attempted even if an
        earlier one fails, and the first failure is raised at the end."""
        model = self.model
        errors: list[BaseException] = []

        def attempt(fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        for handle in self._handles:
            attempt(handle.remove)
        self._handles.clear()
        attention = self.plan.attention
        if self._patched.pop("__attn__", None) is not None and attention is not None:
            attention.reset()
            attempt(_attention.uninstall, model, attention, self.plan.attn_implementation)
        for name, previous in self._patched.items():
            if previous is _MISSING:
                model.__dict__.pop(name, None)
            else:
                model.__dict__[name] = previous
        self._patched.clear()
        if model.__dict__.get("_tracer_session") is self:
            del model.__dict__["_tracer_session"]
        if errors:
            raise errors[0]

    def _patch(self, name: str, value: Any) -> None:
        self._patched[name] = self.model.__dict__.get(name, _MISSING)
        self.model.__dict__[name] = value

    # -- wrappers ----------------------------------------------------------------------
    def _wrap_generate(self, original: Any) -> Any:
        def generate(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != self._thread:
                raise NotSupportedError(
                    f"model.generate was called from thread {threading.current_thread().name!r} while "
                    "tracer.trace(...) is recording this model in another thread; refused so that it is not "
                    "mixed into that trace. Generate from the thread that opened the block, or after it closes."
                )
            from . import assisted as _assisted

            model = self.model
            if kwargs.get("cache_implementation") == "paged":  # (only the keyword switches: a config's runs the loop)
                raise NotSupportedError("cache_implementation='paged' switches generate to continuous batching "
                                        "(generate_batch), which tracer does not record")
            for key, why in _REFUSED_SETTINGS.items():
                if hf.generation_setting(model, args, kwargs, key) is not None:
                    raise NotSupportedError(f"tracer does not record {key} ({why})")
            beams = hf.beam_search_requested(model, args, kwargs)
            if _assisted.requested(model, args, kwargs):
                if beams:
                    raise NotSupportedError("num_beams > 1 with assistant_model or prompt_lookup_num_tokens: "
                                            "transformers then runs beam search and ignores the assistant; "
                                            "pass one or the other")
                if self._recorder is None:  # recorded by tracer.assisted
                    return _assisted.generate(self, original, args, kwargs)
            for key in _UNSUPPORTED_ARGUMENTS:
                if hf.generate_argument(args, kwargs, key) is not None:
                    raise NotSupportedError(f"tracer does not support {key}= (assisted/custom decoding) here")
            if hf.generation_setting(model, args, kwargs, "prompt_lookup_num_tokens") is not None:
                raise NotSupportedError("tracer does not support prompt_lookup_num_tokens (assisted decoding) here")
            if self._recorder is not None:
                raise NotSupportedError("nested generate calls inside one trace are not supported")
            if beams:  # recorded by tracer.beam (session.beam)
                from . import beam as _beam

                return _beam.generate(self, original, args, kwargs)
            input_ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
            if input_ids is not None and not isinstance(input_ids, torch.Tensor):
                input_ids = None
            self._recorder = StepRecorder(self.plan, self.config, tokenizer=self.tokenizer, input_ids=input_ids,
                                          attention_mask=kwargs.get("attention_mask"), prompts=self.pending_prompts,
                                          gated=True)
            try:
                output = original(*args, **kwargs)
            except BaseException as exc:
                self._finish(None, exc)
                raise
            self._finish(output, None)
            return output

        generate.__wrapped__ = original  # type: ignore[attr-defined]
        return generate

    def _wrap_logits_processor(self, original: Any) -> Any:
        def get_logits_processor(*args: Any, **kwargs: Any) -> Any:
            processors = original(*args, **kwargs)
            rec = self._recorder
            if rec is None or threading.get_ident() != self._thread:
                return processors
            bound = hf.bind(original, args, kwargs)
            rec.configure(bound["generation_config"], processors, int(bound.get("input_ids_seq_length") or 0),
                          bound.get("model_kwargs"))
            return hf.make_processor_list(type(processors), rec.scores)(processors)

        return get_logits_processor

    def _wrap_stopping_criteria(self, original: Any) -> Any:
        def get_stopping_criteria(*args: Any, **kwargs: Any) -> Any:
            criteria = original(*args, **kwargs)
            rec = self._recorder
            if rec is None or threading.get_ident() != self._thread:
                return criteria
            return hf.make_criteria_list(type(criteria), rec.stop_check)(criteria)

        return get_stopping_criteria

    def _wrap_prepare_inputs(self, original: Any) -> Any:
        def prepare_inputs_for_generation(*args: Any, **kwargs: Any) -> Any:
            rec = self._recorder
            if rec is None or threading.get_ident() != self._thread or not hf.called_by_generate():
                return original(*args, **kwargs)  # (not generate's own call: e.g. a streamer's)
            rec.preparing()
            prepared = original(*args, **kwargs)  # (a model call made inside it is not the step's)
            rec.prepared()  # the next forward is generate's own
            return prepared

        # generate reads this method's parameters (inspect.signature follows __wrapped__)
        prepare_inputs_for_generation.__wrapped__ = original  # type: ignore[attr-defined]
        return prepare_inputs_for_generation

    def _finish(self, output: Any, error: BaseException | None) -> None:
        rec, self._recorder = self._recorder, None
        if rec is None:
            return
        refused = isinstance(error, (NotSupportedError, MemoryBudgetError)) or not rec.configured
        try:
            if error is not None and refused and not rec.has_steps:
                return  # refused before generating (by tracer or by generate's own checks): nothing to keep
            self.traces.append(rec.finish(output, error))
        except Exception as exc:  # noqa: BLE001 - never hide generate's result or the user's error
            warnings.warn(f"could not build the trace of this generation: {exc!r}", TracerWarning, stacklevel=3)
        finally:
            self.pending_prompts = None

    # -- hooks: forward events of this thread to the recorder ---------------------------
    def _on_forward_pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        rec = self._recorder
        if rec is not None and threading.get_ident() == self._thread:
            rec.forward_start(args, kwargs)

    def _on_forward(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        rec = self._recorder
        if rec is not None and threading.get_ident() == self._thread:
            rec.forward_end(output, kwargs)

    def _layer_hook(self, index: int) -> Any:
        def hook(module: Any, args: tuple, output: Any) -> None:
            rec = self._recorder
            if rec is not None and rec.live and threading.get_ident() == self._thread:
                rec.layer_output(index, output)

        return hook

    def _point_hook(self, name: str) -> Any:
        def hook(module: Any, args: tuple, output: Any) -> None:
            rec = self._recorder
            if rec is not None and rec.live and threading.get_ident() == self._thread:
                rec.point(name, output)

        return hook


def trace(model: torch.nn.Module, tokenizer: Any = None, *, record: RecordConfig | None = None) -> TraceSession:
    """Record every ``model.generate`` call made inside the ``with`` block.

    >>> with tracer.trace(model, tokenizer) as t:
    ...     out = model.generate(**inputs, max_new_tokens=32)
    >>> t.trace.steps[0].inputs.input_ids.shape   # the whole prompt at step 0
    """
    return TraceSession(model, tokenizer, record=record)


def trace_generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[Any],
    *,
    chat: bool | None = None,
    record: RecordConfig | None = None,
    system: str | None = None,
    **generate_kwargs: Any,
) -> Trace:
    """Tokenize ``prompt`` (text, chat messages, or a list of either), generate, return the Trace
    (a :class:`~tracer.beam_records.BeamTrace` for ``num_beams > 1``, an
    :class:`~tracer.assisted_records.AssistedTrace` for ``assistant_model=`` / ``prompt_lookup_num_tokens=``).

    Inputs and defaults are :func:`prepare_generate`'s, so an untraced run made from the same
    preparation generates exactly the same tokens."""
    texts, encoded, kwargs = prepare_generate(model, tokenizer, prompt, chat=chat, system=system, **generate_kwargs)
    with trace(model, tokenizer, record=record) as session:
        session.pending_prompts = texts
        model.generate(**encoded, **kwargs)
    if session.beam_traces:  # beam search / assisted decoding have their own records
        return session.beam  # type: ignore[no-any-return]
    if session.assisted_traces:
        return session.assisted  # type: ignore[no-any-return]
    return session.trace


def prepare_generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[Any],
    *,
    chat: bool | None = None,
    system: str | None = None,
    **generate_kwargs: Any,
) -> tuple[list[str], dict[str, torch.Tensor], dict[str, Any]]:
    """(prompt texts, left-padded inputs on the model's device, ``generate`` kwargs).

    ``chat`` applies the tokenizer's chat template (default: when the tokenizer has one).
    ``generate_kwargs`` pass through unchanged, except that ``max_new_tokens`` defaults to 64,
    ``pad_token_id`` to the tokenizer's and ``eos_token_id`` to :func:`default_terminators`."""
    texts, encoded = encode_prompts(tokenizer, prompt, chat=chat, system=system)
    device = next(model.parameters()).device
    encoded = {k: v.to(device) for k, v in encoded.items()}
    generate_kwargs.setdefault("max_new_tokens", 64)
    if tokenizer.pad_token_id is not None:
        generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    if "eos_token_id" not in generate_kwargs:
        stops = default_terminators(model, tokenizer)
        if stops:
            generate_kwargs["eos_token_id"] = stops
    return texts, encoded, generate_kwargs


def default_terminators(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """The model's eos ids followed by the tokenizer's terminators (``eos`` and ``<|eot_id|>``)."""
    from .models import terminators

    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    return list(dict.fromkeys([*ids, *terminators(tokenizer)]))


def encode_prompts(
    tokenizer: Any, prompt: str | Sequence[Any], *, chat: bool | None = None, system: str | None = None
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """(prompt texts as given to the tokenizer, left-padded ``input_ids``/``attention_mask``).

    Each prompt becomes the ids :func:`tracer.prompts.build_prompt` gives (the rule every
    engine shares); ``chat`` defaults to whether the tokenizer has a chat template."""
    from .prompts import build_prompts

    if isinstance(prompt, str) or (isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], dict)):
        items: list[Any] = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise ValueError("no prompt given")
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    built = build_prompts(tokenizer, items, chat=chat, system=system)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(b.ids) for b in built)
    ids = [[pad] * (width - len(b.ids)) + list(b.ids) for b in built]  # left padding
    mask = [[0] * (width - len(b.ids)) + [1] * len(b.ids) for b in built]
    return [b.text for b in built], {"input_ids": torch.tensor(ids, dtype=torch.long),
                                     "attention_mask": torch.tensor(mask, dtype=torch.long)}
