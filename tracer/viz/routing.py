"""MoE routing views: expert load per layer and the token × layer map of chosen experts.

Pure functions of a trace (``tracer.routing`` reads the records): static HTML tables for the
report, matplotlib figures for notebooks.  Every token string goes through ``esc``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import routing as rt
from ._common import esc, new_figure, tok_text

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from ..records import Trace

__all__ = ["routing_html", "expert_load_figure", "token_layer_figure", "routing_tokens"]


def _require(trace: Trace) -> list[int]:
    layers = rt.routing_layers(trace)
    if not layers:
        raise KeyError("no MoE routing recorded (trace with RecordConfig(routing=True) on an MoE model)")
    return layers


def routing_tokens(trace: Trace, seq: int = 0, include_prompt: bool = True) -> list[str]:
    """The display text of the tokens of :func:`tracer.routing.token_layer_map` (same order):
    the real prompt tokens, then each token fed at a decode step while the sequence generates."""
    ids: list[int] = []
    if include_prompt:
        ids += [int(t) for t, m in zip(trace.prompt_ids[seq], trace.prompt_mask[seq]) if m]
    ids += [int(before.chosen[seq]) for before, step in zip(trace.steps, trace.steps[1:]) if step.active[seq]]
    return [tok_text(trace, t) for t in ids]


def _shade(x: float) -> str:
    x = float(min(max(x, 0.0), 1.0))
    return f"rgba(228,87,46,{0.08 + 0.72 * x:.2f})"


def routing_html(trace: Trace, seq: int = 0, max_tokens: int = 96) -> str:
    """Two static tables: the expert load per layer (token slots per expert) and, for sequence
    ``seq``, each token's chosen experts per layer (top weight first, shaded by weight)."""
    _require(trace)
    layers, counts = rt.expert_load(trace)
    out = ["<p class='note'>Token slots each expert received per layer (all sequences, prompt and decode "
           "steps); the darker, the busier.</p><table class='routing'><tr><th>layer</th>"]
    out += [f"<th>e{e}</th>" for e in range(counts.shape[1])]
    out.append("</tr>")
    for layer, row in zip(layers, counts):
        top = max(int(row.max()), 1)
        out.append(f"<tr><td>{layer}</td>" + "".join(
            f"<td style='background:{_shade(c / top)}'>{int(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    layers, experts, weights = rt.token_layer_map(trace, seq)
    texts = routing_tokens(trace, seq)
    n = min(len(texts), experts.shape[0], max_tokens)
    out.append(f"<p class='note'>Sequence {seq}: the experts each token was routed to, per layer "
               "(expert:weight, highest weight first).</p><table class='routing'><tr><th>token</th>")
    out += [f"<th>L{layer}</th>" for layer in layers]
    out.append("</tr>")
    for i in range(n):
        cells = []
        for j in range(len(layers)):
            label = " ".join(f"{int(e)}:{w:.2f}" for e, w in zip(experts[i, j], weights[i, j]))
            cells.append(f"<td style='background:{_shade(weights[i, j, 0])}'>{esc(label)}</td>")
        out.append(f"<tr><td>{esc(texts[i])}</td>{''.join(cells)}</tr>")
    out.append("</table>")
    if experts.shape[0] > n:
        out.append(f"<p class='note'>{experts.shape[0] - n} more tokens not shown.</p>")
    return "".join(out)


def expert_load_figure(trace: Trace, **kw: Any) -> Figure:
    """Heatmap `(layer × expert)` of the token slots each expert received."""
    _require(trace)
    layers, counts = rt.expert_load(trace, **kw)
    fig = new_figure(figsize=(1.2 + 0.45 * counts.shape[1], 0.8 + 0.4 * len(layers)))
    ax = fig.add_subplot(111)
    im = ax.imshow(counts, aspect="auto", cmap="Oranges")
    ax.set_xticks(range(counts.shape[1]), [f"e{e}" for e in range(counts.shape[1])])
    ax.set_yticks(range(len(layers)), [str(l) for l in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title("expert load (token slots)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def token_layer_figure(trace: Trace, seq: int = 0, max_tokens: int = 64) -> Figure:
    """Token × layer map: the top expert of each token in each layer (colour = expert id,
    number = its weight)."""
    _require(trace)
    layers, experts, weights = rt.token_layer_map(trace, seq)
    texts = routing_tokens(trace, seq)[:max_tokens]
    top = experts[: len(texts), :, 0]
    fig = new_figure(figsize=(1.5 + 0.5 * len(layers), 0.8 + 0.28 * len(texts)))
    ax = fig.add_subplot(111)
    ax.imshow(top, aspect="auto", cmap="tab20", vmin=0, vmax=19, interpolation="nearest")
    for i in range(top.shape[0]):
        for j in range(top.shape[1]):
            ax.text(j, i, f"{int(top[i, j])}", ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(texts)), texts, fontsize=7)
    ax.set_xticks(range(len(layers)), [f"L{l}" for l in layers])
    ax.set_title(f"top expert per token and layer (sequence {seq})")
    fig.tight_layout()
    return fig


def load_share(trace: Trace) -> np.ndarray:
    """`(L, E)` expert load as a share of each layer's slots."""
    _, counts = rt.expert_load(trace)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
