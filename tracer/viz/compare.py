"""The comparison view of two runs (``tracer.viz.compare(diff)``, ``diff = tracer.compare(a, b)``).

* the two generated texts aligned token by token, the first divergence marked;
* per-step |Δ log-prob| (on shared tokens) and KL(a‖b) as a plot;
* a step slider showing both sides' top-k at that step side by side.

Static fallbacks: :func:`compare_html` (a standalone page, the plot as inline SVG, top-k tables
around the divergence; what ``tracer compare --html`` writes), :func:`compare_figure`
(matplotlib) and :func:`compare_text`.  numpy only at import; every token text is escaped.
"""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ..text import piece_of

if TYPE_CHECKING:  # pragma: no cover
    from ..analysis.comparison import Comparison

__all__ = ["compare", "compare_html", "compare_figure", "compare_text", "aligned_tokens_html", "topk_pair_html"]

_CSS = """
.tc-row{font-family:monospace;white-space:pre-wrap;line-height:1.9}
.tc-tok{border:1px solid #ccc;border-radius:3px;padding:0 2px;margin:1px;display:inline-block}
.tc-same{background:#eef5ee}.tc-diff{background:#fbd5d5;border-color:#c00}.tc-after{opacity:.55}
.tc-div{outline:2px solid #c00}.tc-tab td,.tc-tab th{padding:1px 6px;font-family:monospace}
.tc-chosen{font-weight:bold;background:#ffe9a8}
"""


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def tok_text(text: str | None) -> str:
    if text is None:
        return "·"
    return esc(text.replace("\n", "\\n")) or "&#8203;"


def compare_text(diff: "Comparison", context: int = 3) -> str:
    """The summary and the rows around each divergence, as plain text."""
    return diff.text(context=context)


def aligned_tokens_html(diff: "Comparison", seq: int = 0) -> str:
    """Both generated sequences, one token per cell, step-aligned; the first divergence is
    outlined, later steps (different contexts) faded."""
    div = diff.first_divergence[seq]
    cells = {"a": [], "b": []}
    for r in (r for r in diff.rows if r["seq"] == seq):
        cls = "tc-same" if r["same"] else "tc-diff"
        if r["step"] == div:
            cls += " tc-div"
        elif not r["comparable"]:
            cls += " tc-after"
        for side in ("a", "b"):
            lp = r[f"logprob_{side}"]
            title = f"step {r['step']}: log-prob {lp:.4f}" if not math.isnan(lp) else f"step {r['step']}"
            cells[side].append(f"<span class='tc-tok {cls}' title='{esc(title)}'>{tok_text(r[f'text_{side}'])}</span>")
    label = "no divergence" if div is None else f"first divergence at step {div}"
    return (f"<div><b>sequence {seq}</b>: {label}"
            f"<div class='tc-row'><b>{esc(diff.names[0])}</b> {''.join(cells['a'])}</div>"
            f"<div class='tc-row'><b>{esc(diff.names[1])}</b> {''.join(cells['b'])}</div></div>")


def topk_pair_html(diff: "Comparison", seq: int, step: int, k: int = 10) -> str:
    """Both sides' top-k at ``step`` side by side; each side's chosen token in bold."""
    va, vb = diff.views(seq, step)
    rows = []
    for i in range(k):
        cells = []
        for view, trace in ((va, diff.a), (vb, diff.b)):
            if view is None or i >= view.ids.size:
                cells.append("<td></td><td></td>")
                continue
            tid = int(view.ids[i])
            cls = " class='tc-chosen'" if tid == view.token else ""
            cells.append(f"<td{cls}>{tok_text(piece_of(trace, tid).display)}</td><td>{math.exp(view.logprobs[i]):.4f}</td>")
        rows.append(f"<tr><td>{i}</td>{''.join(cells)}</tr>")
    return (f"<table class='tc-tab'><caption>step {step}</caption><tr><th>#</th><th>{esc(diff.names[0])}</th>"
            f"<th>p</th><th>{esc(diff.names[1])}</th><th>p</th></tr>{''.join(rows)}</table>")


