"""Shared helpers of the views: token text, escaping, figures, colours."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..text import html_text, piece_of
from .shared import figure_png  # noqa: F401 - the views import it from here

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from ..records import StepRecord, Trace


CHOSEN = "#e4572e"  # the chosen token, everywhere
CHOSEN_LIGHT = "#fde3dc"  # behind a chosen token's text (CHOSEN itself is too dark for its byte runs)
OTHER = "#8da0cb"


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def tok_text(trace: Trace, token_id: int) -> str:
    """One token on its own, for labels and table cells (:func:`tracer.text.piece_of`):
    multibyte parts as escaped bytes, whitespace and control characters made visible."""
    return piece_of(trace, token_id).display


def esc(text: str) -> str:
    return html_text(text)


def check_step(trace: Trace, step: int) -> StepRecord:
    if not 0 <= step < trace.num_steps:
        raise IndexError(f"step {step} out of range: the trace has {trace.num_steps} steps")
    return trace.steps[step]


def seq_steps(trace: Trace, seq: int) -> list[int]:
    """Indices of the steps at which sequence ``seq`` was still generating."""
    return [s.index for s in trace.steps if s.active[seq]]


def new_figure(**kw: Any) -> Figure:
    # Made through pyplot so that the notebook's inline backend is active and displays the
    # returned figure, then closed at once: pyplot keeps no reference (no leak, no double
    # display at the end of the cell) and the figure still draws and saves.
    import matplotlib.pyplot as plt

    fig = plt.figure(**kw)
    plt.close(fig)
    return fig


def annotate_cells(ax: Any, mat: np.ndarray, fmt: str, limit: int = 300) -> None:
    """Write each cell's value on a small heatmap (skipped above ``limit`` cells)."""
    if mat.size > limit:
        return
    from matplotlib import patheffects

    outline = [patheffects.withStroke(linewidth=2, foreground="black")]
    for (i, j), v in np.ndenumerate(mat):
        text = fmt.format(int(v) if fmt == "{:d}" else float(v))
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white", path_effects=outline)


def params_text(params: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in dict(params).items()) or "—"


def final_entropy_of(step: StepRecord, seq: int) -> tuple[float, bool]:
    """(entropy in nats of the final distribution, exact?).  The recorder keeps the exact
    full-vocabulary value; a trace without it (older or synthetic) gets the entropy of the
    recorded top-k, a lower bound since every omitted ``-p log p`` term is non-negative."""
    recorded = step.stages[-1].entropy
    if recorded is not None:
        return float(recorded[seq]), True
    p = step.final.probs[seq].astype(np.float64)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum()), False


CLASSES: dict[str, type] = {}  # widget classes, built on first use (ipywidgets imported lazily)
