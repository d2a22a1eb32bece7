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

import html
import io
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .records import StepRecord, Trace

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

_CHOSEN = "#e4572e"  # the chosen token, everywhere
_OTHER = "#8da0cb"


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _tok(trace: Trace, token_id: int) -> str:
    return trace.token_text.get(int(token_id), f"<{int(token_id)}>")


def _show(text: str) -> str:
    """A token's text made visible (newlines, tabs, leading spaces) for labels."""
    return text.replace("\n", "↵").replace("\t", "⇥").replace(" ", "␣") if text.strip() == "" or "\n" in text else text


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _check_step(trace: Trace, step: int) -> StepRecord:
    if not 0 <= step < trace.num_steps:
        raise IndexError(f"step {step} out of range: the trace has {trace.num_steps} steps")
    return trace.steps[step]


def _seq_steps(trace: Trace, seq: int) -> list[int]:
    """Indices of the steps at which sequence ``seq`` was still generating."""
    return [s.index for s in trace.steps if s.active[seq]]


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def _new_figure(**kw: Any) -> Figure:
    # Made through pyplot so that the notebook's inline backend is active and displays the
    # returned figure, then closed at once: pyplot keeps no reference (no leak, no double
    # display at the end of the cell) and the figure still draws and saves.
    import matplotlib.pyplot as plt

    fig = plt.figure(**kw)
    plt.close(fig)
    return fig


def _annotate(ax: Any, mat: np.ndarray, fmt: str, limit: int = 300) -> None:
    """Write each cell's value on a small heatmap (skipped above ``limit`` cells)."""
    if mat.size > limit:
        return
    from matplotlib import patheffects

    outline = [patheffects.withStroke(linewidth=2, foreground="black")]
    for (i, j), v in np.ndenumerate(mat):
        text = fmt.format(int(v) if fmt == "{:d}" else float(v))
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white", path_effects=outline)


def _params(params: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in dict(params).items()) or "—"


def _entropy_lower_bound(step: StepRecord, seq: int) -> float:
    """Entropy (nats) of the final distribution restricted to the recorded top-k: a lower
    bound on the full entropy, since every omitted term ``-p log p`` is non-negative."""
    p = step.final.probs[seq].astype(np.float64)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


# --------------------------------------------------------------------------------------
# 1. Step explorer
# --------------------------------------------------------------------------------------


def _text_so_far(trace: Trace, step: int, seq: int) -> tuple[list[int], list[int]]:
    prompt = [int(i) for i in trace.prompt_tokens(seq)]
    gen = [int(trace.steps[s].chosen[seq]) for s in range(step + 1) if trace.steps[s].active[seq]]
    return prompt, gen


def _processor_rows(step: StepRecord, seq: int) -> list[dict[str, Any]]:
    return [
        {
            "name": e.name,
            "params": _params(e.params),
            "newly_masked": int(e.newly_masked[seq]),
            "kl": float(e.kl[seq]),
            "rank_before": int(e.chosen_rank_before[seq]),
            "rank_after": int(e.chosen_rank_after[seq]),
            "prob_before": float(e.chosen_prob_before[seq]),
            "prob_after": float(e.chosen_prob_after[seq]),
        }
        for e in step.processors
    ]


def step_text(trace: Trace, step: int, seq: int = 0) -> str:
    """Everything the step explorer shows for one step, as plain text."""
    rec = _check_step(trace, step)
    lines = [f"step {step} ({rec.kind}), sequence {seq}"]
    if not rec.active[seq]:
        lines.append(f"sequence {seq} had already finished ({trace.stop_reasons[seq]})")
        return "\n".join(lines)
    prompt, gen = _text_so_far(trace, step, seq)
    lines.append("text: " + trace.text_of(prompt) + trace.text_of(gen[:-1]) + "[[" + _tok(trace, gen[-1]) + "]]")
    inp = rec.inputs
    ids = [int(i) for i in inp.input_ids[seq]]
    lines.append("inputs:")
    lines.append(f"  input_ids      {ids}")
    lines.append(f"  tokens         {[_tok(trace, i) for i in ids]}")
    lines.append(f"  cache_position {inp.cache_position.tolist()}")
    pos = None if inp.position_ids is None else inp.position_ids[seq].tolist()
    lines.append(f"  position_ids   {pos}")
    lines.append(f"  cache length before {inp.cache_len_before}, attention mask shape {inp.attention_mask_shape}")
    chosen = int(rec.chosen[seq])
    argmax = int(rec.final.ids[seq, 0])
    how = "sampled" if rec.sampled else "argmax"
    lines.append(
        f"chosen: {chosen} {_tok(trace, chosen)!r}  p={float(rec.chosen_prob[seq]):.4f}  "
        f"rank {int(rec.stages[-1].chosen_rank[seq])}  ({how}; argmax {argmax} {_tok(trace, argmax)!r})"
    )
    lines.append("processors:")
    header = f"  {'name':<34} {'params':<28} {'masked':>6} {'KL':>8}  rank      prob"
    lines.append(header)
    for r in _processor_rows(rec, seq):
        lines.append(
            f"  {r['name']:<34} {r['params']:<28} {r['newly_masked']:>6} {r['kl']:>8.4f}  "
            f"{r['rank_before']}→{r['rank_after']:<5} {r['prob_before']:.4f}→{r['prob_after']:.4f}"
        )
    lines.append("top-k per stage (prob):")
    for st in rec.stages:
        probs = st.top.probs[seq]
        cells = [
            ("*" if int(i) == chosen else "") + f"{_tok(trace, i)!r}:{p:.3f}" for i, p in zip(st.top.ids[seq], probs)
        ]
        lines.append(f"  {st.name:<34} " + "  ".join(cells))
    if rec.finished[seq]:
        lines.append(f"stop: {rec.stop_reasons[seq]}")
    return "\n".join(lines)


