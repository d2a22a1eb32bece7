"""Engines other than Hugging Face ``generate`` whose runs become ordinary :class:`~tracer.Trace`s.

``tracer.backends.vllm``: :func:`vllm_generate` turns vLLM's ``LLM.generate`` outputs into traces
(vLLM itself is imported only when a function that needs it is called).
``tracer.backends.llamacpp``: :func:`llamacpp_generate` drives llama.cpp (``llama-cpp-python``)
and records each sampler of its chain; ``llamacpp_convert`` builds the records without it.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "vllm_generate": ("vllm", "vllm_generate"),
    "traces_from_outputs": ("vllm", "traces_from_outputs"),
    "prompt_logprobs": ("vllm", "prompt_logprobs"),
    "VLLMNotInstalledError": ("vllm", "VLLMNotInstalledError"),
    "engine_facts": ("vllm", "engine_facts"),
    "llamacpp_generate": ("llamacpp", "llamacpp_generate"),
    "LlamaCppNotInstalledError": ("llamacpp", "LlamaCppNotInstalledError"),
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'tracer.backends' has no attribute {name!r}") from None
    value = getattr(import_module(f".{module_name}", __name__), attr)
    globals()[name] = value
    return value
