"""Read-only outputs of a trace: ``tracer inspect`` text, the HTML report, Perfetto JSON.

Like :mod:`tracer.storage`, this imports only the standard library, numpy and the record
layer (plus the numpy-only view helpers of :mod:`tracer.viz`), so a trace loaded without torch
or transformers can be shared as HTML or a timeline.  The report is built from the same view
functions as the notebook views (:mod:`tracer.viz.report`); token text comes from
:mod:`tracer.text` (never "�" for a valid character); every text from a trace is escaped
(:func:`tracer.text.html_text` in HTML, :func:`tracer.text.terminal_safe` in terminal text).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .records import SCHEMA_VERSION, Trace, TraceFormatError, parse_blob_key
from .storage import BLOBS, FORMAT_NAME, MANIFEST, TABLES, SafetensorsStore, load_trace
from .text import html_text as _e
from .text import clip_middle, graphemes, piece_of, pieces, running_text, terminal_safe, token_pieces
from .viz.report import cache_html, generation_rows, maps_html, sequence_html, steps_table_html
from .viz.shared import backend_of

__all__ = ["inspect_trace", "trace_to_html", "trace_summary_html", "trace_to_perfetto", "display_text"]


# ======================================================================================


def _plain(s: Any, limit: int = 100) -> str:
    """``s`` for a terminal: control characters escaped, truncated with an ellipsis."""
    return terminal_safe(s, limit)


#: Terminal columns of a prompt's preview in ``tracer inspect`` (80 characters before: up to
#: 160 columns of Chinese), and the share of them kept from the prompt's start.
PROMPT_PREVIEW_COLUMNS = 120
PROMPT_PREVIEW_HEAD = 0.15


def prompt_preview(prompt: str, width: int = PROMPT_PREVIEW_COLUMNS) -> str:
    """A templated prompt on one terminal line of at most ``width`` columns: its start and its
    end around "…".  A chat template puts the user's message last, followed only by the short
    assistant header, so a long system prompt (SmolLM2's default, a seed's) is what is left
    out, not the user's own text; the text kept is exact (control characters escaped), cut
    only between whole characters (never inside an escape such as ``\\x0a``)."""
    return clip_middle([terminal_safe(g) for g in graphemes(prompt)], width, head=PROMPT_PREVIEW_HEAD)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _blob_kinds(blobs: Any) -> dict[str, set[int]]:
    kinds: dict[str, set[int]] = {}
    for key in blobs.keys():
        try:
            kind, step, _ = parse_blob_key(key)
        except TraceFormatError:
            continue
        kinds.setdefault(kind, set()).add(step)
    return kinds


def display_text(trace: Trace, seq: int = 0) -> str:
    """The generated text of ``seq`` for display: the tokens decoded together (terminators
    left out), characters split over tokens joined, bytes that make no character escaped
    (``\\xe5\\x9b``, e.g. when a length limit cut a character) instead of "�".  Falls back
    to the recorded ``generated_text`` when the trace has no token bytes."""
    terms = set(int(k) for k in trace.meta.terminators) if isinstance(trace.meta.terminators, dict) else set()
    ids = [int(i) for i in trace.generated_ids(seq) if int(i) not in terms]
    got = pieces(trace, ids)
    out = trace.output_text
    if all(p.known for p in got) or not isinstance(out, list) or seq >= len(out) or not isinstance(out[seq], str):
        return running_text(got)
    return out[seq]


def _folder_of(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p.parent if p.name == MANIFEST else p


def inspect_trace(path: str | os.PathLike[str]) -> str:
    """A multi-line, terminal-safe summary of the trace folder at ``path`` (``tracer inspect``).

    Every text (file name, model, prompts, generated text, stop reasons) has its control
    characters and escape sequences escaped; generated text shows whole characters."""
    trace = load_trace(path)
    folder = _folder_of(path)
    try:
        return _inspect_lines(trace, folder)
    finally:
        if isinstance(trace.blobs, SafetensorsStore):
            trace.blobs.close()


def _inspect_lines(trace: Trace, folder: Path) -> str:
    m = trace.meta
    lines = [f"trace: {_plain(os.fspath(folder), 200)}  (schema {SCHEMA_VERSION}, format {FORMAT_NAME})"]
    backend = backend_of(trace)
    lines.append(
        f"model: {_plain(m.model_name)}  ({_plain(m.model_class)}, {_plain(m.dtype)} on {_plain(m.device)}, "
        f"attention {_plain(m.attn_implementation)}" + ("" if backend == "transformers" else f", backend {_plain(backend)}")
        + ")"
    )
    lines.append(f"status: {_plain(m.status)}" + (f"  error: {_plain(m.error, 200)}" if m.error else ""))
    lines.append(f"batch: {trace.batch_size}, prompt length {trace.prompt_len}")
    for b in range(trace.batch_size):
        if trace.prompts and b < len(trace.prompts):
            prompt = trace.prompts[b]
        else:
            prompt = running_text(pieces(trace, trace.prompt_tokens(b)))
        lines.append(f"prompt[{b}]: {prompt_preview(prompt)}")
    n = trace.num_steps
    total = trace.total_time_s
    lines.append(f"steps: {n}" + (f" (prefill + {n - 1} decode)" if n else "")
                 + (f", {total:.3f} s" if math.isfinite(total) else ", time not recorded"))
    lines.append(f"new tokens: {trace.num_new_tokens}")
    lines.append(f"stop reasons: [{', '.join(_plain(r, 40) for r in trace.stop_reasons)}]")
    for b in range(trace.batch_size):
        lines.append(f"generated[{b}]: {_plain(display_text(trace, b), 100)}")
    kinds = _blob_kinds(trace.blobs)
    parts = []
    if trace.attention_layers:
        parts.append(f"attention {len(trace.attention_layers)} layers x {len(trace.attention_heads)} heads")
    else:
        parts.append("attention no")
    parts.append(f"full logits {len(kinds['logits'])} steps" if "logits" in kinds else "full logits no")
    parts.append(f"hidden {len(kinds['hidden'])} steps" if "hidden" in kinds else "hidden no")
    if "keys" in kinds:
        parts.append(f"kv snapshots {len(kinds['keys'])} steps")
    n_lens = sum(s.logit_lens is not None for s in trace.steps)
    parts.append(f"logit lens {n_lens} steps" if n_lens else "logit lens no")
    n_rn = sum(s.residual_norms is not None for s in trace.steps)
    parts.append(f"residual norms {n_rn} steps" if n_rn else "residual norms no")
    lines.append("recorded: " + ", ".join(parts))
    if trace.cache is not None:
        try:
            cs = trace.cache.summary(m.num_heads or None)
            lines.append(
                f"cache: {_plain(cs['cache_class'])}, {cs['layers']} layers, final length {cs['final_seq_len']}, "
                f"{_size(cs['measured_bytes'])} measured"
            )
        except (TypeError, ValueError, OverflowError, IndexError) as exc:  # e.g. a dtype numpy cannot name
            lines.append(f"cache: {_plain(trace.cache.cache_class)} (no summary: {_plain(exc)})")
    sizes = []
    for name in (MANIFEST, TABLES, BLOBS):
        try:
            if (folder / name).is_file():
                sizes.append(f"{name} {_size((folder / name).stat().st_size)}")
        except OSError as exc:
            sizes.append(f"{name} ({_plain(exc.strerror or exc)})")
    lines.append("files: " + ", ".join(sizes))
    return "\n".join(lines)


# ======================================================================================
# HTML
# ======================================================================================


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em;color:#222;max-width:1200px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}h3{font-size:1em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 6px;vertical-align:top;text-align:left}
th{background:#f4f4f4}.num{text-align:right;font-variant-numeric:tabular-nums}
.tok{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;border-radius:2px;padding:0 1px}
.prompt .tok{background:#eee;color:#555}.text{line-height:1.9}.note{color:#666;font-size:.9em}
.maps{display:flex;flex-wrap:wrap;gap:14px}.maps figure{margin:0}
.maps img{width:220px;height:220px;image-rendering:pixelated;border:1px solid #ccc}img.wide{max-width:100%}
"""


