"""Every private (or unstable) transformers touch of the tracer, in one place.

Each function here names the transformers internal it relies on; arguments of the private
methods we wrap are bound through :func:`inspect.signature`, never picked by position.
``tests/test_hf_compat.py`` has one test per touch that fails loudly, naming the installed
transformers version, when an upgrade moves or renames it.

Touches:

* ``GenerationMixin._get_logits_processor`` / ``_get_stopping_criteria`` (wrapped on the
  instance while tracing: the lists ``generate`` builds are swapped for recording subclasses);
* ``GenerationMixin._valid_auto_compile_criteria`` (would generate compile the decoding step?);
* ``GenerationConfig.get_generation_mode`` + ``GenerationMode`` (greedy / sample only);
* ``GenerationMixin._get_top_k_continuations`` / ``_get_running_beams_for_next_iteration`` /
  ``_update_finished_beams`` (wrapped on the instance while tracing a beam search, read only:
  :data:`BEAM_METHODS`, ``tracer.beam``);
* ``GenerationMixin._get_candidate_generator`` and the returned generator's ``get_candidates`` /
  ``update_candidate_strategy`` (assisted decoding, read only: ``tracer.assisted``);
* ``PretrainedConfig._attn_implementation`` (the active attention implementation's name);
* ``AttentionInterface`` / ``masking_utils.AttentionMaskInterface`` /
  ``ALL_MASK_ATTENTION_FUNCTIONS`` (registering the recording attention function);
* ``<modeling module>.eager_attention_forward`` (the eager kernel of a model family);
* ``model.get_decoder()`` and its ``layers``/``h``/``blocks``, final norm and
  ``get_input_embeddings()`` (model structure: the one rule that decides whether a model is
  supported); ``<modeling module>.ALL_ATTENTION_FUNCTIONS`` (does the family route attention
  through the interface);
* the mixture-of-experts router of a decoder layer (``mlp.gate`` / ``block_sparse_moe.gate`` /
  ``mlp.router``: a ``*TopKRouter`` returning ``(router_logits, router_scores, router_indices)``).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import NotSupportedError

__all__ = [
    "LOGITS_PROCESSOR_METHOD",
    "PREPARE_INPUTS_METHOD",
    "GENERATE_PACKAGE",
    "called_by_generate",
    "STOPPING_CRITERIA_METHOD",
    "BEAM_METHODS",
    "CANDIDATE_GENERATOR_METHOD",
    "DecoderParts",
    "beam_search_requested",
    "generate_argument",
    "generation_setting",
    "GENERATE_POSITIONAL",
    "attention_module",
    "lens_head",
    "auto_compiles",
    "attn_implementation",
    "bind",
    "decoder_parts",
    "eager_attention_function",
    "generation_mode_supported",
    "head_counts",
    "make_criteria_list",
    "make_processor_list",
    "mask_function",
    "registered_attention_function",
    "routes_attention_interface",
    "non_softmax_layers",
    "router_modules",
    "router_output",
    "register_attention",
    "transformers_version",
]

LOGITS_PROCESSOR_METHOD = "_get_logits_processor"
STOPPING_CRITERIA_METHOD = "_get_stopping_criteria"
#: generate calls this right before each of its own model forwards (prefill and every decoding
#: step): the marker that tells generate's forward from a model call made between its steps
#: (e.g. by a streamer).  A public method; what tracer relies on is that ordering.
PREPARE_INPUTS_METHOD = "prepare_inputs_for_generation"
#: ... and calls it from its own decoding loop, code of the transformers package: a call of that
#: method from elsewhere (a streamer's or other user code preparing inputs for a side call of the
#: model) is no marker.
GENERATE_PACKAGE = "transformers."


def called_by_generate() -> bool:
    """Inside a wrapper of PREPARE_INPUTS_METHOD: whether the wrapper's caller is transformers' code
    (generate's loop), not a streamer's or other user code."""
    try:
        caller = sys._getframe(2)
    except ValueError:  # (no caller frame: called from C at the stack's bottom)
        return False
    return caller.f_globals.get("__name__", "").startswith(GENERATE_PACKAGE)
SUPPORT_RULE = ("tracer needs a decoder-only causal LM whose decoder (get_decoder()) holds its layers as "
                "`layers`, `h` or `blocks` (Llama, GPT-2, GPT-NeoX, OPT, Falcon, Bloom, MPT layouts)")


def transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


# ----------------------------------------------------------------------------------------
# Binding arguments of private methods by name
# ----------------------------------------------------------------------------------------


def bind(method: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``{parameter name: value}`` of a call to ``method`` (a bound method), defaults applied."""
    try:
        bound = inspect.signature(method).bind(*args, **kwargs)
    except TypeError as exc:
        raise NotSupportedError(
            f"transformers {transformers_version()} calls {getattr(method, '__name__', method)} with arguments "
            f"tracer does not recognise ({exc}); please report this transformers version"
        ) from None
    bound.apply_defaults()
    return dict(bound.arguments)


# ----------------------------------------------------------------------------------------
# Model structure: the one rule for "supported model"
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecoderParts:
    embedding: torch.nn.Module
    layers: Any  # nn.ModuleList of decoder layers
    final_norm: torch.nn.Module | None


#: Where transformers' decoder-only families keep their parts, in the decoder returned by
#: ``model.get_decoder()``: ``model.layers`` (Llama and most), ``transformer.h`` (GPT-2, GPT-J,
#: Falcon, Bloom, CodeGen, GPTBigCode), ``gpt_neox.layers``, ``model.decoder.layers`` (OPT),
#: ``transformer.blocks`` (MPT).  The first name present wins.
LAYER_NAMES = ("layers", "h", "blocks")
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "layer_norm", "layernorm")
ATTENTION_NAMES = ("self_attn", "attention", "attn", "self_attention", "multi_head_attention")