def _text_html(trace: Trace, step: int, seq: int) -> str:
    rec = trace.steps[step]
    if not rec.active[seq]:
        return f"<i>sequence {seq} had already finished ({_esc(trace.stop_reasons[seq])})</i>"
    prompt, gen = _text_so_far(trace, step, seq)
    out = [f'<span style="color:#777">{_esc(trace.text_of(prompt))}</span>', _esc(trace.text_of(gen[:-1]))]
    cur = int(gen[-1])
    out.append(
        f'<span style="background:{_CHOSEN};color:white;border-radius:3px;padding:0 2px" '
        f'title="id {cur}">{_esc(_show(_tok(trace, cur)))}</span>'
    )
    stop = ""
    if rec.finished[seq]:
        stop = f'<div style="color:{_CHOSEN};font-weight:bold">stopped: {_esc(str(rec.stop_reasons[seq]))}</div>'
    return '<div style="white-space:pre-wrap;font-family:monospace">' + "".join(out) + "</div>" + stop


def _inputs_html(trace: Trace, step: int, seq: int) -> str:
    rec = trace.steps[step]
    inp = rec.inputs
    ids = [int(i) for i in inp.input_ids[seq]]
    toks = " ".join(f"<code>{_esc(_show(_tok(trace, i)))}</code>" for i in ids)
    pos = "None" if inp.position_ids is None else str(inp.position_ids[seq].tolist())
    rows = [
        ("input_ids", _esc(str(ids))),
        ("tokens", toks),
        ("cache_position", _esc(str(inp.cache_position.tolist()))),
        ("position_ids", _esc(pos)),
        ("cache length before", str(inp.cache_len_before)),
        ("attention mask shape", _esc(str(inp.attention_mask_shape))),
    ]
    body = "".join(f"<tr><th style='text-align:left'>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<b>model inputs, step {step} ({rec.kind})</b><table>{body}</table>"


def _table_html(trace: Trace, step: int, seq: int) -> str:
    rec = trace.steps[step]
    if not rec.active[seq]:
        return ""
    chosen = int(rec.chosen[seq])
    argmax = int(rec.final.ids[seq, 0])
    how = "sampled" if rec.sampled else "argmax"
    head = (
        f"<div><b>chosen</b> <code>{_esc(_show(_tok(trace, chosen)))}</code> (id {chosen}) "
        f"p={float(rec.chosen_prob[seq]):.4f}, rank {int(rec.stages[-1].chosen_rank[seq])}, {how}; "
        f"argmax <code>{_esc(_show(_tok(trace, argmax)))}</code> (id {argmax})</div>"
    )
    cols = ["processor", "params", "newly masked", "KL (nats)", "chosen rank", "chosen prob"]
    th = "".join(f"<th>{c}</th>" for c in cols)
    trs = []
    for r in _processor_rows(rec, seq):
        trs.append(
            f"<tr><td>{_esc(r['name'])}</td><td>{_esc(r['params'])}</td><td>{r['newly_masked']}</td>"
            f"<td>{r['kl']:.4f}</td><td>{r['rank_before']} → {r['rank_after']}</td>"
            f"<td>{r['prob_before']:.4f} → {r['prob_after']:.4f}</td></tr>"
        )
    stop = f"<div><b>stop reason:</b> {_esc(str(rec.stop_reasons[seq]))}</div>" if rec.finished[seq] else ""
    return head + f"<table><tr>{th}</tr>{''.join(trs)}</table>" + stop


def _waterfall_data(trace: Trace, step: int, seq: int) -> list[tuple[str, list[str], np.ndarray, list[bool], int]]:
    rec = trace.steps[step]
    chosen = int(rec.chosen[seq])
    out = []
    for st in rec.stages:
        ids = [int(i) for i in st.top.ids[seq]]
        out.append(
            (
                st.name,
                [f"{_show(_tok(trace, i))} ({i})" for i in ids],
                st.top.probs[seq],
                [i == chosen for i in ids],
                int(st.chosen_rank[seq]),
            )
        )
    return out


def processor_waterfall_figure(trace: Trace, step: int, seq: int = 0) -> Figure:
    """One bar chart per stage (raw logits, then each processor): the top-k candidates'
    probabilities, the chosen token in orange."""
    rec = _check_step(trace, step)
    data = _waterfall_data(trace, step, seq)
    n = len(data)
    fig = _new_figure(figsize=(3.2 * n, 0.35 * max(len(d[1]) for d in data) + 1.6), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (name, labels, probs, is_chosen, rank) in zip(axes, data):
        y = np.arange(len(labels))
        bars = ax.barh(y, probs, color=[_CHOSEN if c else _OTHER for c in is_chosen])
        ax.bar_label(bars, [f"{p:.3g}" for p in probs], fontsize=7, padding=2)
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.18)
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1])
        ax.set_xlabel("probability")
        ax.set_title(f"{name}\nchosen rank {rank}", fontsize=9)
    fig.suptitle(f"step {step} ({rec.kind}), seq {seq}: top-{len(data[0][1])} after each stage", fontsize=10)
    return fig