def _meta_rows(trace: Trace) -> list[tuple[str, str]]:
    m = trace.meta
    backend = backend_of(trace)
    rows = [
        ("model", f"{m.model_name} ({m.model_class})"),
        ("backend", backend if backend != "transformers" else ""),
        ("shape", f"{m.num_layers} layers, {m.num_heads} heads ({m.num_kv_heads} KV), head dim {m.head_dim}, "
                  f"hidden {m.hidden_size}, vocab {m.vocab_size}"),
        ("dtype / device", f"{m.dtype} on {m.device}, attention {m.attn_implementation}"),
        ("status", f"{m.status}" + (f" — {m.error}" if m.error else "")),
        ("terminators", ", ".join(f"{k}: {v}" for k, v in (m.terminators.items() if isinstance(m.terminators, dict) else []))),
        ("created", m.created),
        ("versions", ", ".join(f"{k} {v}" for k, v in (m.versions.items() if isinstance(m.versions, dict) else []))),
        ("batch / prompt / steps", f"{trace.batch_size} / {trace.prompt_len} / {trace.num_steps}, "
                                   f"{trace.total_time_s:.3f} s"),
    ]
    return [(k, str(v)) for k, v in rows if v]


def _kv_table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"


def _generation_html(trace: Trace) -> str:
    rows, hidden = generation_rows(trace.meta.generation_config)
    table = _kv_table(rows) if rows else "<p class='note'>every setting at transformers' defaults.</p>"
    return table + (f"<p class='note'>{hidden} more settings at transformers' defaults (or bookkeeping) not shown.</p>"
                    if hidden else "")


