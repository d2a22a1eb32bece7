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

Nothing here draws random numbers or writes into a tensor the model uses, so the generated
tokens are identical with and without tracing.  Small per-step tensors stay on the model's
device until the generation ends and are copied to the host then, so the recorder adds no
device synchronisation per step or per layer.  Every hook, wrapper and the attention
implementation are removed/restored in ``__exit__`` even when generation raised, and the steps
recorded up to an exception or ``KeyboardInterrupt`` stay in ``session.trace``.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

from . import attention as _attention
from .config import RecordConfig, resolve
from .records import MemoryBudgetError, NotSupportedError, Trace, TracerError
from .recorder import (
    Generation,
    TracerWarning,
    _make_criteria_list,
    _make_processor_list,
    _Step,
)

__all__ = [
    "TraceSession",
    "TracerWarning",
    "trace",
    "trace_generate",
    "prepare_generate",
    "encode_prompts",
    "default_terminators",
]


# ----------------------------------------------------------------------------------------
# Model structure
# ----------------------------------------------------------------------------------------


def decoder_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, Any, torch.nn.Module | None]:
    """(embedding, decoder layers, final norm) of a decoder-only causal LM, or NotSupportedError."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate"):
        raise NotSupportedError(f"{type(model).__name__} is not a transformers generation model")
    if getattr(config, "is_encoder_decoder", False):
        raise NotSupportedError(f"{type(model).__name__} is an encoder-decoder model; tracer traces decoder-only LMs")
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if base is None or layers is None or len(layers) == 0:
        raise NotSupportedError(
            f"{type(model).__name__} has no decoder layers at model.get_decoder().layers; tracer cannot hook it"
        )
    return base.get_input_embeddings(), layers, getattr(base, "norm", None)


def _attention_module(layer: torch.nn.Module) -> torch.nn.Module | None:
    return getattr(layer, "self_attn", None) or getattr(layer, "attention", None)


def _head_counts(config: Any) -> tuple[int, int, int]:
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or (config.hidden_size // max(heads, 1)))
    return heads, kv, head_dim


# ----------------------------------------------------------------------------------------
# The session (context manager)
# ----------------------------------------------------------------------------------------


class TraceSession:
    """Context manager returned by :func:`trace`; ``session.trace`` is the last recorded
    generation and ``session.traces`` all of them (one per ``generate`` call)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, *, record: RecordConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = record or RecordConfig()
        self.traces: list[Trace] = []
        self.pending_prompts: list[str] | None = None
        self.embedding, self.layers, self.final_norm = decoder_parts(model)
        self.lm_head = model.get_output_embeddings()
        self.num_layers = len(self.layers)
        self.num_heads, self.num_kv_heads, self.head_dim = _head_counts(model.config)
        self.device = next(model.parameters()).device
        self.original_attn = str(model.config._attn_implementation)
        cfg = self.config
        self.hidden_layers = resolve(cfg.hidden_layers, self.num_layers, "layer")
        self.lens_layers = list(range(self.num_layers)) if cfg.logit_lens else []
        self.kv_layers = resolve(cfg.kv_layers, self.num_layers, "layer")
        self.attention_layers = resolve(cfg.attention_layers, self.num_layers, "layer") if cfg.attention else []
        self.attention_heads = resolve(cfg.attention_heads, self.num_heads, "head") if cfg.attention else []
        self.attention: _attention.AttentionRecorder | None = None
        self._gen: Generation | None = None
        self._handles: list[Any] = []
        self._patched: dict[str, Any] = {}
        self._suspend = 0
        self._active = False

    # -- public ----------------------------------------------------------------------
    @property
    def trace(self) -> Trace:
        if not self.traces:
            raise TracerError("nothing was traced: call model.generate(...) inside the `with tracer.trace(...)` block")
        return self.traces[-1]

    def __enter__(self) -> "TraceSession":
        if getattr(self.model, "_tracer_session", None) is not None:
            raise NotSupportedError("this model is already being traced (nested tracer.trace on one model)")
        try:
            self._install()
        except BaseException:
            self._uninstall()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if self._gen is not None:  # generate raised through a path the wrapper did not see
                self._finish(None, exc if exc is not None else RuntimeError("generation did not finish"))
        finally:
            self._uninstall()
        return False

    def estimate_bytes(self, *, batch: int, prompt_len: int, max_new_tokens: int, n_stages: int,
                       use_cache: bool = True) -> dict[str, int]:
        """Upper bound of what recording ``max_new_tokens`` steps will keep, by kind."""
        cfg = self.config
        steps = range(max_new_tokens)
        out = {"steps": max_new_tokens * batch * (n_stages * (cfg.top_k * 12 + 32) + 256)}
        if cfg.attention and cfg.attention_maps:
            item = 2 if cfg.attention_dtype == "float16" else 4
            picked = [s for s in steps if cfg.attention_steps is None or s in cfg.attention_steps]
            if use_cache:  # the prompt matrix, then one new row per step
                cells = sum(prompt_len * prompt_len if s == 0 else prompt_len + s for s in picked)
            else:  # every step re-feeds the whole sequence
                cells = sum((prompt_len + s) ** 2 for s in picked)
            out["attention"] = cells * batch * len(self.attention_heads) * len(self.attention_layers) * item
        if cfg.full_logits:
            out["full_logits"] = max_new_tokens * batch * int(self.model.config.vocab_size) * 4
        hidden = int(getattr(self.model.config, "hidden_size", 0) or 0)
        out["hidden"] = max_new_tokens * batch * hidden * 4 * len(self.hidden_layers)
        if self.kv_layers:
            picked = [s for s in steps if cfg.kv_steps is None or s in cfg.kv_steps]
            per_pos = 2 * batch * self.num_kv_heads * self.head_dim * 4 * len(self.kv_layers)
            out["kv_snapshots"] = sum((prompt_len + s) * per_pos for s in picked)
        return out

    # -- install / uninstall -----------------------------------------------------------
    def _install(self) -> None:
        model = self.model
        model._tracer_session = self
        self._patch("generate", self._wrap_generate(model.generate))
        self._patch("_get_logits_processor", self._wrap_logits_processor(model._get_logits_processor))
        self._patch("_get_stopping_criteria", self._wrap_stopping_criteria(model._get_stopping_criteria))
        self._handles.append(model.register_forward_pre_hook(self._on_forward_pre, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._on_forward, with_kwargs=True))
        # residual norms and the logit lens read every layer; hidden vectors only the chosen ones
        every = self.config.modules or bool(self.lens_layers)
        for i in range(self.num_layers) if every else self.hidden_layers:
            self._handles.append(self.layers[i].register_forward_hook(self._layer_hook(i)))
        if self.config.modules:
            self._handles.append(self.embedding.register_forward_hook(self._point_hook("embed_last")))
            if self.final_norm is not None:
                self._handles.append(self.final_norm.register_forward_hook(self._point_hook("norm_last")))
        if self.config.attention:
            modules = {}
            for i in self.attention_layers:
                module = _attention_module(self.layers[i])
                if module is None:
                    raise NotSupportedError(f"decoder layer {i} has no self_attn module to record")
                modules[i] = module
            self.attention = _attention.AttentionRecorder(
                modules,
                heads=self.attention_heads,
                num_heads=self.num_heads,
                store_maps=self.config.attention_maps,
                dtype=getattr(torch, self.config.attention_dtype),
                steps=set(self.config.attention_steps) if self.config.attention_steps is not None else None,
            )
            self._patched["__attn__"] = self.original_attn  # before install: undone even if it fails
            _attention.install(model, self.attention)

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
        if self._patched.pop("__attn__", None) is not None and self.attention is not None:
            self.attention.reset()
            attempt(_attention.uninstall, model, self.attention, self.original_attn)
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
            for key in ("assistant_model", "prompt_lookup_num_tokens", "custom_generate", "assistant_early_exit"):
                if kwargs.get(key) is not None:
                    raise NotSupportedError(f"tracer does not support {key}= (assisted/custom decoding) yet")
            if self._gen is not None:
                raise NotSupportedError("nested generate calls inside one trace are not supported")
            input_ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
            if input_ids is not None and not isinstance(input_ids, torch.Tensor):
                input_ids = None
            self._gen = Generation(self, input_ids, kwargs.get("attention_mask"))
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
            gen = self._gen
            if gen is None:
                return processors
            generation_config = kwargs.get("generation_config", args[0] if args else None)
            input_len = kwargs.get("input_ids_seq_length", args[1] if len(args) > 1 else 0) or 0
            gen.on_config(generation_config, processors, int(input_len), kwargs.get("model_kwargs"))
            wrapped = _make_processor_list(type(processors))(processors)
            wrapped._tracer_generation = gen
            return wrapped

        return get_logits_processor

    def _wrap_stopping_criteria(self, original: Any) -> Any:
        def get_stopping_criteria(*args: Any, **kwargs: Any) -> Any:
            criteria = original(*args, **kwargs)
            if self._gen is None:
                return criteria
            wrapped = _make_criteria_list(type(criteria))(criteria)
            wrapped._tracer_generation = self._gen
            return wrapped

        return get_stopping_criteria

    def _finish(self, output: Any, error: BaseException | None) -> None:
        gen, self._gen = self._gen, None
        if gen is None:
            return
        refused = isinstance(error, (NotSupportedError, MemoryBudgetError)) or gen.generation_config is None
        if error is not None and refused and not gen.pending:
            return  # refused before generating (by tracer or by generate's own checks): nothing to keep
        try:
            self.traces.append(gen.finish(output, error))
        except Exception as exc:  # noqa: BLE001 - never hide generate's result or the user's error
            warnings.warn(f"could not build the trace of this generation: {exc!r}", TracerWarning, stacklevel=3)
        finally:
            self.pending_prompts = None

    # -- hooks -------------------------------------------------------------------------
    def suspended(self) -> "_Suspend":
        return _Suspend(self)

    def _live_step(self) -> _Step | None:
        """The step whose own forward is running (None during nested model calls)."""
        gen = self._gen
        if gen is None or self._suspend or not gen.own_forward or gen.nested:
            return None
        return gen.cur

    def _on_forward_pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        gen = self._gen
        if gen is None or self._suspend or gen.generation_config is None or gen.broken is not None:
            return
        if gen.cur is None:
            gen.guard(gen.start_step, args, kwargs)
        else:  # a model call made while the step is open (e.g. by a guidance processor)
            gen.nested += 1

    def _on_forward(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        gen = self._gen
        if gen is None or self._suspend or gen.broken is not None:
            return
        if gen.nested:
            gen.nested -= 1
            return
        if gen.own_forward:
            gen.own_forward = False
            if self.attention is not None:
                self.attention.enabled = False  # later forwards in this step are not the step's
            gen.guard(gen.after_forward, output, kwargs)

    def _layer_hook(self, index: int) -> Any:
        def hook(module: Any, args: tuple, output: Any) -> None:
            step = self._live_step()
            if step is not None:
                hidden = output[0] if isinstance(output, tuple) else output
                step.layer_last[index] = hidden[:, -1].detach().clone()

        return hook

    def _point_hook(self, slot: str) -> Any:
        def hook(module: Any, args: tuple, output: Any) -> None:
            step = self._live_step()
            if step is not None:
                hidden = output[0] if isinstance(output, tuple) else output
                setattr(step, slot, hidden[:, -1].detach().clone())

        return hook


class _Suspend:
    def __init__(self, session: TraceSession):
        self.session = session

    def __enter__(self) -> None:
        self.session._suspend += 1

    def __exit__(self, *exc: Any) -> None:
        self.session._suspend -= 1


_MISSING = object()


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
    """Tokenize ``prompt`` (text, chat messages, or a list of either), generate, return the Trace.

    Inputs and defaults are :func:`prepare_generate`'s, so an untraced run made from the same
    preparation generates exactly the same tokens."""
    texts, encoded, kwargs = prepare_generate(model, tokenizer, prompt, chat=chat, system=system, **generate_kwargs)
    with trace(model, tokenizer, record=record) as session:
        session.pending_prompts = texts
        model.generate(**encoded, **kwargs)
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
    """(prompt texts as given to the tokenizer, left-padded ``input_ids``/``attention_mask``)."""
    if isinstance(prompt, str) or (isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], dict)):
        items: list[Any] = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise ValueError("no prompt given")
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    texts = []
    for item in items:
        if isinstance(item, str) and not chat:
            texts.append(item)
            continue
        messages = [{"role": "user", "content": item}] if isinstance(item, str) else list(item)
        if system is not None and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": system}, *messages]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    finally:  # leave the user's tokenizer as it was
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None
    return texts, {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


