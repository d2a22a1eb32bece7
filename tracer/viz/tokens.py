"""Logit lens and the token probability strip."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from ..records import Trace

from ._common import (
    annotate_cells,
    final_entropy_of,
    esc,
    new_figure,
    figure_png,
    seq_steps,
    tok_text,
)
from .shared import prob_color, run_pieces, token_span

# --------------------------------------------------------------------------------------
# 4. Logit lens
# --------------------------------------------------------------------------------------


def logit_lens_matrix(trace: Trace, seq: int = 0, metric: str = "prob") -> tuple[np.ndarray, list[int], list[int], list[str]]:
    """`(L, S_seq)` chosen-token probability or rank per lens layer and step of ``seq``; the
    layer indices, the step indices and the chosen token texts."""
    if metric not in ("prob", "rank"):
        raise ValueError(f"metric must be 'prob' or 'rank', not {metric!r}")
    steps = [s for s in seq_steps(trace, seq) if trace.steps[s].logit_lens is not None]
    if not steps:
        raise KeyError("no logit lens recorded")
    lenses = [trace.steps[s].logit_lens for s in steps]
    field = "chosen_prob" if metric == "prob" else "chosen_rank"
    mat = np.stack([getattr(ll, field)[:, seq] for ll in lenses], axis=1)  # type: ignore[union-attr]
    _, gen = run_pieces(trace, seq)  # in context: a character split over tokens shown whole
    at = {s: n for n, s in enumerate(seq_steps(trace, seq))}
    labels = [gen[at[s]].display if at.get(s, len(gen)) < len(gen) else tok_text(trace, trace.steps[s].chosen[seq])
              for s in steps]
    return mat, list(lenses[0].layers), steps, labels  # type: ignore[union-attr]


def logit_lens_figure(trace: Trace, seq: int = 0, metric: str = "prob") -> Figure:
    """Layer × step heatmap of the chosen token's probability (or rank, log colour scale)."""
    from matplotlib.colors import SymLogNorm

    mat, layers, steps, labels = logit_lens_matrix(trace, seq, metric)
    fig = new_figure(figsize=(max(6.0, 0.4 * len(steps) + 2.5), max(3.2, 0.22 * len(layers) + 1.8)), layout="constrained")
    ax = fig.subplots()
    annotate_cells(ax, mat, "{:.2f}" if metric == "prob" else "{:d}")
    if metric == "prob":
        im = ax.imshow(mat, aspect="auto", cmap="magma", vmin=0, vmax=1, origin="lower", interpolation="nearest")
        label = "P(chosen token)"
    else:
        vmax = max(float(mat.max()), 2.0)
        im = ax.imshow(mat, aspect="auto", cmap="magma_r", norm=SymLogNorm(linthresh=1, vmin=0, vmax=vmax), origin="lower", interpolation="nearest")
        label = "rank of chosen token\n(0 = top, log colour scale)"
    ax.set_xticks(np.arange(len(steps)), labels, rotation=90, fontsize=8)
    every = max(1, int(np.ceil(len(layers) / 32)))
    ax.set_yticks(np.arange(0, len(layers), every), [str(layers[i]) for i in range(0, len(layers), every)], fontsize=8)
    ax.set_xlabel("chosen token (by step)")
    ax.set_ylabel("layer")
    ax.set_title(f"logit lens, seq {seq}: {label.splitlines()[0]} per layer", fontsize=10)
    fig.colorbar(im, ax=ax, label=label)
    return fig


