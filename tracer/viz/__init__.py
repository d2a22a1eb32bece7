"""Views of a :class:`~tracer.records.Trace`: widgets, static figures and text.

Every view is a pure function of a trace (recorded live or loaded from a file); nothing here
touches hooks or a model.  Each has an interactive form (ipywidgets 8, plotly ``FigureWidget``
where hovering helps) and a static fallback: a matplotlib ``Figure`` and/or a ``*_text``
function, so tests and exported HTML work without a widget front end.

numpy is the only import at module level; matplotlib, plotly and ipywidgets (the ``notebook``
extra) are imported inside the functions that need them.  Every token string placed in HTML
goes through :func:`html.escape`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ..records import Trace

__all__ = [
    "step_text",
    "step_explorer",
    "processor_waterfall_figure",
    "attention_maps",
    "attention_grid",
    "attention_grid_figure",
    "head_map_figure",
    "cache_text",
    "cache_growth",
    "cache_growth_figure",
    "logit_lens_matrix",
    "logit_lens",
    "logit_lens_figure",
    "token_strip",
    "token_strip_html",
    "attention_sinks_figure",
    "head_stats_text",
    "show",
]

from ._common import esc, figure_png
from .attention import (
    attention_grid_class,
    attention_grid,
    attention_grid_figure,
    attention_maps,
    attention_sinks_figure,
    head_map_figure,
    head_stats_text,
)
from .shared import backend_of, missing_note
from .cache import cache_growth, cache_growth_figure, cache_text
from .compare import compare, compare_figure, compare_html, compare_text  # eager: the function, not the module
from .steps import (
    step_explorer_class,
    processor_waterfall_figure,
    step_explorer,
    step_text,
)
from .tokens import (
    logit_lens,
    logit_lens_figure,
    logit_lens_matrix,
    token_strip,
    token_strip_html,
)


def __getattr__(name: str) -> Any:
    """``viz.StepExplorer`` / ``viz.AttentionGrid``: the widget classes, built on first access
    so that importing this module does not import ipywidgets."""
    if name == "StepExplorer":
        return step_explorer_class()
    if name == "AttentionGrid":
        return attention_grid_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------


def show(trace: Trace, seq: int = 0) -> Any:
    """A ``Tab`` with every view that the trace has data for."""
    import ipywidgets as W

    tabs: list[tuple[str, Any]] = [("steps", step_explorer(trace, seq)), ("tokens", token_strip(trace, seq))]
    if trace.attention_layers and trace.attention_heads:
        tabs.append(("attention", attention_grid(trace, 0, seq)))
    elif backend_of(trace) != "transformers":
        tabs.append(("attention", W.HTML(esc(missing_note(trace, "attention maps")))))
    if any(s.attention_stats is not None for s in trace.steps):
        img = W.Image(value=figure_png(attention_sinks_figure(trace, seq)), format="png")
        tabs.append(("heads", W.VBox([img, W.HTML("<pre>" + esc(head_stats_text(trace, seq=seq)) + "</pre>")])))
    if trace.cache is not None:
        tabs.append(("cache", cache_growth(trace)))
    elif backend_of(trace) != "transformers":
        tabs.append(("cache", W.HTML(esc(missing_note(trace, "cache timeline")))))
    if any(s.logit_lens is not None for s in trace.steps):
        tabs.append(("logit lens", logit_lens(trace, seq)))
    from .modes import mode_tabs

    tabs += mode_tabs(trace, seq)
    tab = W.Tab(children=[w for _, w in tabs])
    for i, (name, _) in enumerate(tabs):
        tab.set_title(i, name)
    return tab
