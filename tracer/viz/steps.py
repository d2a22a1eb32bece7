"""Step explorer: text so far, model inputs, processor waterfall, choice and stop."""

from __future__ import annotations

import html

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from ..records import StepRecord, Trace

from ..text import Piece, running_text, safe_lines
from .shared import input_pieces, run_pieces, token_span, top_candidates
from ._common import (
    CHOSEN,
    CHOSEN_LIGHT,
    CLASSES,
    OTHER,
    check_step,
    esc,
    new_figure,
    params_text,
    figure_png,
    tok_text,
)

# --------------------------------------------------------------------------------------
# 1. Step explorer
# --------------------------------------------------------------------------------------


def _text_so_far(trace: Trace, step: int, seq: int) -> tuple[list[Piece], list[Piece]]:
    """Pieces of the prompt and of the tokens generated up to ``step`` (decoded as one run)."""
    prompt, gen = run_pieces(trace, seq)
    n = sum(1 for s in range(step + 1) if trace.steps[s].active[seq])
    return prompt, gen[:n]


def _fed(trace: Trace, step: int, seq: int, prompt: list[Piece], gen: list[Piece]) -> list[Piece]:
    """Pieces of the tokens fed at ``step``, shown as in the run (:func:`.shared.input_pieces`;
    ``prompt, gen``: :func:`_text_so_far`'s): a token completing a character shows it whole, as
    it did when it was chosen."""
    end = len(prompt) + len(gen) - (1 if trace.steps[step].active[seq] else 0)  # this step's own choice is not fed
    return input_pieces(trace, trace.steps[step].inputs.input_ids[seq], prompt + gen, end)


def _slots(inp: Any) -> list[int] | None:
    """The cache slots written this step (computed from the cache length, not fed by
    generate): ``cache_slots`` in newer traces, ``cache_position`` in older ones."""
    slots = getattr(inp, "cache_slots", None)
    if slots is None:
        slots = getattr(inp, "cache_position", None)
    return None if slots is None else np.asarray(slots).ravel().tolist()


def _quoted(items: list[str]) -> str:
    """A list of display strings (already escaped by :mod:`tracer.text`) without repr's
    doubled backslashes."""
    return "[" + ", ".join(f"'{x}'" for x in items) + "]"