def _decoder_base(model: Any) -> Any:
    getter = getattr(model, "get_decoder", None)
    base = getter() if callable(getter) else None
    if base is None:
        base = getattr(model, "model", None)
    # an outer module holding the decoder (OPT's ``model.decoder``)
    if base is not None and not any(hasattr(base, n) for n in LAYER_NAMES):
        base = getattr(base, "decoder", base)
    return base


def decoder_parts(model: Any) -> DecoderParts:
    """(embedding, decoder layers, final norm) of a decoder-only causal LM.

    The one rule deciding whether tracer supports a model (``tracer.models`` and the session
    both use it): not encoder-decoder; the decoder (``get_decoder()``, else ``model.model``,
    then its ``.decoder`` if it holds the layers) has a non-empty layer list under one of
    :data:`LAYER_NAMES`; its final norm is the first of :data:`FINAL_NORM_NAMES` (or none).
    Anything else raises :class:`NotSupportedError`."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise NotSupportedError(f"{name} is an encoder-decoder model; tracer traces decoder-only LMs ({SUPPORT_RULE})")
    base = _decoder_base(model)
    if base is None:
        raise NotSupportedError(f"{name} has no `model.model` nor get_decoder() (no decoder layers found); {SUPPORT_RULE}")
    layers = next((getattr(base, n) for n in LAYER_NAMES if isinstance(getattr(base, n, None), torch.nn.ModuleList)),
                  None)
    if layers is None or len(layers) == 0:
        raise NotSupportedError(f"{name} has no decoder layers ({'/'.join(LAYER_NAMES)} of its decoder); {SUPPORT_RULE}")
    norm = next((getattr(base, n) for n in FINAL_NORM_NAMES if isinstance(getattr(base, n, None), torch.nn.Module)),
                None)
    return DecoderParts(base.get_input_embeddings(), layers, norm)


def lens_head(model: Any) -> tuple[torch.nn.Module | None, Callable[[torch.Tensor], torch.Tensor] | None]:
    """What a family does between its final norm and its logits beyond ``lm_head``, as its modeling
    file does it: (a projection before ``lm_head``: OPT's ``decoder.project_out`` where
    ``word_embed_proj_dim != hidden_size``; a transform of the logits after it: Cohere's
    ``logits * model.logit_scale``, Granite's ``logits / config.logits_scaling`` (MiniCPM3 divides
    the state before a bias-free ``lm_head``: the same), Gemma 2/3, VaultGemma and nanochat's
    ``final_logit_softcapping``).  The logit lens applies them, so that at the last layer it is
    the model's own distribution; a family doing something else is noted in the trace."""
    base = _decoder_base(model)
    project = getattr(base, "project_out", None)
    project = project if isinstance(project, torch.nn.Module) else None
    config = model.config
    scale = getattr(model, "logit_scale", None)
    scale = float(scale) if isinstance(scale, (int, float)) and not isinstance(scale, bool) else None
    divide = getattr(config, "logits_scaling", None)
    divide = float(divide) if isinstance(divide, (int, float)) and divide not in (0, 1) else None
    cap = getattr(config, "final_logit_softcapping", None)
    cap = float(cap) if isinstance(cap, (int, float)) and cap else None
    if scale is None and divide is None and cap is None:
        return project, None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return project, transform


def attention_module(layer: torch.nn.Module) -> torch.nn.Module | None:
    """The self-attention module of a decoder layer (first of :data:`ATTENTION_NAMES`)."""
    for n in ATTENTION_NAMES:
        module = getattr(layer, n, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


#: ``config.layer_types`` values of layers whose attention is softmax attention (recordable)
SOFTMAX_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})


