"""Assisted / speculative decoding views: per round the drafted tokens (accepted, rejected, not
reached), the verifier's token, acceptance rate; text and static HTML.  Pure functions of an
:class:`~tracer.assisted_records.AssistedTrace`; every token text is escaped."""

from __future__ import annotations

import html
from typing import Any

from ..assisted_records import AssistedTrace

__all__ = ["assisted_html", "assisted_text", "acceptance_per_round"]

ACCEPTED, REJECTED, SKIPPED, VERIFIER = "#2a9d4b", "#d62728", "#b8b8b8", "#3b6fb6"


def acceptance_per_round(trace: AssistedTrace) -> list[tuple[int, int]]:
    """``[(accepted, drafted), ...]`` per round."""
    return [(r.accepted, r.num_drafted) for r in trace.rounds]


def _rate(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.0%}"


def assisted_text(trace: AssistedTrace) -> str:
    lines = [f"assisted decoding ({trace.source}{', sampling' if trace.do_sample else ''}): {trace.num_rounds} rounds, "
             f"{trace.accepted_total}/{trace.drafted_total} drafted tokens accepted ({_rate(trace.acceptance_rate)}), "
             f"{trace.tokens_per_round:.2f} tokens per verifier forward"]
    for r in trace.rounds:
        drafted = " ".join(repr(trace.text(t)) for t in r.drafted) or "-"
        extra = " ".join(repr(trace.text(t)) for t in r.appended[r.accepted:]) or "-"
        lines.append(f"  round {r.step:>3}: drafted [{drafted}] accepted {r.accepted}/{r.num_drafted} "
                     f"then [{extra}]  ({r.reason})")
    return "\n".join(lines)


def _chip(text: str, colour: str, title: str, strike: bool = False) -> str:
    style = f"border:1px solid {colour};color:{colour};padding:0 3px;margin:1px;border-radius:3px;font-family:monospace"
    if strike:
        style += ";text-decoration:line-through"
    return f'<span style="{style}" title="{html.escape(title)}">{html.escape(text)}</span>'


def assisted_html(trace: AssistedTrace, path: Any = None) -> str:
    """A static HTML table: one row per round (green accepted, red the rejected draft, grey drafts
    never reached, blue the verifier's own token), with the verifier's probabilities in tooltips."""
    rows = []
    for r in trace.rounds:
        chips = []
        for i, t in enumerate(r.drafted):
            p = float(r.verifier_p_drafted[i])
            q = "" if r.draft_p_drafted is None else f", draft p={float(r.draft_p_drafted[i]):.4f}"
            if i < r.accepted:
                chips.append(_chip(trace.text(t), ACCEPTED, f"accepted: verifier p={p:.4f}{q}"))
            elif i == r.accepted:
                chips.append(_chip(trace.text(t), REJECTED, f"rejected: {r.reason}", strike=True))
            else:
                chips.append(_chip(trace.text(t), SKIPPED, "not reached (after a rejection)", strike=True))
        own = "".join(_chip(trace.text(t), VERIFIER, "the verifier's own token") for t in r.appended[r.accepted:])
        rows.append(f"<tr><td>{r.step}</td><td>{''.join(chips) or '-'}</td><td>{own or '-'}</td>"
                    f"<td>{r.accepted}/{r.num_drafted}</td><td>{html.escape(r.reason)}</td></tr>")
    head = (f"<p>{html.escape(trace.source)}: {trace.num_rounds} rounds, {trace.accepted_total}/{trace.drafted_total} "
            f"drafted tokens accepted ({_rate(trace.acceptance_rate)}), {trace.tokens_per_round:.2f} tokens per "
            f"verifier forward</p>")
    table = (f'<div class="tracer-assisted">{head}<table style="border-collapse:collapse"><tr><th>round</th>'
             f"<th>drafted</th><th>verifier</th><th>accepted</th><th>why</th></tr>{''.join(rows)}</table></div>")
    if path is not None:
        from pathlib import Path

        Path(path).write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>tracer assisted decoding"
                              f"</title></head><body>{table}</body></html>", encoding="utf-8")
    return table
