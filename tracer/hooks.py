"""Deprecated module name: the recording session lives in :mod:`tracer.session`.

Kept so that ``from tracer.hooks import trace, encode_prompts, ...`` keeps working."""

from __future__ import annotations

from .session import (  # noqa: F401
    TraceSession,
    decoder_parts,
    default_terminators,
    encode_prompts,
    prepare_generate,
    trace,
    trace_generate,
)
from .errors import TracerWarning  # noqa: F401

__all__ = ["TraceSession", "TracerWarning", "trace", "trace_generate", "prepare_generate", "encode_prompts",
           "default_terminators", "decoder_parts"]