def non_softmax_layers(config: Any, layers: Any) -> dict[int, str]:
    """``{layer: kind}`` of the given layers that hybrid models (MiniMax, Qwen3-Next, Jamba, ...)
    mark in ``config.layer_types`` as something other than softmax attention (linear attention,
    mamba, ...): there is no attention map to record there."""
    kinds = getattr(config, "layer_types", None) or []
    return {i: str(kinds[i]) for i in layers if i < len(kinds) and kinds[i] not in SOFTMAX_LAYER_TYPES}


def routes_attention_interface(module: torch.nn.Module) -> bool:
    """Whether the attention module's modeling file dispatches through transformers'
    ``ALL_ATTENTION_FUNCTIONS`` (the ``AttentionInterface``) — the tracer's attention hook.
    Families that do not (Bloom, MPT, GPT-Neo, ...) trace, but their attention is not recorded."""
    return hasattr(sys.modules.get(type(module).__module__), "ALL_ATTENTION_FUNCTIONS")


#: Where MoE decoder layers keep their router (Mixtral ``block_sparse_moe.gate`` in older
#: releases, ``mlp.gate`` for Mixtral/Qwen2-MoE/Qwen3-MoE/OLMoE/FlexOlmo/MiniMax/ERNIE-4.5-MoE/
#: GLM-4-MoE, ``mlp.router`` for gpt-oss/PhiMoE/AFMoE, ``block_sparse_moe.router`` for GraniteMoE).
ROUTER_PATHS = ("mlp.gate", "block_sparse_moe.gate", "mlp.router", "block_sparse_moe.router")


def router_modules(layers: Any) -> dict[int, torch.nn.Module]:
    """layer index -> the layer's top-k router module (only the layers that have one).

    A router is a module at one of :data:`ROUTER_PATHS` whose class name ends in ``Router``
    (transformers 5's ``*TopKRouter``: it returns ``(router_logits, router_scores,
    router_indices)`` over the flattened tokens)."""
    out = {}
    for i, layer in enumerate(layers):
        for path in ROUTER_PATHS:
            module = layer
            for part in path.split("."):
                module = getattr(module, part, None)
            if isinstance(module, torch.nn.Module) and type(module).__name__.endswith("Router"):
                out[i] = module
                break
    return out