def _svg_plot(diff: "Comparison", seq: int, width: int = 640, height: int = 160) -> str:
    arr = diff.arrays(seq)
    steps = arr["step"]
    if steps.size == 0:
        return ""
    series = [("|Δ log-prob|", np.nan_to_num(arr["abs_dlogprob"].astype(float), nan=0.0), "#1f77b4"),
              ("KL(a‖b)" + ("" if arr["kl_exact"].all() else " ≥"), np.nan_to_num(arr["kl"].astype(float), nan=0.0),
               "#d62728")]
    top = max(max(float(s.max()) for _, s, _ in series), 1e-12)
    x = lambda i: 30 + (width - 40) * (i / max(steps.size - 1, 1))  # noqa: E731
    y = lambda v: height - 20 - (height - 40) * (v / top)  # noqa: E731
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img'>",
             f"<text x='30' y='12' font-size='11'>max {top:.3g} (linear scale)</text>"]
    for n, (name, values, colour) in enumerate(series):
        pts = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))
        parts.append(f"<polyline fill='none' stroke='{colour}' stroke-width='1.5' points='{pts}'/>")
        parts.append(f"<text x='{width - 170}' y='{14 + 12 * n}' font-size='11' fill='{colour}'>{esc(name)}</text>")
    div = diff.first_divergence[seq]
    if div is not None:
        parts.append(f"<line x1='{x(div):.1f}' x2='{x(div):.1f}' y1='15' y2='{height - 20}' stroke='#c00' "
                     "stroke-dasharray='4 3'/>")
    parts.append(f"<text x='30' y='{height - 4}' font-size='11'>step 0 … {int(steps[-1])}</text></svg>")
    return "".join(parts)


def compare_html(diff: "Comparison", k: int = 10, context: int = 1) -> str:
    """A standalone HTML page: summary, aligned tokens, the per-step plot (inline SVG) and the
    top-k tables at the steps around each divergence (or the first step when none)."""
    body = [f"<style>{_CSS}</style>", diff._repr_html_()]
    for seq in range(diff.a.batch_size):
        body.append(aligned_tokens_html(diff, seq))
        body.append(_svg_plot(diff, seq))
        n = max(len(diff.ids_a[seq]), len(diff.ids_b[seq]))
        centre = diff.first_divergence[seq] or 0
        tables = [topk_pair_html(diff, seq, s, k) for s in range(max(centre - context, 0), min(centre + context + 1, n))]
        body.append("<div style='display:flex;gap:16px;flex-wrap:wrap'>" + "".join(tables) + "</div>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>tracer compare</title></head><body>"
            + "".join(body) + "</body></html>")


def compare_figure(diff: "Comparison", seq: int = 0):
    """matplotlib Figure: per-step |Δ log-prob| and KL, the first divergence as a dashed line."""
    import matplotlib.pyplot as plt

    arr = diff.arrays(seq)
    # made through pyplot so a notebook's inline backend displays it, then closed at once so
    # pyplot keeps no reference (the figure still draws and saves)
    fig = plt.figure(figsize=(7, 2.6))
    plt.close(fig)
    ax = fig.add_subplot(111)
    ax.plot(arr["step"], arr["abs_dlogprob"].astype(float), label="|Δ log-prob| (shared token)")
    ax.plot(arr["step"], arr["kl"].astype(float), label="KL(a‖b)" + ("" if arr["kl_exact"].all() else " (lower bound)"))
    div = diff.first_divergence[seq]
    if div is not None:
        ax.axvline(div, color="#c00", linestyle="--", label=f"first divergence ({div})")
    ax.set_xlabel("step")
    ax.set_yscale("symlog", linthresh=1e-6)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def compare(diff: "Comparison", seq: int = 0, k: int = 10) -> Any:
    """The interactive view: aligned tokens, a plotly plot of |Δ log-prob| and KL per step, and
    a step slider with both sides' top-k side by side (ipywidgets)."""
    import ipywidgets as W

    arr = diff.arrays(seq)
    n = int(arr["step"].size)
    div = diff.first_divergence[seq]
    tokens = W.HTML(f"<style>{_CSS}</style>" + aligned_tokens_html(diff, seq))
    try:
        import plotly.graph_objects as go

        fig = go.FigureWidget()
        fig.add_scatter(x=arr["step"], y=arr["abs_dlogprob"].astype(float), name="|Δ log-prob|")
        fig.add_scatter(x=arr["step"], y=arr["kl"].astype(float),
                        name="KL(a‖b)" + ("" if arr["kl_exact"].all() else " ≥"))
        if div is not None:
            fig.add_vline(x=div, line_dash="dash", line_color="#c00")
        fig.update_layout(height=260, margin=dict(l=40, r=10, t=20, b=30), xaxis_title="step")
        plot: Any = fig
    except ImportError:  # the static figure instead
        import io

        buf = io.BytesIO()
        compare_figure(diff, seq).savefig(buf, format="png", dpi=90)
        plot = W.Image(value=buf.getvalue(), format="png")
    slider = W.IntSlider(value=div if div is not None else 0, min=0, max=max(n - 1, 0), description="step",
                         continuous_update=False)
    tables = W.HTML(topk_pair_html(diff, seq, slider.value, k))

    def on_step(change: dict) -> None:
        tables.value = topk_pair_html(diff, seq, int(change["new"]), k)

    slider.observe(on_step, names="value")
    box = W.VBox([tokens, plot, slider, tables])
    box.slider, box.tables = slider, tables  # for tests and notebooks
    return box
