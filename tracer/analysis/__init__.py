"""Analysis of traces: compare two runs, replay one on a model, branch it, reprocess a step.

``compare`` and ``trace_table`` are functions of traces (numpy; pandas for tables) and never
need torch.  ``replay`` and ``branch`` run a model through the tracer's public ``tracer.trace``;
``reprocess`` runs transformers' logits processors on recorded logits (torch, no model).
Names are imported on first use so ``import tracer.analysis`` stays light.  Modules are named
apart from the functions (``comparison.compare``, ``forcing.replay``/``branch``,
``reprocessing.reprocess``) so that importing a module never shadows a function here.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "compare": ("comparison", "compare"),
    "Comparison": ("comparison", "Comparison"),
    "CompareError": ("comparison", "CompareError"),
    "trace_table": ("table", "trace_table"),
    "replay": ("forcing", "replay"),
    "branch": ("forcing", "branch"),
    "ForceTokens": ("forcing", "ForceTokens"),
    "reprocess": ("reprocessing", "reprocess"),
    "Reprocessed": ("reprocessing", "Reprocessed"),
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'tracer.analysis' has no attribute {name!r}") from None
    value = getattr(import_module(f".{module_name}", __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
