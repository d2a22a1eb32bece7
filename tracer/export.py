"""Read-only outputs of a trace: ``tracer inspect`` text, the HTML report, Perfetto JSON.

Like :mod:`tracer.storage`, this imports only the standard library, numpy and the record
layer, so a trace loaded without torch or transformers can be shared as HTML or a timeline.
Every token string and every text that comes from a trace goes through ``html.escape``.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .records import SCHEMA_VERSION, Trace, TraceFormatError, blob_key, parse_blob_key, stack_rows
from .storage import (
    BLOBS,
    FORMAT_NAME,
    MANIFEST,
    TABLES,
    SafetensorsStore,
    _jsonable,
    _trace_folder,
    load_trace,
)

__all__ = ["inspect_trace", "trace_to_html", "trace_summary_html", "trace_to_perfetto"]


# ======================================================================================


def _plain(s: Any, limit: int = 100) -> str:
    """``s`` for a terminal: control characters escaped, truncated with an ellipsis."""
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(s))
    return text if len(text) <= limit else text[: limit - 1] + "…"


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


def inspect_trace(path: str | os.PathLike[str]) -> str:
    """A multi-line, terminal-safe summary of the trace folder at ``path`` (``tracer inspect``)."""
    folder = _trace_folder(path)
    trace = load_trace(folder)
    m = trace.meta
    lines = [f"trace: {_plain(folder, 200)}  (schema {SCHEMA_VERSION}, format {FORMAT_NAME})"]
    lines.append(
        f"model: {_plain(m.model_name)}  ({_plain(m.model_class)}, {_plain(m.dtype)} on {_plain(m.device)}, "
        f"attention {_plain(m.attn_implementation)})"
    )
    lines.append(f"status: {_plain(m.status)}" + (f"  error: {_plain(m.error, 200)}" if m.error else ""))
    lines.append(f"batch: {trace.batch_size}, prompt length {trace.prompt_len}")
    for b in range(trace.batch_size):
        prompt = trace.prompts[b] if trace.prompts and b < len(trace.prompts) else trace.text_of(trace.prompt_tokens(b))
        lines.append(f"prompt[{b}]: {_plain(prompt, 80)}")
    n = trace.num_steps
    lines.append(f"steps: {n}" + (f" (prefill + {n - 1} decode)" if n else "") + f", {trace.total_time_s:.3f} s")
    lines.append(f"new tokens: {trace.num_new_tokens}")
    lines.append(f"stop reasons: {[_plain(r, 40) for r in trace.stop_reasons]}")
    for b, text in enumerate(trace.generated_text):
        lines.append(f"generated[{b}]: {_plain(text, 100)}")
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
        except (TypeError, ValueError, OverflowError) as exc:  # e.g. a dtype numpy cannot name
            lines.append(f"cache: {_plain(trace.cache.cache_class)} (no summary: {_plain(exc)})")
    sizes = [f"{name} {_size((folder / name).stat().st_size)}" for name in (MANIFEST, TABLES, BLOBS)
             if (folder / name).is_file()]
    lines.append("files: " + ", ".join(sizes))
    if isinstance(trace.blobs, SafetensorsStore):
        trace.blobs.close()
    return "\n".join(lines)


# ======================================================================================
# HTML
# ======================================================================================


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em;color:#222;max-width:1200px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}h3{font-size:1em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 6px;vertical-align:top;text-align:left}
th{background:#f4f4f4}.num{text-align:right;font-variant-numeric:tabular-nums}
.tok{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;border-radius:2px;padding:0 1px}
.prompt .tok{background:#eee;color:#555}.text{line-height:1.9}.note{color:#666;font-size:.9em}
.maps{display:flex;flex-wrap:wrap;gap:14px}.maps figure{margin:0}
.maps img{width:220px;height:220px;image-rendering:pixelated;border:1px solid #ccc}
"""