def _processor_rows(step: StepRecord, seq: int) -> list[dict[str, Any]]:
    return [
        {
            "name": e.name,
            "params": params_text(e.params),
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
    rec = check_step(trace, step)
    lines = [f"step {step} ({rec.kind}), sequence {seq}"]
    if not rec.active[seq]:
        lines.append(f"sequence {seq} had already finished ({trace.stop_reasons[seq]})")
        return safe_lines("\n".join(lines))
    prompt, gen = _text_so_far(trace, step, seq)
    lines.append("text: " + running_text(prompt) + running_text(gen[:-1]) + "[[" + gen[-1].display + "]]")
    inp = rec.inputs
    ids = [int(i) for i in inp.input_ids[seq]]
    lines.append("inputs:")
    lines.append(f"  input_ids      {ids}")
    lines.append(f"  tokens         {_quoted([p.display for p in _fed(trace, step, seq, prompt, gen)])}")
    pos = None if inp.position_ids is None else inp.position_ids[seq].tolist()
    lines.append(f"  position_ids   {pos}  (as fed to forward)")
    lines.append(f"  cache slots    {_slots(inp)}  (computed from the cache length)")
    lines.append(f"  cache length before {inp.cache_len_before}, attention mask shape {inp.attention_mask_shape or 'none (no padding)'}")
    chosen = int(rec.chosen[seq])
    argmax = int(rec.final.ids[seq, 0])
    how = "sampled" if rec.sampled else "argmax"
    own = tok_text(trace, chosen)
    shown = gen[-1].display + ("" if gen[-1].display == own else f" (token bytes '{own}')")
    lines.append(
        f"chosen: {chosen} '{shown}'  p={float(rec.chosen_prob[seq]):.4f}  "
        f"rank {int(rec.stages[-1].chosen_rank[seq])}  ({how}; argmax {argmax} '{tok_text(trace, argmax)}')"
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
        ids_k, probs, masked = top_candidates(trace, st.top, seq)
        cells = [("*" if i == chosen else "") + f"'{tok_text(trace, i)}':{p:.3f}" for i, p in zip(ids_k, probs)]
        if masked:
            cells.append(f"+{masked} masked")
        lines.append(f"  {st.name:<34} " + "  ".join(cells))
    if rec.finished[seq]:
        lines.append(f"stop: {rec.stop_reasons[seq]}")
    return safe_lines("\n".join(lines))


def _text_html(trace: Trace, step: int, seq: int) -> str:
    rec = trace.steps[step]
    if not rec.active[seq]:
        return f"<i>sequence {seq} had already finished ({esc(trace.stop_reasons[seq])})</i>"
    prompt, gen = _text_so_far(trace, step, seq)
    out = ['<span style="color:#777">' + "".join(token_span(p, cls="") for p in prompt) + "</span>"]
    out += [token_span(p, cls="") for p in gen[:-1]]
    cur = gen[-1]
    # a light chip ringed in the chosen colour: the token's byte runs and markers keep their own
    # colours (token_span draws for a light background), so a chosen token that is only the first
    # bytes of a character stays legible
    out.append(token_span(cur, cls="", title=f"id {cur.token_id}",
                          style=f"background:{CHOSEN_LIGHT};outline:1px solid {CHOSEN};border-radius:3px;"
                                "padding:0 2px"))
    stop = ""
    if rec.finished[seq]:
        stop = f'<div style="color:{CHOSEN};font-weight:bold">stopped: {esc(str(rec.stop_reasons[seq]))}</div>'
    return '<div style="white-space:pre-wrap;font-family:monospace">' + "".join(out) + "</div>" + stop


def _inputs_html(trace: Trace, step: int, seq: int) -> str:
    rec = trace.steps[step]
    inp = rec.inputs
    ids = [int(i) for i in inp.input_ids[seq]]
    toks = " ".join(f"<code>{esc(p.display)}</code>" for p in _fed(trace, step, seq, *_text_so_far(trace, step, seq)))
    pos = "None" if inp.position_ids is None else str(inp.position_ids[seq].tolist())
    rows = [
        ("input_ids", esc(str(ids))),
        ("tokens", toks),
        ("position_ids (as fed)", esc(pos)),
        ("cache slots written (computed)", esc(str(_slots(inp)))),
        ("cache length before", str(inp.cache_len_before)),
        ("attention mask shape", esc(str(inp.attention_mask_shape)) if inp.attention_mask_shape
                                  else "none (no padding: generate drops an all-ones mask)"),
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
    _, gen = _text_so_far(trace, step, seq)
    shown = gen[-1].display if gen else tok_text(trace, chosen)  # in context: a completed character whole
    own = tok_text(trace, chosen)
    bytes_note = "" if shown == own else f" (token bytes <code>{esc(own)}</code>)"
    head = (
        f"<div><b>chosen</b> <code>{esc(shown)}</code>{bytes_note} (id {chosen}) "
        f"p={float(rec.chosen_prob[seq]):.4f}, rank {int(rec.stages[-1].chosen_rank[seq])}, {how}; "
        f"argmax <code>{esc(tok_text(trace, argmax))}</code> (id {argmax})</div>"
    )
    cols = ["processor", "params", "newly masked", "KL (nats)", "chosen rank", "chosen prob"]
    th = "".join(f"<th>{c}</th>" for c in cols)
    trs = []
    for r in _processor_rows(rec, seq):
        trs.append(
            f"<tr><td>{esc(r['name'])}</td><td>{esc(r['params'])}</td><td>{r['newly_masked']}</td>"
            f"<td>{r['kl']:.4f}</td><td>{r['rank_before']} → {r['rank_after']}</td>"
            f"<td>{r['prob_before']:.4f} → {r['prob_after']:.4f}</td></tr>"
        )
    stop = f"<div><b>stop reason:</b> {esc(str(rec.stop_reasons[seq]))}</div>" if rec.finished[seq] else ""
    return head + f"<table><tr>{th}</tr>{''.join(trs)}</table>" + stop


def _waterfall_data(trace: Trace, step: int, seq: int) -> list[tuple[str, list[str], np.ndarray, list[bool], int]]:
    rec = trace.steps[step]
    chosen = int(rec.chosen[seq])
    out = []
    for st in rec.stages:
        # tokens a processor masked to -inf are not candidates any more: leave them out
        ids, probs, _ = top_candidates(trace, st.top, seq)
        out.append(
            (
                st.name,
                [f"{tok_text(trace, i)} ({i})" for i in ids],
                probs,
                [i == chosen for i in ids],
                int(st.chosen_rank[seq]),
            )
        )
    return out


def processor_waterfall_figure(trace: Trace, step: int, seq: int = 0) -> Figure:
    """One bar chart per stage (raw logits, then each processor): the top-k candidates'
    probabilities, the chosen token in orange."""
    rec = check_step(trace, step)
    data = _waterfall_data(trace, step, seq)
    n = len(data)
    fig = new_figure(figsize=(3.2 * n, 0.35 * max(len(d[1]) for d in data) + 1.6), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (name, labels, probs, is_chosen, rank) in zip(axes, data):
        y = np.arange(len(labels))
        bars = ax.barh(y, probs, color=[CHOSEN if c else OTHER for c in is_chosen])
        ax.bar_label(bars, [f"{p:.3g}" for p in probs], fontsize=7, padding=2)
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.18)
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1])
        ax.set_xlabel("probability")
        ax.set_title(f"{name}\nchosen rank {rank}", fontsize=9)
    fig.suptitle(f"step {step} ({rec.kind}), seq {seq}: top-{len(data[0][1])} after each stage", fontsize=10)
    return fig




def step_explorer_class() -> type:
    import ipywidgets as W

    if "StepExplorer" in CLASSES:
        return CLASSES["StepExplorer"]

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
            self.waterfall = _make_waterfall_widget(trace, 0, seq)
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
            if step != getattr(self, "_waterfall_step", None):
                self.waterfall = _make_waterfall_widget(t, step, s)
                self._waterfall_step = step
                self.children = (*self.children[:-1], self.waterfall)

    _StepExplorer.__name__ = _StepExplorer.__qualname__ = "StepExplorer"
    CLASSES["StepExplorer"] = _StepExplorer
    return _StepExplorer


def _stage_title(name: str) -> str:
    """Short subplot titles: ``TopPLogitsWarper`` -> ``TopP``, ``logits`` -> ``raw logits``."""
    if name == "logits":
        return "raw logits"
    for suffix in ("LogitsProcessor", "LogitsWarper", "Processor", "Warper"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _make_waterfall_widget(trace: Trace, step: int, seq: int) -> Any:
    """A new waterfall for one step, its data and colours set at construction.

    Rebuilt on every step rather than restyled: restyle messages sent before the view exists
    (a slider moved before display) can be lost, leaving default colours."""
    rec = trace.steps[step]
    data = _waterfall_data(trace, step, seq) if rec.active[seq] else []
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        names = [st.name for st in rec.stages]
        # plotly renders a subset of HTML in labels and titles: escape every token text
        fig = make_subplots(rows=1, cols=len(names), subplot_titles=[html.escape(_stage_title(n), quote=False) for n in names],
                            horizontal_spacing=0.1)
        for i in range(len(names)):
            x, y, colors = [], [], []
            if i < len(data):
                _, labels, probs, is_chosen, _ = data[i]
                x, colors = probs.tolist(), [CHOSEN if c else OTHER for c in is_chosen]
                # plotly decodes &lt; &gt; &amp; but shows &quot; literally: escape tags only
                y = [html.escape(label, quote=False) for label in labels]
            fig.add_bar(x=x, y=y, orientation="h", marker_color=colors, row=1, col=i + 1, showlegend=False,
                        hovertemplate="%{y}: %{x:.4f}<extra></extra>")
            fig.update_yaxes(autorange="reversed", row=1, col=i + 1, tickfont=dict(size=10))
            fig.update_xaxes(range=[0, 1], row=1, col=i + 1)
        fig.update_annotations(font_size=12)
        fig.update_layout(height=340, margin=dict(l=10, r=10, t=40, b=10))
        widget = go.FigureWidget(fig)
        widget._tracer_kind = "plotly"  # type: ignore[attr-defined]
        return widget
    except ImportError:  # plotly or anywidget missing: a rendered PNG instead
        import ipywidgets as W

        return W.Image(format="png", value=figure_png(processor_waterfall_figure(trace, step, seq)) if data else b"")


def step_explorer(trace: Trace, seq: int = 0) -> Any:
    """Interactive walk through the steps of ``seq``; see :func:`step_text` for the contents."""
    return step_explorer_class()(trace, seq)
