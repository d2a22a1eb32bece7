"""Sections of the HTML report (:func:`tracer.export.trace_to_html`), built on the same view
functions as the notebook views: :mod:`tracer.text` for token text, :mod:`.shared` for the
colour ramps, the whole-map assembly and PNG encoding, :mod:`.cache` for the cache series.

numpy and the standard library at import; PIL / matplotlib only inside the image helpers (the
report says so where they are missing).  Every text from the trace goes through
:func:`tracer.text.html_text`.
"""

from __future__ import annotations

import base64
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ..records import TraceFormatError, blob_key
from ..text import html_text as _e
from ..text import piece_of
from .shared import (
    BlockReader,
    backend_of,
    figure_png,
    heat_rgb,
    input_pieces,
    missing_note,
    png_bytes,
    prob_color,
    run_pieces,
    token_span,
    top_candidates,
    whole_maps,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..records import StepRecord, Trace

__all__ = [
    "GENERATION_DEFAULTS",
    "generation_rows",
    "sequence_html",
    "steps_table_html",
    "maps_html",
    "cache_html",
    "MAX_MAP_ELEMENTS",
]

#: transformers' effective generation defaults (``GenerationConfig._get_default_generation_params()``
#: in 5.24; the same values as 4.x's constructor defaults).  Kept here so the report needs no
#: transformers; ``tests/test_export.py`` compares it with the installed transformers.
GENERATION_DEFAULTS: dict[str, Any] = {
    "max_length": 20, "min_length": 0, "do_sample": False, "use_cache": True, "early_stopping": False,
    "num_beams": 1, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0,
    "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "num_return_sequences": 1,
    "output_scores": False, "return_dict_in_generate": False, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "remove_invalid_values": False, "exponential_decay_length_penalty": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "encoder_repetition_penalty": 1.0, "num_assistant_tokens": 20, "num_assistant_tokens_schedule": "constant",
    "assistant_confidence_threshold": 0.4, "assistant_lookbehind": 10, "target_lookbehind": 10,
    "num_beam_groups": 1, "diversity_penalty": 0.0,
    # flags that transformers leaves unset (None) and that mean "off"
    "output_attentions": False, "output_hidden_states": False, "output_logits": None, "min_p": None,
}
_BOOKKEEPING = ("transformers_version",)

#: Elements of one layer's prefill block the report reads at most (rows are strided above it).
MAX_MAP_ELEMENTS = 1 << 22


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (a is None and b is False) or (b is None and a is False)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def generation_rows(config: Any) -> tuple[list[tuple[str, str]], int]:
    """The settings of ``config`` (a dict) that differ from transformers' defaults, as
    ``(name, value)`` rows, and how many settings were left out as defaults or bookkeeping."""
    if not isinstance(config, dict):
        return [("generation config", str(config))], 0
    rows, hidden = [], 0
    for k in sorted(config, key=str):
        v = config[k]
        if str(k).startswith("_") or k in _BOOKKEEPING:
            hidden += 1
        elif (k in GENERATION_DEFAULTS and _same(v, GENERATION_DEFAULTS[k])) or (k not in GENERATION_DEFAULTS and v is None):
            hidden += 1
        else:
            rows.append((str(k), _short(repr(v) if isinstance(v, str) else str(v), 200)))
    return rows, hidden


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _int(a: Any, b: int, default: int = -1) -> int:
    try:
        return int(np.asarray(a).ravel()[b])
    except (IndexError, TypeError, ValueError, OverflowError):
        return default


def _stage_rank(step: StepRecord, stage: int, b: int) -> int:
    if not step.stages:
        raise TraceFormatError(f"step {step.index} has no score stages")
    return _int(step.stages[stage].chosen_rank, b)


# --------------------------------------------------------------------------------------
# Text and steps
# --------------------------------------------------------------------------------------


def sequence_html(trace: Trace, b: int) -> str:
    """The prompt (grey) and the generated tokens of ``b`` coloured by the chosen token's
    probability; characters split over tokens shown whole on the completing token."""
    out = [f"<h3>sequence {b} — stop: {_e(trace.stop_reasons[b])}</h3>"]
    if trace.prompts and b < len(trace.prompts):
        out.append(f"<p class='note'>prompt text: {_e(_short(str(trace.prompts[b]), 400))}</p>")
    prompt, gen = run_pieces(trace, b)
    out.append("<div class='text prompt'>"
               + "".join(token_span(p, title=f"id {p.token_id}") for p in prompt) + "</div><div class='text gen'>")
    steps = [s for s in trace.steps if bool(s.active[b])]
    for step, piece in zip(steps, gen):
        p = float(step.chosen_prob[b])
        title = (f"step {step.index} · id {piece.token_id} · {piece.display} · p={p:.3f} · "
                 f"raw rank {_stage_rank(step, 0, b)}")
        out.append(token_span(piece, style=f"background:{prob_color(p)}", title=title))
    out.append("</div>")
    return "".join(out)


def _top_cell(trace: Trace, step: StepRecord, b: int, k: int = 5) -> str:
    ids, probs, masked = top_candidates(trace, step.final, b)
    cells = [f"<span class='tok'>{_e(piece_of(trace, i).display)}</span> {float(p):.2f}" for i, p in zip(ids[:k], probs[:k])]
    if masked:
        cells.append(f"<span class='note'>+{masked} masked</span>")
    return ", ".join(cells)


def steps_table_html(trace: Trace, b: int, max_steps: int) -> str:
    head = ("<tr><th>step</th><th>input tokens</th><th>chosen</th><th>prob</th><th>rank raw→final</th>"
            "<th>top-5 final (masked left out)</th><th>processors: newly masked, KL, chosen rank before→after</th>"
            "<th>stop</th></tr>")
    rows = []
    prompt, gen = run_pieces(trace, b)
    run = prompt + gen
    active = [s for s in trace.steps if bool(s.active[b])]
    for n, step in enumerate(active):
        if n >= max_steps:
            rows.append(f"<tr><td colspan='8' class='note'>… {len(active) - n} more steps not shown</td></tr>")
            break
        ids = np.asarray(step.inputs.input_ids)
        # the fed tokens as in the run, the way the chosen column shows them (a character whole)
        fed = input_pieces(trace, ids[b].ravel(), run, len(prompt) + n) if ids.ndim == 2 and b < ids.shape[0] else []
        inputs = " ".join(p.display for p in fed[:64]) + (" …" if len(fed) > 64 else "")
        chosen = gen[n].display if n < len(gen) else piece_of(trace, int(step.chosen[b])).display
        procs = "<br>".join(
            f"{_e(e.name)}: +{_int(e.newly_masked, b)}, KL {float(np.asarray(e.kl).ravel()[b]):.3g}, "
            f"{_int(e.chosen_rank_before, b)}→{_int(e.chosen_rank_after, b)}"
            for e in step.processors
        ) or _e(missing_note(trace, "processor stages") if backend_of(trace) != "transformers" else "none")
        reason = step.stop_reasons[b] if b < len(step.stop_reasons) else None
        rows.append(
            f"<tr><td class='num'>{step.index}</td><td><span class='tok'>{_e(_short(inputs, 400))}</span></td>"
            f"<td><span class='tok'>{_e(chosen)}</span></td>"
            f"<td class='num'>{float(step.chosen_prob[b]):.3f}</td>"
            f"<td class='num'>{_stage_rank(step, 0, b)}→{_stage_rank(step, -1, b)}</td>"
            f"<td>{_top_cell(trace, step, b)}</td><td>{procs}</td><td>{_e(reason or '')}</td></tr>"
        )
    return "<table class='steps'>" + head + "".join(rows) + "</table>"


# --------------------------------------------------------------------------------------
# Attention maps
# --------------------------------------------------------------------------------------


def _downsample(a: np.ndarray, max_side: int) -> np.ndarray:
    """Block-average ``a`` down to at most ``max_side`` per side."""
    f = max(1, math.ceil(max(a.shape) / max_side))
    if f == 1:
        return a
    h, w = (math.ceil(d / f) * f for d in a.shape)
    pad = np.zeros((h, w), np.float32)
    pad[: a.shape[0], : a.shape[1]] = a
    return pad.reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def _png_uri(rgb: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode("ascii")


def maps_html(trace: Trace, max_maps: int, max_steps: int, max_side: int = 512) -> str:
    """Sequence 0's whole map per layer (mean over the recorded heads), viridis, as PNG; at
    most ``max_maps`` layers evenly sampled; a huge prefill block is read every n-th row."""
    if not trace.attention_layers or not trace.attention_heads or trace.num_steps == 0:
        return f"<p class='note'>{_e(missing_note(trace, 'attention maps'))}.</p>"
    layers = [l for l in trace.attention_layers if blob_key("attention", 0, l) in trace.blobs]
    if not layers:
        return f"<p class='note'>{_e(missing_note(trace, 'attention maps'))}.</p>"
    try:
        import PIL  # noqa: F401
    except ImportError:
        return "<p class='note'>attention maps not drawn: install pillow (or matplotlib) to see them.</p>"
    if len(layers) > max_maps:
        pick = np.linspace(0, len(layers) - 1, max_maps).round().astype(int)
        layers = [layers[i] for i in sorted(set(pick.tolist()))]
    reader = BlockReader(trace)
    last = min(trace.num_steps, max_steps) - 1
    figs, notes = [], []
    for layer in layers:
        _, heads, q, t = reader.shape(0, layer)
        stride = max(1, math.ceil(heads * q * t / MAX_MAP_ELEMENTS))
        if heads * t > MAX_MAP_ELEMENTS:
            notes.append(f"layer {int(layer)}: a query row of {heads}×{t} values is larger than the report reads "
                         f"({MAX_MAP_ELEMENTS}); not drawn")
            continue
        maps = whole_maps(trace, layer, 0, upto_step=last, row_stride=stride, reader=reader)
        a = maps.mean(axis=0)
        if a.size == 0:
            continue
        if stride > 1:
            notes.append(f"layer {int(layer)}: prefill block of {heads}×{q}×{t} values sampled every {stride}th "
                         f"query row")
        figs.append(f"<figure><img alt='{_e(f'layer {layer}')}' src='{_png_uri(heat_rgb(_downsample(a, max_side)))}'>"
                    f"<figcaption>layer {int(layer)} ({a.shape[0]}×{a.shape[1]})</figcaption></figure>")
    heads = ", ".join(str(h) for h in trace.attention_heads)
    note = (f"Sequence 0, mean over the recorded heads ({_e(heads)}) of each layer's whole map "
            f"(rows: query positions, prompt then generated; columns: key positions). "
            f"Colour: viridis, 0 (dark violet) to 1 (yellow), as in the notebook views; at most {max_maps} "
            f"layers, evenly sampled; steps 0–{last}.")
    extra = "".join(f"<li>{_e(n)}</li>" for n in notes)
    return (f"<p class='note'>{note}</p>" + (f"<ul class='note'>{extra}</ul>" if extra else "")
            + "<div class='maps'>" + "".join(figs) + "</div>")


# --------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------


def cache_html(trace: Trace, max_rows: int = 64) -> str:
    """Cache class and layers; per step the length and measured vs predicted bytes (a
    table, sampled to ``max_rows`` rows) and the per-layer figure when matplotlib is there."""
    c = trace.cache
    if c is None:
        return f"<p class='note'>{_e(missing_note(trace, 'KV-cache timeline'))}.</p>"
    from .cache import cache_series

    series = cache_series(trace)
    n = int(c.seq_len.shape[0])
    kinds = ", ".join(sorted({str(i.kind) for i in c.layers})) or "?"
    first = c.layers[0] if c.layers else None
    head = (f"<p>{_e(c.cache_class)}: {c.num_layers} layers ({_e(kinds)}), "
            + (f"{first.kv_heads} KV heads × head dim {first.head_dim}, {_e(first.dtype)}, " if first else "")
            + f"batch {c.batch_size}, reused {c.reused_len} positions.  Predicted bytes: "
            "2 × Σ<sub>layers</sub> kv_heads × head_dim × kept positions × batch × bytes per element.</p>")
    names = list(series)
    th = "".join(f"<th>{_e(x)}</th>" for x in ["step", "length (min–max over layers)", "kept", "allocated",
                                                          "bytes per layer (min–max)", *names])
    idx = list(range(n)) if n <= max_rows else sorted(set(np.linspace(0, n - 1, max_rows).round().astype(int).tolist()))

    def span(a: np.ndarray) -> str:
        a = np.asarray(a).ravel()
        return "–" if a.size == 0 else (f"{a.min()}" if a.min() == a.max() else f"{a.min()}–{a.max()}")

    rows = []
    for s in idx:
        cells = [str(s), span(c.seq_len[s]), span(c.kept_len[s]), span(c.allocated_len[s]), span(c.nbytes[s])]
        cells += [f"{int(series[k][s]):,}" if s < len(series[k]) else "–" for k in names]
        rows.append("<tr>" + "".join(f"<td class='num'>{_e(x)}</td>" for x in cells) + "</tr>")
    note = "" if n <= max_rows else f"<p class='note'>{n} steps, {len(idx)} shown (evenly sampled).</p>"
    return head + _cache_figure(trace) + "<table class='cache'><tr>" + th + "</tr>" + "".join(rows) + "</table>" + note


def _cache_figure(trace: Trace) -> str:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "<p class='note'>(install matplotlib for the per-layer figure)</p>"
    from .cache import cache_growth_figure

    png = figure_png(cache_growth_figure(trace))
    return "<img class='wide' alt='cache growth per layer' src='data:image/png;base64," + base64.b64encode(png).decode("ascii") + "'>"
