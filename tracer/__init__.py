"""tracer: see every step of Hugging Face ``generate()``.

``import tracer`` is light: torch and transformers are imported only when a name that needs
them is used, so ``tracer.load_trace`` works in an environment without them.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .errors import MemoryBudgetError, NotSupportedError, TraceFormatError, TracerError, TracerWarning
from .records import SCHEMA_VERSION, StopReason, Trace

__version__ = "0.1.0"

_LAZY = {
    "trace": ("session", "trace"),
    "trace_generate": ("session", "trace_generate"),
    "prepare_generate": ("session", "prepare_generate"),
    "encode_prompts": ("session", "encode_prompts"),
    "TraceSession": ("session", "TraceSession"),
    "RecordConfig": ("config", "RecordConfig"),
    "load_model": ("models", "load_model"),
    "load_tokenizer": ("models", "load_tokenizer"),
    "ModelLoadError": ("models", "ModelLoadError"),
    "load_trace": ("storage", "load_trace"),
    "save_trace": ("storage", "save_trace"),
    "vllm_generate": ("backends.vllm", "vllm_generate"),
    "BeamTrace": ("beam_records", "BeamTrace"),
    "AssistedTrace": ("assisted_records", "AssistedTrace"),
    "llamacpp_generate": ("backends.llamacpp", "llamacpp_generate"),
    "viz": ("viz", None),
    "compare": ("analysis", "compare"),
    "replay": ("analysis", "replay"),
    "branch": ("analysis", "branch"),
    "reprocess": ("analysis", "reprocess"),
    "trace_corpus": ("corpus.engine", "trace_corpus"),
    "open_dataset": ("corpus.dataset", "open_dataset"),
    "compare_datasets": ("corpus.compare", "compare_datasets"),
}

__all__ = [
    "MemoryBudgetError",
    "NotSupportedError",
    "SCHEMA_VERSION",
    "StopReason",
    "Trace",
    "TraceFormatError",
    "TracerError",
    "TracerWarning",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'tracer' has no attribute {name!r}") from None
    module = import_module(f".{module_name}", __name__)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