def router_output(output: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(selected experts `(N, k)`, their routing weights `(N, k)`) from a router's output, or
    None when it is not the ``(logits (N, E), scores (N, k), indices (N, k))`` triple."""
    if not (isinstance(output, tuple) and len(output) == 3):
        return None
    logits, scores, indices = output
    if not all(isinstance(t, torch.Tensor) for t in output) or indices.dtype.is_floating_point:
        return None
    if scores.shape != indices.shape or logits.shape[:-1] != indices.shape[:-1]:
        return None
    return indices, scores


def head_counts(config: Any) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) from a model config."""
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or (config.hidden_size // max(heads, 1)))
    return heads, kv, head_dim


def attn_implementation(model: Any) -> str:
    """The name of the model's active attention implementation (``config._attn_implementation``)."""
    return str(model.config._attn_implementation)


# ----------------------------------------------------------------------------------------
# Generation internals
# ----------------------------------------------------------------------------------------


def generation_mode_supported(generation_config: Any) -> str | None:
    """None for greedy search and multinomial sampling, else the mode's name."""
    from transformers.generation.configuration_utils import GenerationMode

    mode = generation_config.get_generation_mode()
    return None if mode in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE) else str(mode.value)


#: The beam-search steps of ``GenerationMixin._beam_search`` that ``tracer.beam`` wraps (in order
#: of a step): K continuations kept, the running beams chosen among them, the finished set updated.
BEAM_METHODS = ("_get_top_k_continuations", "_get_running_beams_for_next_iteration", "_update_finished_beams")


#: The factory of assisted decoding's candidate generator (``tracer.assisted`` wraps it).
CANDIDATE_GENERATOR_METHOD = "_get_candidate_generator"


#: generate's parameters before ``**kwargs``, in order (``inputs`` is the first after ``self``)
GENERATE_POSITIONAL = ("inputs", "generation_config", "logits_processor", "stopping_criteria",
                       "prefix_allowed_tokens_fn", "synced_gpus", "assistant_model", "streamer",
                       "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate")


def generate_argument(args: tuple, kwargs: dict, name: str) -> Any:
    """One of generate's own parameters (``assistant_model``, ``generation_config``…), given by
    keyword or by position."""
    if name in kwargs:
        return kwargs[name]
    i = GENERATE_POSITIONAL.index(name)
    return args[i] if len(args) > i else None


def generation_setting(model: Any, args: tuple, kwargs: dict, name: str, default: Any = None) -> Any:
    """The value ``model.generate(*args, **kwargs)`` uses for the GenerationConfig field ``name``,
    in transformers' order: a keyword, then the generation_config passed (by keyword or position),
    then the model's own generation_config; ``default`` where none sets it."""
    if kwargs.get(name) is not None:
        return kwargs[name]
    for config in (generate_argument(args, kwargs, "generation_config"), getattr(model, "generation_config", None)):
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def beam_search_requested(model: Any, args: tuple, kwargs: dict) -> bool:
    """Whether ``model.generate(*args, **kwargs)`` will run beam search (``num_beams > 1``)."""
    return int(generation_setting(model, args, kwargs, "num_beams", 1)) > 1


def auto_compiles(model: Any, model_kwargs: dict | None, generation_config: Any) -> bool:
    """Whether ``generate`` would ``torch.compile`` the decoding step (``_valid_auto_compile_criteria``)."""
    check = getattr(model, "_valid_auto_compile_criteria", None)
    if check is None or model_kwargs is None:
        return False
    try:
        return bool(check(**bind(check, (model_kwargs, generation_config), {})))
    except NotSupportedError:
        raise
    except Exception:  # noqa: BLE001 - the check itself is transformers-internal
        return False


def make_processor_list(base: type, on_scores: Callable[[Any, torch.Tensor], None]) -> Callable[[Any], Any]:
    """A factory wrapping a ``LogitsProcessorList`` into one that calls ``on_scores(processor,
    scores)`` before the first processor (``processor=None``: the raw logits) and after each.

    Each processor runs through the installed ``LogitsProcessorList.__call__`` on a one-element
    list, so argument handling is transformers' own whatever its version."""

    class RecordingLogitsProcessorList(base):  # type: ignore[misc, valid-type]
        def __call__(self, input_ids, scores, **kwargs):
            on_scores(None, scores)
            for processor in self:
                scores = base.__call__(base([processor]), input_ids, scores, **kwargs)
                on_scores(processor, scores)
            return scores

    return RecordingLogitsProcessorList


#: where transformers' own stopping criteria live: each returns a new tensor on every call
_HF_CRITERIA_MODULE = "transformers.generation.stopping_criteria"


def make_criteria_list(base: type, on_stop: Callable[[torch.Tensor, torch.Tensor, list], None]) -> Callable[[Any], Any]:
    """A factory wrapping a ``StoppingCriteriaList`` into one that runs the installed list's loop
    (``is_done = full(False)``, then ``is_done | criterion(...)`` for each: the same ops, so the
    same result and no more kernels than untraced) and reports ``on_stop(input_ids, is_done,
    [(criterion, result), ...])``.  The recorder reads each result at the end of generation, so
    a result is kept as returned only from transformers' own criteria (each returns a new tensor
    every call); another criterion's is copied (it may return one tensor it updates in place), and
    a result that is not a ``(batch,)`` bool tensor is normalised as the list itself would
    (``full(False) | result``).  These checks read types, shapes and dtypes, never a device value."""

    class RecordingStoppingCriteriaList(base):  # type: ignore[misc, valid-type]
        def __call__(self, input_ids, scores, **kwargs):
            is_done = torch.full((input_ids.shape[0],), False, device=input_ids.device, dtype=torch.bool)
            fired = []
            for criteria in self:
                result = criteria(input_ids, scores, **kwargs)
                is_done = is_done | result
                if not (isinstance(result, torch.Tensor) and result.dtype == torch.bool
                        and result.shape == is_done.shape):
                    result = torch.zeros_like(is_done) | result
                elif type(criteria).__module__ != _HF_CRITERIA_MODULE:
                    result = result.clone()
                fired.append((criteria, result))
            on_stop(input_ids, is_done, fired)
            return is_done

    return RecordingStoppingCriteriaList


# ----------------------------------------------------------------------------------------
# Attention registry
# ----------------------------------------------------------------------------------------


def eager_attention_function(module: torch.nn.Module) -> Callable:
    """The module-level ``eager_attention_forward`` of the attention module's modeling file."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise NotSupportedError(
            f"{type(module).__name__} has no module-level eager_attention_forward; record attention with sdpa"
        )
    return fn


def registered_attention_function(name: str) -> Callable:
    from transformers import AttentionInterface

    registry = AttentionInterface()
    if name not in registry:
        raise NotSupportedError(f"attention implementation {name!r} is not in transformers' AttentionInterface")
    return registry[name]


def mask_function(name: str) -> Callable | None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS[name] if name in ALL_MASK_ATTENTION_FUNCTIONS else None


def register_attention(name: str, function: Callable, mask_fn: Callable | None) -> None:
    """Register ``function`` (and the original's mask builder) under ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, function)
    if mask_fn is not None:
        AttentionMaskInterface.register(name, mask_fn)