_CLASSES: dict[str, type] = {}  # widget classes, built on first use (ipywidgets imported lazily)


def _step_explorer_class() -> type:
    import ipywidgets as W

    if "StepExplorer" in _CLASSES:
        return _CLASSES["StepExplorer"]

    class _StepExplorer(W.VBox):
        """Slider over steps; ``.slider``, ``.play``, ``.text_html``, ``.inputs_html``,
        ``.table_html`` and ``.waterfall`` (plotly ``FigureWidget`` or ``Image``)."""

        def __init__(self, trace: Trace, seq: int = 0):
            self.trace, self.seq = trace, seq
            last = max(trace.num_steps - 1, 0)
            self.slider = W.IntSlider(value=0, min=0, max=last, description="step", continuous_update=False)
            self.play = W.Play(value=0, min=0, max=last, interval=700, description="play")
            W.jslink((self.play, "value"), (self.slider, "value"))
            self.text_html = W.HTML()
            self.inputs_html = W.HTML()
            self.table_html = W.HTML()
            self.waterfall = _make_waterfall_widget(trace, seq)
            self.slider.observe(self._on_step, names="value")
            super().__init__(
                [
                    W.HBox([self.play, self.slider]),
                    self.text_html,
                    W.HBox([self.inputs_html, self.table_html]),
                    self.waterfall,
                ]
            )
            self.update(0)

        def _on_step(self, change: dict) -> None:
            self.update(int(change["new"]))

        def update(self, step: int) -> None:
            t, s = self.trace, self.seq
            self.text_html.value = _text_html(t, step, s)
            self.inputs_html.value = _inputs_html(t, step, s)
            self.table_html.value = _table_html(t, step, s)
            _update_waterfall_widget(self.waterfall, t, step, s)

    _StepExplorer.__name__ = _StepExplorer.__qualname__ = "StepExplorer"
    _CLASSES["StepExplorer"] = _StepExplorer
    return _StepExplorer


def _make_waterfall_widget(trace: Trace, seq: int) -> Any:
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        names = [st.name for st in trace.steps[0].stages]
        fig = go.FigureWidget(make_subplots(rows=1, cols=len(names), subplot_titles=names, horizontal_spacing=0.08))
        for i in range(len(names)):
            fig.add_bar(x=[], y=[], orientation="h", row=1, col=i + 1, showlegend=False, hovertemplate="%{y}: %{x:.4f}<extra></extra>")
            fig.update_yaxes(autorange="reversed", row=1, col=i + 1)
            fig.update_xaxes(range=[0, 1], row=1, col=i + 1)
        fig.update_layout(height=320, margin=dict(l=10, r=10, t=40, b=10))
        fig._tracer_kind = "plotly"  # type: ignore[attr-defined]
        return fig
    except ImportError:  # plotly or anywidget missing: a rendered PNG instead
        import ipywidgets as W

        return W.Image(format="png")


