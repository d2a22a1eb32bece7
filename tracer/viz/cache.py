"""KV-cache growth: per-layer lengths and bytes, measured vs predicted."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from ..records import Trace

from ..text import safe_lines
from .shared import missing_note
from ._common import (
    CHOSEN,
    esc,
    new_figure,
    figure_png,
)

# --------------------------------------------------------------------------------------
# 3. Cache growth
# --------------------------------------------------------------------------------------


def _require_cache(trace: Trace) -> Any:
    if trace.cache is None:
        raise KeyError(missing_note(trace, "cache timeline"))
    return trace.cache


def cache_series(trace: Trace) -> dict[str, np.ndarray]:
    """Per step `(S,)` byte series: "measured", "predicted" (the memory model on kept
    positions), and where they differ "predicted (allocated)" and "predicted without GQA"."""
    c = _require_cache(trace)
    out = {"measured": c.total_bytes, "predicted": c.predicted_bytes()}
    if not np.array_equal(c.allocated_len, c.kept_len):
        out["predicted (allocated)"] = c.predicted_bytes(allocated=True)
    kv = c.layers[0].kv_heads if c.layers else 0
    if trace.meta.num_heads and trace.meta.num_heads != kv:
        out["predicted without GQA"] = c.predicted_bytes(query_heads=trace.meta.num_heads)
    return out


def cache_text(trace: Trace) -> str:
    """The cache timeline as a table: per step lengths and measured vs predicted bytes (or
    one line saying it was not recorded, e.g. "not recorded by this backend")."""
    if trace.cache is None:
        return missing_note(trace, "cache timeline")
    c = _require_cache(trace)
    series = cache_series(trace)
    lines = [
        f"{c.cache_class}: {c.num_layers} layers ({', '.join(sorted({i.kind for i in c.layers}))}), "
        f"kv_heads={c.layers[0].kv_heads if c.layers else '?'}, head_dim={c.layers[0].head_dim if c.layers else '?'}, "
        f"dtype={c.layers[0].dtype if c.layers else '?'}, batch={c.batch_size}, reused={c.reused_len}"
    ]
    names = list(series)
    lines.append(f"{'step':>4} {'seq_len':>9} {'kept':>9} {'allocated':>9} " + " ".join(f"{n:>22}" for n in names))
    span = lambda a: f"{a.min()}" if a.min() == a.max() else f"{a.min()}–{a.max()}"  # noqa: E731
    for s in range(c.seq_len.shape[0]):
        lines.append(
            f"{s:>4} {span(c.seq_len[s]):>9} {span(c.kept_len[s]):>9} {span(c.allocated_len[s]):>9} "
            + " ".join(f"{int(series[n][s]):>22,}" for n in names)
        )
    return safe_lines("\n".join(lines))


def cache_growth_figure(trace: Trace) -> Figure:
    """Left: per-layer kept length (solid) and allocated length (dashed, where it differs) vs
    step.  Right: total bytes measured vs the memory model's prediction (and without GQA).
    Lines carry labels ``layer {i} kept`` / ``layer {i} allocated`` / the series names."""
    c = _require_cache(trace)
    steps = np.arange(c.seq_len.shape[0])
    fig = new_figure(figsize=(11, 4), layout="constrained")
    a1, a2 = fig.subplots(1, 2)
    import matplotlib as mpl

    cmap = mpl.colormaps["viridis"]
    for i in range(c.num_layers):
        color = cmap(i / max(c.num_layers - 1, 1))
        a1.plot(steps, c.kept_len[:, i], color=color, lw=1.2, label=f"layer {i} kept")
        if not np.array_equal(c.allocated_len[:, i], c.kept_len[:, i]):
            a1.plot(steps, c.allocated_len[:, i], color=color, lw=1, ls="--", label=f"layer {i} allocated")
    a1.set_xlabel("step")
    a1.set_ylabel("positions in cache")
    same = bool((c.kept_len == c.kept_len[:, :1]).all() and (c.allocated_len == c.allocated_len[:, :1]).all())
    a1.set_title(f"{c.cache_class}: length per layer\n({c.num_layers} layers{', all equal' if same else ''})", fontsize=10)
    if c.num_layers <= 8:
        a1.legend(fontsize=7)
    for name, ys in cache_series(trace).items():
        style = {"measured": dict(lw=2.5, color="black"), "predicted": dict(lw=1.2, ls="--", color=CHOSEN)}.get(name, dict(lw=1, ls=":"))
        a2.plot(steps, ys, label=name, marker="." if name == "measured" else None, **style)
    a2.set_xlabel("step")
    a2.set_ylabel("bytes (keys + values)")
    a2.set_title("total cache bytes: measured vs predicted", fontsize=10)
    a2.legend(fontsize=8)
    return fig


def cache_growth(trace: Trace) -> Any:
    """Hoverable cache growth (plotly) above the text table."""
    import ipywidgets as W

    c = _require_cache(trace)
    table = W.HTML("<pre>" + esc(cache_text(trace)) + "</pre>")
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        steps = list(range(c.seq_len.shape[0]))
        fig = go.FigureWidget(make_subplots(rows=1, cols=2, subplot_titles=["length per layer", "total bytes"]))
        for i in range(c.num_layers):
            fig.add_scatter(x=steps, y=c.kept_len[:, i].tolist(), name=f"layer {i} kept", mode="lines", row=1, col=1, legendgroup="len", showlegend=c.num_layers <= 8)
            if not np.array_equal(c.allocated_len[:, i], c.kept_len[:, i]):
                fig.add_scatter(x=steps, y=c.allocated_len[:, i].tolist(), name=f"layer {i} allocated", mode="lines", line=dict(dash="dash"), row=1, col=1, showlegend=False)
        for name, ys in cache_series(trace).items():
            fig.add_scatter(x=steps, y=ys.tolist(), name=name, mode="lines+markers" if name == "measured" else "lines", row=1, col=2)
        fig.update_xaxes(title_text="step")
        fig.update_layout(height=360, margin=dict(l=10, r=10, t=40, b=10))
        plot: Any = fig
    except ImportError:
        plot = W.Image(value=figure_png(cache_growth_figure(trace)), format="png")
    return W.VBox([plot, table])