def _section(title: str, body: Any) -> str:
    """One report section; a section that cannot be drawn from this trace says why instead."""
    try:
        return f"<h2>{_e(title)}</h2>" + body()
    except (KeyError, TraceFormatError) as exc:
        return f"<h2>{_e(title)}</h2><p class='note'>not shown: {_e(exc)}</p>"


def _mode_sections(trace: Trace) -> list[str]:
    """Sections of what only some traces hold (MoE routing, beam search): none when absent."""
    from .viz.modes import mode_sections

    return [_section(title, body) for title, body in mode_sections(trace)]


def trace_to_html(
    trace: Trace, path: str | os.PathLike[str] | None = None, *, max_steps: int = 256, max_maps: int = 12,
    max_seqs: int = 4,
) -> str | Path:
    """A self-contained HTML report (inline CSS, maps as inline PNG; no scripts, no network).

    Every text taken from the trace is HTML-escaped.  Without ``path`` the HTML is returned;
    with ``path`` it is written there (UTF-8) and the path is returned (so a notebook cell
    does not print 40 kB of HTML)."""
    model = trace.meta.model_name or "trace"
    seqs = range(min(trace.batch_size, max_seqs))
    out = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>tracer: {_e(model)}</title><style>{_CSS}</style></head><body>",
        f"<h1>tracer report: {_e(model)}</h1>",
        _kv_table(_meta_rows(trace)),
        "<h2>Generation config</h2><p class='note'>Settings that differ from transformers' defaults.</p>",
        _generation_html(trace),
        "<h2>Stop reasons</h2><ul>",
        "".join(f"<li>sequence {b}: {_e(r)} ({n} new tokens)</li>"
                for b, (r, n) in enumerate(zip(trace.stop_reasons, trace.num_new_tokens))),
        "</ul><h2>Text</h2><p class='note'>Generated tokens are coloured by the probability of the chosen "
        "token under the final distribution (red 0 → green 1); hover for details. A character split over "
        "several tokens is shown whole on the token that completes it; the tokens before show their own "
        "bytes (<span class='tok'>\\xe5\\x9b</span>). ↵ · ⇥ mark newline, space and tab tokens.</p>",
    ]
    out += [sequence_html(trace, b) for b in seqs]
    if trace.batch_size > max_seqs:
        out.append(f"<p class='note'>{trace.batch_size - max_seqs} more sequences not shown.</p>")
    out.append("<h2>Steps</h2>")
    for b in seqs:
        out.append(f"<h3>sequence {b}</h3>" + steps_table_html(trace, b, max_steps))
    out.append(_section("Attention", lambda: maps_html(trace, max_maps, max_steps)))
    out.append(_section("KV cache", lambda: cache_html(trace)))
    out.extend(_mode_sections(trace))
    if trace.meta.notes:
        out.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in trace.meta.notes) + "</ul>")
    out.append("</body></html>")
    text = "\n".join(out)
    if path is None:
        return text
    Path(path).write_text(text, encoding="utf-8")
    return Path(path)


def trace_summary_html(trace: Trace) -> str:
    """A small HTML table of ``trace.summary()`` (used by ``Trace._repr_html_``)."""
    try:
        s = trace.summary()
    except (TypeError, ValueError, OverflowError):  # a cache dtype numpy cannot name: drop the cache row
        s = {**dataclasses.replace(trace, cache=None).summary(), "cache": None}
    rows = [
        ("model", s["model"]), ("status", s["status"]), ("batch", s["batch_size"]), ("prompt length", s["prompt_len"]),
        ("steps", s["steps"]), ("new tokens", s["new_tokens"]), ("stop reasons", ", ".join(s["stop_reasons"])),
        ("time", f"{s['time_s']} s"), ("attention layers", s["attention_layers"]),
    ]
    rows += [(f"generated[{b}]", _short(display_text(trace, b), 200)) for b in range(min(trace.batch_size, 4))]
    if s["cache"]:
        c = s["cache"]
        rows.append(("cache", f"{c['cache_class']}, {c['layers']} layers, final length {c['final_seq_len']}, "
                              f"{_size(c['measured_bytes'])}"))
    return "<table class='tracer-summary'>" + "".join(
        f"<tr><th style='text-align:left'>{_e(k)}</th><td style='text-align:left'>{_e(v)}</td></tr>" for k, v in rows
    ) + "</table>"