def _update_waterfall_widget(widget: Any, trace: Trace, step: int, seq: int) -> None:
    rec = trace.steps[step]
    if getattr(widget, "_tracer_kind", None) == "plotly":
        data = _waterfall_data(trace, step, seq) if rec.active[seq] else []
        with widget.batch_update():
            for i, bar in enumerate(widget.data):
                if i < len(data):
                    _, labels, probs, is_chosen, _ = data[i]
                    bar.x, bar.y = probs.tolist(), labels
                    bar.marker.color = [_CHOSEN if c else _OTHER for c in is_chosen]
                else:
                    bar.x, bar.y = [], []
    else:
        widget.value = _png(processor_waterfall_figure(trace, step, seq)) if rec.active[seq] else b""


def step_explorer(trace: Trace, seq: int = 0) -> Any:
    """Interactive walk through the steps of ``seq``; see :func:`step_text` for the contents."""
    return _step_explorer_class()(trace, seq)


# --------------------------------------------------------------------------------------
# 2. Attention grid
# --------------------------------------------------------------------------------------


def _require_attention(trace: Trace) -> None:
    if not trace.attention_layers or not trace.attention_heads:
        raise KeyError("no attention maps recorded (RecordConfig(attention=True))")


def _position_labels(trace: Trace, seq: int, n: int) -> list[str]:
    ids = trace.sequences[seq][:n]
    pad = [j < trace.prompt_len and not trace.prompt_mask[seq][j] for j in range(len(ids))]
    return ["·" if pad[j] else _show(_tok(trace, i)) for j, i in enumerate(ids)]


def attention_maps(
    trace: Trace,
    step: int = 0,
    seq: int = 0,
    *,
    kv_heads: bool = False,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, list[int], list[int]]:
    """`(L, N, T, T)` assembled maps up to ``step`` (``T = P + step``), the layer list and the
    head list (query heads, or KV heads when ``kv_heads``: the mean of the recorded query heads
    that read each KV head)."""
    _require_attention(trace)
    _check_step(trace, step)
    layers = list(trace.attention_layers if layers is None else layers)
    qheads = list(trace.attention_heads if heads is None else heads)
    if kv_heads:
        groups: dict[int, list[int]] = {}
        for h in trace.attention_heads:
            groups.setdefault(trace.kv_head_of[h], []).append(h)
        names = sorted(groups) if heads is None else [k for k in sorted(groups) if k in heads]
    out = []
    for i, layer in enumerate(layers):
        if kv_heads:
            out.append(
                [np.mean([trace.head_map(layer, h, seq, upto_step=step) for h in groups[k]], axis=0) for k in names]
            )
        else:
            out.append([trace.head_map(layer, h, seq, upto_step=step) for h in qheads])
        if progress is not None:
            progress(i + 1, len(layers))
    return np.asarray(out, dtype=np.float32), layers, (names if kv_heads else qheads)