def logit_lens(trace: Trace, seq: int = 0) -> Any:
    """Heatmap with a prob/rank toggle; hover names the layer's own top token."""
    import ipywidgets as W

    toggle = W.ToggleButtons(options=["prob", "rank"], value="prob")
    try:
        import plotly.graph_objects as go

        mat, layers, steps, labels = logit_lens_matrix(trace, seq, "prob")
        tops = np.stack([trace.steps[s].logit_lens.top_id[:, seq] for s in steps], axis=1)  # type: ignore[union-attr]
        hover = [[f"layer top: {esc(tok_text(trace, tops[i, j]))}" for j in range(len(steps))] for i in range(len(layers))]
        xs = [f"{s}:{lab}" for s, lab in zip(steps, labels)]
        fig = go.FigureWidget(go.Heatmap(z=mat.tolist(), x=xs, y=[str(x) for x in layers], text=hover, colorscale="Magma", zmin=0, zmax=1,
                                         hovertemplate="step %{x}<br>layer %{y}<br>value %{z}<br>%{text}<extra></extra>"))
        fig.update_layout(height=max(300, 14 * len(layers) + 120), xaxis_title="step:chosen token", yaxis_title="layer",
                          yaxis_type="category", xaxis_type="category", margin=dict(l=10, r=10, t=30, b=10))

        def on(change: dict) -> None:
            m, *_ = logit_lens_matrix(trace, seq, change["new"])
            with fig.batch_update():
                fig.data[0].z = m.tolist()
                fig.data[0].zmax = 1 if change["new"] == "prob" else float(max(m.max(), 1))
                fig.data[0].reversescale = change["new"] == "rank"

        plot: Any = fig
    except ImportError:
        plot = W.Image(value=figure_png(logit_lens_figure(trace, seq)), format="png")

        def on(change: dict) -> None:
            plot.value = figure_png(logit_lens_figure(trace, seq, change["new"]))

    toggle.observe(on, names="value")
    box = W.VBox([toggle, plot])
    box.toggle, box.plot = toggle, plot  # type: ignore[attr-defined]
    return box


# --------------------------------------------------------------------------------------
# 5. Token strip
# --------------------------------------------------------------------------------------


def token_strip_html(trace: Trace, seq: int = 0, metric: str = "prob") -> str:
    """The prompt (grey) and generated tokens of ``seq``; each generated token's background
    shows the chosen token's probability (green high, red low) or the entropy of the final
    distribution (green low); the ``title`` tooltip gives id, probability, rank and entropy.
    Characters split over several tokens are shown whole on the token that completes them
    (the earlier tokens show their bytes, escaped); the text read off the spans is the text."""
    if metric not in ("prob", "entropy"):
        raise ValueError(f"metric must be 'prob' or 'entropy', not {metric!r}")
    steps = seq_steps(trace, seq)
    found = {s: final_entropy_of(trace.steps[s], seq) for s in steps}
    ents = {s: value for s, (value, _) in found.items()}
    exact = all(is_exact for _, is_exact in found.values())
    hmax = max(list(ents.values()) + [1e-9])
    prompt, gen = run_pieces(trace, seq)
    parts = ['<span style="color:#888" title="prompt">'
             + "".join(token_span(p, cls="tr-tok") for p in prompt) + "</span>"]
    for s, piece in zip(steps, gen):
        rec = trace.steps[s]
        tid = int(rec.chosen[seq])
        p = float(rec.chosen_prob[seq])
        rank = int(rec.stages[-1].chosen_rank[seq])
        shade = p if metric == "prob" else 1.0 - ents[s] / hmax
        title = (
            f"step {s} · id {tid} · {piece.display} · p={p:.4f} · rank {rank} · "
            + (f"entropy {ents[s]:.3f} nats" if exact
               else f"entropy ≥ {ents[s]:.3f} nats (lower bound: from the recorded top-k only)")
        )
        if rec.finished[seq]:
            title += f" · stop: {rec.stop_reasons[seq]}"
        parts.append(token_span(piece, cls="tr-tok tr-gen", title=title,
                                style=f"background:{prob_color(shade)};border-radius:2px;padding:0 1px"))
    legend = (
        "colour: probability of the chosen token (red 0 → green 1)"
        if metric == "prob"
        else f"colour: entropy of the final distribution{'' if exact else ', lower bound from the top-k'} "
        f"(green 0 → red {hmax:.2f} nats)"
    )
    return (
        '<div style="font-family:monospace;white-space:pre-wrap;line-height:1.7">'
        + "".join(parts)
        + f'</div><div style="font-size:smaller;color:#666">{esc(legend)}</div>'
    )


def token_strip(trace: Trace, seq: int = 0, metric: str = "prob") -> Any:
    import ipywidgets as W

    return W.HTML(token_strip_html(trace, seq, metric))