def _prob_color(p: float) -> str:
    p = 0.0 if not math.isfinite(p) else min(max(p, 0.0), 1.0)
    return f"hsl({120 * p:.0f},70%,84%)"


def _tok(trace: Trace, tid: int) -> str:
    return trace.token_text.get(int(tid), f"<{int(tid)}>")


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _png(rgb: np.ndarray) -> bytes:
    """A minimal RGB PNG (stdlib zlib), so the report needs no plotting library."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def _heat_png(a: np.ndarray, max_side: int = 512) -> str:
    """Base64 PNG of a non-negative map; colour = sqrt(weight), white (0) to dark blue (1)."""
    a = np.nan_to_num(np.asarray(a, dtype=np.float32), nan=0.0)
    f = max(1, math.ceil(max(a.shape) / max_side))
    if f > 1:  # block-average down to at most max_side per side
        h, w = (math.ceil(d / f) * f for d in a.shape)
        pad = np.zeros((h, w), np.float32)
        pad[: a.shape[0], : a.shape[1]] = a
        a = pad.reshape(h // f, f, w // f, f).mean(axis=(1, 3))
    v = np.sqrt(np.clip(a, 0.0, 1.0))
    rgb = np.stack([255 - 230 * v, 255 - 170 * v, 255 - 60 * v], axis=-1).astype(np.uint8)
    return base64.b64encode(_png(np.ascontiguousarray(rgb))).decode("ascii")


def _mean_head_map(trace: Trace, layer: int, seq: int, last_step: int) -> np.ndarray | None:
    """`(T, T)` like ``Trace.head_map`` but averaged over the recorded heads (one read per step)."""
    rows = []
    for s in range(last_step + 1):
        key = blob_key("attention", s, layer)
        if key not in trace.blobs:
            break
        block = np.asarray(trace.blobs.get(key))[seq].astype(np.float32).mean(axis=0)
        rows.append(block if s == 0 else block[-1:])  # decode steps: the new query row
    if not rows:
        return None
    return stack_rows(rows)


def _meta_rows(trace: Trace) -> list[tuple[str, str]]:
    m = trace.meta
    rows = [
        ("model", f"{m.model_name} ({m.model_class})"),
        ("shape", f"{m.num_layers} layers, {m.num_heads} heads ({m.num_kv_heads} KV), head dim {m.head_dim}, "
                  f"hidden {m.hidden_size}, vocab {m.vocab_size}"),
        ("dtype / device", f"{m.dtype} on {m.device}, attention {m.attn_implementation}"),
        ("status", m.status + (f" — {m.error}" if m.error else "")),
        ("generation config", json.dumps(_jsonable(m.generation_config), sort_keys=True)),
        ("terminators", ", ".join(f"{k}: {v}" for k, v in m.terminators.items())),
        ("created", m.created),
        ("versions", ", ".join(f"{k} {v}" for k, v in m.versions.items())),
        ("batch / prompt / steps", f"{trace.batch_size} / {trace.prompt_len} / {trace.num_steps}, "
                                   f"{trace.total_time_s:.3f} s"),
    ]
    return [(k, v) for k, v in rows if v]


def _kv_table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"


def _sequence_html(trace: Trace, b: int) -> str:
    out = [f"<h3>sequence {b} — stop: {_e(trace.stop_reasons[b])}</h3>"]
    if trace.prompts and b < len(trace.prompts):
        out.append(f"<p class='note'>prompt text: {_e(_short(trace.prompts[b], 400))}</p>")
    spans = [f"<span class='tok' title='{_e(f'id {int(t)}')}'>{_e(_tok(trace, t))}</span>"
             for t in trace.prompt_tokens(b)]
    out.append("<div class='text prompt'>" + "".join(spans) + "</div><div class='text'>")
    for step in trace.steps:
        if not step.active[b]:
            break
        tid = int(step.chosen[b])
        p = float(step.chosen_prob[b])
        title = f"step {step.index} · id {tid} · p={p:.3f} · raw rank {int(step.stages[0].chosen_rank[b])}"
        out.append(f"<span class='tok' style='background:{_prob_color(p)}' title='{_e(title)}'>"
                   f"{_e(_tok(trace, tid))}</span>")
    out.append("</div>")
    return "".join(out)


def _steps_table(trace: Trace, b: int, max_steps: int) -> str:
    head = ("<tr><th>step</th><th>input tokens</th><th>chosen</th><th>prob</th><th>rank raw→final</th>"
            "<th>top-5 final</th><th>processors: newly masked, KL, chosen rank before→after</th><th>stop</th></tr>")
    rows = []
    shown = 0
    for step in trace.steps:
        if not step.active[b]:
            continue
        if shown >= max_steps:
            rows.append(f"<tr><td colspan='8' class='note'>… {trace.num_steps - shown} more steps not shown</td></tr>")
            break
        shown += 1
        tid = int(step.chosen[b])
        inputs = _short(trace.text_of(step.inputs.input_ids[b]), 60)
        fin = step.final
        top = ", ".join(f"{_e(_tok(trace, i))} {p:.2f}" for i, p in zip(fin.ids[b, :5], fin.probs[b, :5]))
        procs = "<br>".join(
            f"{_e(e.name)}: +{int(e.newly_masked[b])}, KL {float(e.kl[b]):.3g}, "
            f"{int(e.chosen_rank_before[b])}→{int(e.chosen_rank_after[b])}"
            for e in step.processors
        )
        reason = step.stop_reasons[b] if b < len(step.stop_reasons) else None
        rows.append(
            f"<tr><td class='num'>{step.index}</td><td><span class='tok'>{_e(inputs)}</span></td>"
            f"<td><span class='tok'>{_e(_tok(trace, tid))}</span></td>"
            f"<td class='num'>{float(step.chosen_prob[b]):.3f}</td>"
            f"<td class='num'>{int(step.stages[0].chosen_rank[b])}→{int(step.stages[-1].chosen_rank[b])}</td>"
            f"<td>{top}</td><td>{procs}</td><td>{_e(reason or '')}</td></tr>"
        )
    return "<table>" + head + "".join(rows) + "</table>"


def _maps_html(trace: Trace, max_maps: int, max_steps: int) -> str:
    layers = [l for l in trace.attention_layers if blob_key("attention", 0, l) in trace.blobs]
    if not layers or trace.num_steps == 0:
        return "<p class='note'>no attention maps recorded.</p>"
    if len(layers) > max_maps:
        pick = np.linspace(0, len(layers) - 1, max_maps).round().astype(int)
        layers = [layers[i] for i in sorted(set(pick.tolist()))]
    figs = []
    for layer in layers:
        a = _mean_head_map(trace, layer, 0, min(trace.num_steps, max_steps) - 1)
        if a is None or a.size == 0:
            continue
        figs.append(f"<figure><img alt='{_e(f'layer {layer}')}' src='data:image/png;base64,{_heat_png(a)}'>"
                    f"<figcaption>layer {int(layer)} ({a.shape[0]}×{a.shape[1]})</figcaption></figure>")
    heads = ", ".join(str(h) for h in trace.attention_heads)
    note = (f"Sequence 0, mean over the recorded heads ({_e(heads)}) of each layer's whole map "
            f"(rows: query positions, prompt then generated; columns: key positions). "
            f"Colour is √weight, white 0 to dark blue 1; at most {max_maps} layers, evenly sampled.")
    return f"<p class='note'>{note}</p><div class='maps'>" + "".join(figs) + "</div>"


def trace_to_html(
    trace: Trace, path: str | os.PathLike[str] | None = None, *, max_steps: int = 256, max_maps: int = 12,
    max_seqs: int = 4,
) -> str:
    """A self-contained HTML report (inline CSS, maps as inline PNG; no scripts, no network).

    Every text taken from the trace is HTML-escaped.  If ``path`` is given the report is also
    written there (UTF-8)."""
    model = trace.meta.model_name or "trace"
    out = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>tracer: {_e(model)}</title><style>{_CSS}</style></head><body>",
        f"<h1>tracer report: {_e(model)}</h1>",
        _kv_table(_meta_rows(trace)),
        "<h2>Stop reasons</h2><ul>",
        "".join(f"<li>sequence {b}: {_e(r)} ({n} new tokens)</li>"
                for b, (r, n) in enumerate(zip(trace.stop_reasons, trace.num_new_tokens))),
        "</ul><h2>Text</h2><p class='note'>Generated tokens are coloured by the probability of the chosen "
        "token under the final distribution (red 0 → green 1); hover for details.</p>",
    ]
    seqs = range(min(trace.batch_size, max_seqs))
    out += [_sequence_html(trace, b) for b in seqs]
    if trace.batch_size > max_seqs:
        out.append(f"<p class='note'>{trace.batch_size - max_seqs} more sequences not shown.</p>")
    out.append("<h2>Steps</h2>")
    for b in seqs:
        out.append(f"<h3>sequence {b}</h3>" + _steps_table(trace, b, max_steps))
    out.append("<h2>Attention</h2>" + _maps_html(trace, max_maps, max_steps))
    if trace.meta.notes:
        out.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in trace.meta.notes) + "</ul>")
    out.append("</body></html>")
    text = "\n".join(out)
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


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
    rows += [(f"generated[{b}]", _short(t, 200)) for b, t in enumerate(s["generated_text"][:4])]
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


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def trace_to_perfetto(trace: Trace, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Chrome trace-event JSON (open in ui.perfetto.dev or chrome://tracing): one complete
    event per step laid back to back from the recorded ``time_s`` (microseconds), instant events
    where sequences stop, and a KV-cache bytes counter.  Written to ``path`` if given."""
    pid, tid = 1, 1
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": pid, "tid": tid,
         "args": {"name": f"tracer: {trace.meta.model_name or 'trace'}"}},
        {"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": "generate"}},
    ]
    ts = 0.0
    for i, step in enumerate(trace.steps):
        # a step longer than a day is not a timing (a hostile or corrupt file): show it as 0
        dur = step.time_s * 1e6 if math.isfinite(step.time_s) and 0 < step.time_s < 86_400 else 0.0
        chosen = [int(c) for c in step.chosen]
        args: dict[str, Any] = {
            "step": int(step.index),
            "query_tokens": int(np.shape(step.inputs.input_ids)[1]),
            "cache_len_before": int(step.inputs.cache_len_before),
            "chosen_ids": chosen,
            "chosen_tokens": [_tok(trace, c) for c in chosen],
            "chosen_prob": [_finite(float(p)) for p in step.chosen_prob],
            "active": [bool(a) for a in step.active],
        }
        reasons = {str(b): r for b, r in enumerate(step.stop_reasons) if r is not None}
        if reasons:
            args["stop_reasons"] = reasons
        events.append({
            "name": "prefill" if step.index == 0 else f"decode step {step.index}",
            "cat": step.kind, "ph": "X", "ts": ts, "dur": dur, "pid": pid, "tid": tid, "args": args,
        })
        for b, r in reasons.items():
            events.append({"name": f"stop seq {b}: {r}", "cat": "stop", "ph": "i", "s": "t",
                           "ts": ts + dur, "pid": pid, "tid": tid})
        if trace.cache is not None and i < trace.cache.nbytes.shape[0]:
            events.append({"name": "kv cache bytes", "ph": "C", "ts": ts + dur, "pid": pid,
                           "args": {"bytes": int(trace.cache.nbytes[i].sum())}})
        ts += dur
    doc = {"traceEvents": events, "displayTimeUnit": "ms",
           "otherData": {"model": trace.meta.model_name, "status": trace.meta.status}}
    if path is not None:
        Path(path).write_text(json.dumps(doc, allow_nan=False), encoding="utf-8")
    return doc
