"""The report sections of the generation modes and model kinds only some traces hold."""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["mode_sections", "mode_tabs"]


def mode_sections(trace: Any) -> list[tuple[str, Callable[[], str]]]:
    """(title, body) of each section this trace can show: MoE routing, beam search."""
    from .. import routing as rt

    out: list[tuple[str, Callable[[], str]]] = []
    if rt.routing_layers(trace):
        from .routing import routing_html

        out.append(("MoE routing", lambda: routing_html(trace)))
    return out


def mode_tabs(trace: Any, seq: int = 0) -> list[tuple[str, Any]]:
    """(title, widget) of each extra tab of ``tracer.viz.show`` this trace can fill: MoE routing
    (the two figures and the tables)."""
    from .. import routing as rt

    out: list[tuple[str, Any]] = []
    if rt.routing_layers(trace):
        import ipywidgets as W

        from ._common import figure_png
        from .routing import expert_load_figure, routing_html, token_layer_figure

        images = [W.Image(value=figure_png(f), format="png")
                  for f in (expert_load_figure(trace), token_layer_figure(trace, seq))]
        out.append(("routing", W.VBox([W.HBox(images), W.HTML(routing_html(trace, seq))])))
    return out
