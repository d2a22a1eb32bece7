"""The errors and the warning this package raises on purpose (importable without torch)."""

from __future__ import annotations

__all__ = ["TracerError", "NotSupportedError", "MemoryBudgetError", "TraceFormatError", "TracerWarning"]


class TracerError(Exception):
    """Base class of the errors this package raises on purpose."""


class NotSupportedError(TracerError, NotImplementedError):
    """A model, cache or generation mode the tracer cannot record (raised before generating)."""


class MemoryBudgetError(TracerError, MemoryError):
    """What the configuration asks to record would exceed ``RecordConfig.max_bytes``."""


class TraceFormatError(TracerError, ValueError):
    """A trace file is corrupt, truncated, foreign, unreadable, or of a newer schema major version."""


class TracerWarning(UserWarning):
    """Something was recorded partially (e.g. the memory budget ran out mid-run)."""