def attention_grid_figure(
    trace: Trace,
    step: int = 0,
    seq: int = 0,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    *,
    kv_heads: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Figure:
    """Small multiples, layers × heads, of the maps assembled up to ``step``."""
    maps, lay, hs = attention_maps(trace, step, seq, kv_heads=kv_heads, layers=layers, heads=heads, progress=progress)
    nl, nh = maps.shape[:2]
    what = "KV heads (mean of query heads)" if kv_heads else "query heads"
    title = f"attention up to step {step}, seq {seq}\nlayers × {what}"
    if nl * nh > 48:
        return _mosaic_figure(maps, lay, hs, title, "kv" if kv_heads else "h")
    cell = 1.3
    fig = _new_figure(figsize=(max(4.5, cell * nh + 1.2), cell * nl + 1.0), layout="constrained")
    axes = fig.subplots(nl, nh, squeeze=False)
    im = None
    for i in range(nl):
        for j in range(nh):
            ax = axes[i, j]
            im = ax.imshow(maps[i, j], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"{'kv' if kv_heads else 'h'}{hs[j]}", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"L{lay[i]}", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.6, label="attention weight")
    fig.suptitle(title, fontsize=10)
    return fig


def _mosaic_figure(maps: np.ndarray, layers: list[int], heads: list[int], title: str, prefix: str) -> Figure:
    """Many small multiples as one image (one ``imshow`` instead of hundreds of axes)."""
    nl, nh, t, _ = maps.shape
    gap = max(1, t // 8)
    big = np.full((nl * (t + gap) - gap, nh * (t + gap) - gap), np.nan, dtype=np.float32)
    for i in range(nl):
        for j in range(nh):
            big[i * (t + gap) : i * (t + gap) + t, j * (t + gap) : j * (t + gap) + t] = maps[i, j]
    fig = _new_figure(figsize=(min(16.0, 0.7 * nh + 2.5), min(40.0, 0.7 * nl + 1.2)), layout="constrained")
    ax = fig.subplots()
    cmap = __import__("matplotlib").colormaps["viridis"].with_extremes(bad="white")
    im = ax.imshow(big, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    centers = np.arange(0, max(nl, nh)) * (t + gap) + (t - 1) / 2
    ax.set_xticks(centers[:nh], [f"{prefix}{h}" for h in heads], fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks(centers[:nl], [f"L{layer}" for layer in layers], fontsize=7)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.tick_params(length=0)
    fig.colorbar(im, ax=ax, shrink=0.3, label="attention weight")
    fig.suptitle(title, fontsize=10)
    return fig


def _map_axes(fig: Figure, ax: Any, m: np.ndarray, labels: list[str], title: str, prompt_len: int) -> None:
    im = ax.imshow(m, cmap="viridis", vmin=0, vmax=max(float(m.max()), 1e-6), interpolation="nearest")
    n = m.shape[0]
    every = max(1, int(np.ceil(n / 40)))
    ticks = np.arange(0, n, every)
    ax.set_xticks(ticks, [labels[t] for t in ticks], rotation=90, fontsize=7)
    ax.set_yticks(ticks, [labels[t] for t in ticks], fontsize=7)
    ax.axhline(prompt_len - 0.5, color="white", lw=0.6, ls="--")
    ax.set_xlabel("key (attended) token")
    ax.set_ylabel("query token")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8, label="attention weight")


def head_map_figure(trace: Trace, layer: int, head: int, seq: int = 0, *, upto_step: int | None = None, kv_heads: bool = False) -> Figure:
    """One head (or one KV head's group mean) across all steps (or up to ``upto_step``), with
    token labels; the dashed line separates the prompt (prefill) rows from decode rows."""
    _require_attention(trace)
    step = trace.num_steps - 1 if upto_step is None else upto_step
    maps, _, _ = attention_maps(trace, step, seq, kv_heads=kv_heads, layers=[layer], heads=[head])
    m = maps[0, 0]
    labels = _position_labels(trace, seq, m.shape[0])
    size = min(12.0, 2.5 + 0.22 * m.shape[0])
    fig = _new_figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.subplots()
    kind = "KV head" if kv_heads else "head"
    _map_axes(fig, ax, m, labels, f"layer {layer}, {kind} {head}, seq {seq} (steps 0–{step})", trace.prompt_len)
    return fig


def _attention_grid_class() -> type:
    import ipywidgets as W

    if "AttentionGrid" in _CLASSES:
        return _CLASSES["AttentionGrid"]

    class _AttentionGrid(W.VBox):
        """``.step`` slider, ``.mode`` toggle ("query heads" / "KV heads"), ``.pick`` dropdown
        of (layer, head), ``.progress``, ``.grid`` and ``.detail`` images; ``.maps`` holds the
        arrays on display `(L, N, T, T)`."""

        def __init__(self, trace: Trace, step: int = 0, seq: int = 0):
            _require_attention(trace)
            self.trace, self.seq = trace, seq
            self.step = W.IntSlider(value=step, min=0, max=trace.num_steps - 1, description="step", continuous_update=False)
            self.mode = W.ToggleButtons(options=["query heads", "KV heads"], value="query heads")
            self.pick = W.Dropdown(description="enlarge")
            self.progress = W.IntProgress(value=0, min=0, max=len(trace.attention_layers), description="rendering")
            self.status = W.Label()
            self.grid = W.Image(format="png")
            self.detail = W.Image(format="png")
            self.maps = np.zeros((0,))
            self._busy = False
            for w in (self.step, self.mode):
                w.observe(self._rebuild, names="value")
            self.pick.observe(self._redetail, names="value")
            super().__init__(
                [W.HBox([self.step, self.mode]), W.HBox([self.progress, self.status]), W.HBox([self.grid, W.VBox([self.pick, self.detail])])]
            )
            self._rebuild()

        @property
        def kv_mode(self) -> bool:
            return self.mode.value == "KV heads"

        def _tick(self, done: int, total: int) -> None:
            self.progress.max = total
            self.progress.value = done
            self.status.value = f"layer {done}/{total}"

        def _rebuild(self, *_: Any) -> None:
            t = self.trace
            self.progress.value = 0
            self.maps, self.layers, self.heads = attention_maps(t, self.step.value, self.seq, kv_heads=self.kv_mode, progress=self._tick)
            self.grid.value = _png(attention_grid_figure(t, self.step.value, self.seq, kv_heads=self.kv_mode))
            kind = "kv" if self.kv_mode else "h"
            opts = [(f"L{layer} {kind}{h}", (layer, h)) for layer in self.layers for h in self.heads]
            old = self.pick.value
            self._busy = True
            self.pick.options = opts
            self.pick.value = old if old in dict(opts).values() else opts[0][1]
            self._busy = False
            self._redetail()
            self.status.value = "done"

        def _redetail(self, *_: Any) -> None:
            if self._busy or self.pick.value is None:
                return
            layer, h = self.pick.value
            m = self.maps[self.layers.index(layer), self.heads.index(h)]
            labels = _position_labels(self.trace, self.seq, m.shape[0])
            fig = _new_figure(figsize=(min(9.0, 2.5 + 0.2 * m.shape[0]) + 1, min(9.0, 2.5 + 0.2 * m.shape[0])), layout="constrained")
            kind = "KV head" if self.kv_mode else "head"
            _map_axes(fig, fig.subplots(), m, labels, f"layer {layer}, {kind} {h}, step {self.step.value}", self.trace.prompt_len)
            self.detail.value = _png(fig)

    _AttentionGrid.__name__ = _AttentionGrid.__qualname__ = "AttentionGrid"
    _CLASSES["AttentionGrid"] = _AttentionGrid
    return _AttentionGrid


def attention_grid(trace: Trace, step: int = 0, seq: int = 0) -> Any:
    """Layers × heads small multiples with a query-head / KV-head toggle and an enlarged view."""
    return _attention_grid_class()(trace, step, seq)


# --------------------------------------------------------------------------------------
# 3. Cache growth
# --------------------------------------------------------------------------------------


def _require_cache(trace: Trace) -> Any:
    if trace.cache is None:
        raise KeyError("no cache timeline recorded")
    return trace.cache


def _cache_series(trace: Trace) -> dict[str, np.ndarray]:
    c = _require_cache(trace)
    out = {"measured": c.total_bytes, "predicted": c.predicted_bytes()}
    if not np.array_equal(c.allocated_len, c.kept_len):
        out["predicted (allocated)"] = c.predicted_bytes(allocated=True)
    kv = c.layers[0].kv_heads if c.layers else 0
    if trace.meta.num_heads and trace.meta.num_heads != kv:
        out["predicted without GQA"] = c.predicted_bytes(query_heads=trace.meta.num_heads)
    return out


def cache_text(trace: Trace) -> str:
    """The cache timeline as a table: per step lengths and measured vs predicted bytes."""
    c = _require_cache(trace)
    series = _cache_series(trace)
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
    return "\n".join(lines)


def cache_growth_figure(trace: Trace) -> Figure:
    """Left: per-layer kept length (solid) and allocated length (dashed, where it differs) vs
    step.  Right: total bytes measured vs the memory model's prediction (and without GQA).
    Lines carry labels ``layer {i} kept`` / ``layer {i} allocated`` / the series names."""
    c = _require_cache(trace)
    steps = np.arange(c.seq_len.shape[0])
    fig = _new_figure(figsize=(11, 4), layout="constrained")
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
    for name, ys in _cache_series(trace).items():
        style = {"measured": dict(lw=2.5, color="black"), "predicted": dict(lw=1.2, ls="--", color=_CHOSEN)}.get(name, dict(lw=1, ls=":"))
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
    table = W.HTML("<pre>" + _esc(cache_text(trace)) + "</pre>")
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        steps = list(range(c.seq_len.shape[0]))
        fig = go.FigureWidget(make_subplots(rows=1, cols=2, subplot_titles=["length per layer", "total bytes"]))
        for i in range(c.num_layers):
            fig.add_scatter(x=steps, y=c.kept_len[:, i].tolist(), name=f"layer {i} kept", mode="lines", row=1, col=1, legendgroup="len", showlegend=c.num_layers <= 8)
            if not np.array_equal(c.allocated_len[:, i], c.kept_len[:, i]):
                fig.add_scatter(x=steps, y=c.allocated_len[:, i].tolist(), name=f"layer {i} allocated", mode="lines", line=dict(dash="dash"), row=1, col=1, showlegend=False)
        for name, ys in _cache_series(trace).items():
            fig.add_scatter(x=steps, y=ys.tolist(), name=name, mode="lines+markers" if name == "measured" else "lines", row=1, col=2)
        fig.update_xaxes(title_text="step")
        fig.update_layout(height=360, margin=dict(l=10, r=10, t=40, b=10))
        plot: Any = fig
    except ImportError:
        plot = W.Image(value=_png(cache_growth_figure(trace)), format="png")
    return W.VBox([plot, table])


# --------------------------------------------------------------------------------------
# 4. Logit lens
# --------------------------------------------------------------------------------------


def logit_lens_matrix(trace: Trace, seq: int = 0, metric: str = "prob") -> tuple[np.ndarray, list[int], list[int], list[str]]:
    """`(L, S_seq)` chosen-token probability or rank per lens layer and step of ``seq``; the
    layer indices, the step indices and the chosen token texts."""
    if metric not in ("prob", "rank"):
        raise ValueError(f"metric must be 'prob' or 'rank', not {metric!r}")
    steps = [s for s in _seq_steps(trace, seq) if trace.steps[s].logit_lens is not None]
    if not steps:
        raise KeyError("no logit lens recorded")
    lenses = [trace.steps[s].logit_lens for s in steps]
    field = "chosen_prob" if metric == "prob" else "chosen_rank"
    mat = np.stack([getattr(ll, field)[:, seq] for ll in lenses], axis=1)  # type: ignore[union-attr]
    labels = [_show(_tok(trace, trace.steps[s].chosen[seq])) for s in steps]
    return mat, list(lenses[0].layers), steps, labels  # type: ignore[union-attr]


def logit_lens_figure(trace: Trace, seq: int = 0, metric: str = "prob") -> Figure:
    """Layer × step heatmap of the chosen token's probability (or rank, log colour scale)."""
    from matplotlib.colors import SymLogNorm

    mat, layers, steps, labels = logit_lens_matrix(trace, seq, metric)
    fig = _new_figure(figsize=(max(6.0, 0.4 * len(steps) + 2.5), max(3.2, 0.22 * len(layers) + 1.8)), layout="constrained")
    ax = fig.subplots()
    _annotate(ax, mat, "{:.2f}" if metric == "prob" else "{:d}")
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
        hover = [[f"layer top: {_esc(_tok(trace, tops[i, j]))}" for j in range(len(steps))] for i in range(len(layers))]
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
        plot = W.Image(value=_png(logit_lens_figure(trace, seq)), format="png")

        def on(change: dict) -> None:
            plot.value = _png(logit_lens_figure(trace, seq, change["new"]))

    toggle.observe(on, names="value")
    box = W.VBox([toggle, plot])
    box.toggle, box.plot = toggle, plot  # type: ignore[attr-defined]
    return box


# --------------------------------------------------------------------------------------
# 5. Token strip
# --------------------------------------------------------------------------------------


def _color(x: float) -> str:
    """0 → red, 1 → green, light enough to read black text on."""
    x = float(np.clip(x, 0.0, 1.0))
    return f"hsl({int(120 * x)}, 70%, 78%)"


def token_strip_html(trace: Trace, seq: int = 0, metric: str = "prob") -> str:
    """The prompt (grey) and generated tokens of ``seq``; each generated token's background
    shows the chosen token's probability (green high, red low) or the entropy of the final
    distribution (green low); the ``title`` tooltip gives id, probability, rank and entropy."""
    if metric not in ("prob", "entropy"):
        raise ValueError(f"metric must be 'prob' or 'entropy', not {metric!r}")
    steps = _seq_steps(trace, seq)
    ents = {s: _entropy_lower_bound(trace.steps[s], seq) for s in steps}
    hmax = max(list(ents.values()) + [1e-9])
    parts = [f'<span style="color:#888" title="prompt">{_esc(trace.text_of(trace.prompt_tokens(seq)))}</span>']
    for s in steps:
        rec = trace.steps[s]
        tid = int(rec.chosen[seq])
        p = float(rec.chosen_prob[seq])
        rank = int(rec.stages[-1].chosen_rank[seq])
        shade = p if metric == "prob" else 1.0 - ents[s] / hmax
        title = (
            f"step {s} · id {tid} · p={p:.4f} · rank {rank} · "
            f"entropy ≥ {ents[s]:.3f} nats (lower bound: from the recorded top-k only)"
        )
        if rec.finished[seq]:
            title += f" · stop: {rec.stop_reasons[seq]}"
        parts.append(
            f'<span style="background:{_color(shade)};border-radius:2px;padding:0 1px" title="{_esc(title)}">'
            f"{_esc(_show(_tok(trace, tid)))}</span>"
        )
    legend = (
        "colour: probability of the chosen token (red 0 → green 1)"
        if metric == "prob"
        else f"colour: entropy of the final distribution, lower bound from the top-k (green 0 → red {hmax:.2f} nats)"
    )
    return (
        '<div style="font-family:monospace;white-space:pre-wrap;line-height:1.7">'
        + "".join(parts)
        + f'</div><div style="font-size:smaller;color:#666">{_esc(legend)}</div>'
    )


def token_strip(trace: Trace, seq: int = 0, metric: str = "prob") -> Any:
    import ipywidgets as W

    return W.HTML(token_strip_html(trace, seq, metric))


# --------------------------------------------------------------------------------------
# 6. Attention sinks and head statistics
# --------------------------------------------------------------------------------------


def _head_means(trace: Trace, seq: int) -> tuple[dict[str, np.ndarray], list[int], list[int]]:
    """Per-(layer, head) means over decode steps of ``seq`` (the prefill if there are none)."""
    table = trace.attention_stats_table()
    with_stats = [s.index for s in trace.steps if s.attention_stats is not None]
    rows = [i for i, s in enumerate(with_stats) if s > 0 and trace.steps[s].active[seq]] or [0]
    means = {k: table[k][rows, :, seq, :].astype(np.float64).mean(axis=0) for k in ("entropy", "sink")}
    first = next(s for s in trace.steps if s.attention_stats is not None)
    layers = list(first.attention_stats.layers)  # type: ignore[union-attr]
    heads = list(trace.attention_heads) or list(range(means["sink"].shape[1]))
    return means, layers, heads


def attention_sinks_figure(trace: Trace, seq: int = 0) -> Figure:
    """Layer × head heatmap of the mean weight on the first attended key over decode steps."""
    means, layers, heads = _head_means(trace, seq)
    sink = means["sink"]
    fig = _new_figure(figsize=(max(5.0, 0.45 * len(heads) + 2.2), max(3.2, 0.2 * len(layers) + 1.6)), layout="constrained")
    ax = fig.subplots()
    _annotate(ax, sink, "{:.2f}")
    im = ax.imshow(sink, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower", interpolation="nearest")
    ax.set_xticks(np.arange(len(heads)), [str(h) for h in heads], fontsize=8)
    every = max(1, int(np.ceil(len(layers) / 32)))
    ax.set_yticks(np.arange(0, len(layers), every), [str(layers[i]) for i in range(0, len(layers), every)], fontsize=8)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(f"attention sinks, seq {seq}\nmean weight on the first token over decode steps", fontsize=10)
    fig.colorbar(im, ax=ax, label="mean sink weight")
    return fig


def head_stats_text(trace: Trace, top: int = 10, seq: int = 0) -> str:
    """The heads with the lowest mean entropy (focused) and the highest mean sink weight."""
    means, layers, heads = _head_means(trace, seq)
    ent, sink = means["entropy"], means["sink"]
    cells = [(li, hi) for li in range(len(layers)) for hi in range(len(heads))]
    lines = [f"head statistics, seq {seq}, mean over decode steps (last query row)"]
    lines.append(f"lowest entropy (most focused), top {top}:")
    for li, hi in sorted(cells, key=lambda c: ent[c])[:top]:
        lines.append(f"  layer {layers[li]:>3} head {heads[hi]:>3}  entropy {ent[li, hi]:.3f} nats  sink {sink[li, hi]:.3f}")
    lines.append(f"highest sink weight, top {top}:")
    for li, hi in sorted(cells, key=lambda c: -sink[c])[:top]:
        lines.append(f"  layer {layers[li]:>3} head {heads[hi]:>3}  sink {sink[li, hi]:.3f}  entropy {ent[li, hi]:.3f} nats")
    return "\n".join(lines)


def __getattr__(name: str) -> Any:
    """``viz.StepExplorer`` / ``viz.AttentionGrid``: the widget classes, built on first access
    so that importing this module does not import ipywidgets."""
    if name == "StepExplorer":
        return _step_explorer_class()
    if name == "AttentionGrid":
        return _attention_grid_class()
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
    if any(s.attention_stats is not None for s in trace.steps):
        img = W.Image(value=_png(attention_sinks_figure(trace, seq)), format="png")
        tabs.append(("heads", W.VBox([img, W.HTML("<pre>" + _esc(head_stats_text(trace, seq=seq)) + "</pre>")])))
    if trace.cache is not None:
        tabs.append(("cache", cache_growth(trace)))
    if any(s.logit_lens is not None for s in trace.steps):
        tabs.append(("logit lens", logit_lens(trace, seq)))
    tab = W.Tab(children=[w for _, w in tabs])
    for i, (name, _) in enumerate(tabs):
        tab.set_title(i, name)
    return tab