# ======================================================================================
# Perfetto / Chrome trace events
# ======================================================================================


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _str(x: Any, limit: int = 200) -> str:
    """Text for the timeline: controls and lone surrogates escaped (valid UTF-8 JSON)."""
    return terminal_safe(x, limit)


def _count(a: Any) -> int:
    """A non-negative count from a recorded value (0 where it is not one)."""
    try:
        v = int(np.asarray(a).ravel()[0]) if np.ndim(a) else int(a)
    except (TypeError, ValueError, OverflowError, IndexError):
        return 0
    return v if 0 <= v < 2**53 else 0


def trace_to_perfetto(trace: Trace, path: str | os.PathLike[str] | None = None) -> dict[str, Any] | Path:
    """Chrome trace-event JSON (open in ui.perfetto.dev or chrome://tracing): one complete
    event per step laid back to back from the recorded ``time_s`` (microseconds), instant events
    where sequences stop, and a KV-cache bytes counter.  Without ``path`` the document is
    returned; with ``path`` it is written there and the path is returned."""
    pid, tid = 1, 1
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": pid, "tid": tid,
         "args": {"name": f"tracer: {_str(trace.meta.model_name or 'trace')}"}},
        {"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": "generate"}},
    ]
    ts = 0.0
    nbytes = None if trace.cache is None else np.asarray(trace.cache.nbytes)
    # each sequence's tokens decoded as one run: a character split over tokens is shown whole
    # on the token that completes it (the others show their bytes and the character they lead to)
    width = min((int(np.asarray(s.chosen).size) for s in trace.steps), default=0)  # a corrupt file may vary
    runs = [np.asarray([np.asarray(s.chosen).ravel()[b] for s in trace.steps], np.int64) for b in range(width)]
    shown_runs = [token_pieces(trace, run) for run in runs]
    for i, step in enumerate(trace.steps):
        # a step longer than a day is not a timing (a hostile or corrupt file): show it as 0
        t = float(step.time_s)
        dur = t * 1e6 if math.isfinite(t) and 0 < t < 86_400 else 0.0
        chosen = [int(c) for c in np.asarray(step.chosen).ravel()]
        shape = np.shape(step.inputs.input_ids)
        args: dict[str, Any] = {
            "step": int(step.index),
            "query_tokens": int(shape[1]) if len(shape) == 2 else 0,
            "cache_len_before": _count(step.inputs.cache_len_before),
            "chosen_ids": chosen,
            "chosen_tokens": [shown_runs[b][i] if b < len(shown_runs) else piece_of(trace, c).display
                              for b, c in enumerate(chosen)],
            "chosen_prob": [_finite(float(p)) for p in np.asarray(step.chosen_prob).ravel()],
            "active": [bool(a) for a in np.asarray(step.active).ravel()],
        }
        reasons = {str(b): _str(r) for b, r in enumerate(step.stop_reasons) if r is not None}
        if reasons:
            args["stop_reasons"] = reasons
        events.append({
            "name": "prefill" if step.index == 0 else f"decode step {int(step.index)}",
            "cat": step.kind, "ph": "X", "ts": ts, "dur": dur, "pid": pid, "tid": tid, "args": args,
        })
        for b, r in reasons.items():
            events.append({"name": f"stop seq {b}: {r}", "cat": "stop", "ph": "i", "s": "t",
                           "ts": ts + dur, "pid": pid, "tid": tid})
        if nbytes is not None and nbytes.ndim == 2 and i < nbytes.shape[0]:
            events.append({"name": "kv cache bytes", "ph": "C", "ts": ts + dur, "pid": pid,
                           "args": {"bytes": int(nbytes[i].sum(dtype=np.float64))}})
        ts += dur
    doc = {"traceEvents": events, "displayTimeUnit": "ms",
           "otherData": {"model": _str(trace.meta.model_name), "status": _str(trace.meta.status),
                         "backend": _str(backend_of(trace))}}
    if path is None:
        return doc
    Path(path).write_text(json.dumps(doc, allow_nan=False, ensure_ascii=False), encoding="utf-8")
    return Path(path)
