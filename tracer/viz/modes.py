"""The report sections of the generation modes and model kinds only some traces hold."""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["mode_sections"]


def mode_sections(trace: Any) -> list[tuple[str, Callable[[], str]]]:
    """(title, body) of each section this trace can show: MoE routing, beam search."""
    from .. import routing as rt

    out: list[tuple[str, Callable[[], str]]] = []
    if rt.routing_layers(trace):
        from .routing import routing_html

        out.append(("MoE routing", lambda: routing_html(trace)))
    return out
