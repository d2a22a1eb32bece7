"""Beam-search views: the beam tree across steps (static SVG), its text form, and a standalone
HTML report.  Pure functions of a :class:`~tracer.beam_records.BeamTrace`; every token text is
escaped."""

from __future__ import annotations

import html
from typing import Any

from ..beam_records import EMPTY_SCORE, BeamTrace

__all__ = ["beam_tree", "beam_tree_svg", "beam_tree_text", "beam_report_html"]

COL_W, ROW_H, NODE_W, NODE_H, LEFT, TOP = 120, 30, 100, 22, 70, 34
SURVIVOR, FINISHED, PRUNED, BEST = "#3b6fb6", "#2a9d4b", "#b8b8b8", "#e4572e"


def _label(trace: BeamTrace, token_id: int, limit: int = 10) -> str:
    text = trace.text(token_id).replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def beam_tree(trace: BeamTrace, seq: int = 0) -> dict[str, Any]:
    """The tree as plain data: ``nodes`` (step, candidate, token, score, state, parent node) and
    ``best`` (the nodes on the path of the best finished hypothesis).  ``state`` is
    ``"survivor"`` (runs into the next step), ``"finished"`` (hit a stop among the top N),
    or ``"pruned"``."""
    nodes: list[dict[str, Any]] = []
    for s, step in enumerate(trace.steps):
        survivors = {int(k): j for j, k in enumerate(step.survivors[seq])}
        prev = trace.steps[s - 1] if s else None
        for k in range(step.cand_ids.shape[1]):
            score = float(step.cand_scores[seq, k])
            if score <= EMPTY_SCORE:
                continue
            parent_beam = int(step.cand_parent[seq, k])
            parent = None if prev is None else (s - 1, int(prev.survivors[seq, parent_beam]))
            if k in survivors and not step.cand_stop[seq, k]:
                state = "survivor"
            elif step.cand_stop[seq, k] and k < trace.num_beams:
                state = "finished"
            else:
                state = "pruned"
            nodes.append({"step": s, "candidate": k, "token": int(step.cand_ids[seq, k]), "score": score,
                          "state": state, "beam": survivors.get(k), "parent": parent, "parent_beam": parent_beam})
    ranking = trace.ranking(seq)
    best = trace.lineage(seq, ranking[0].step, ranking[0].candidate) if ranking else []
    return {"nodes": nodes, "best": best, "ranking": ranking}


def beam_tree_svg(trace: BeamTrace, seq: int = 0) -> str:
    """A static SVG of the beam tree of prompt ``seq``: one column per step, the K candidates
    transformers kept, edges to the beam each continues; blue = survives, green = finished,
    grey = pruned, red path = the best finished hypothesis."""
    tree = beam_tree(trace, seq)
    k_max = max((n["candidate"] for n in tree["nodes"]), default=0) + 1
    width = LEFT + COL_W * max(trace.num_steps, 1) + 20
    height = TOP + ROW_H * k_max + 40
    best = set(tree["best"])

    def pos(step: int, cand: int) -> tuple[float, float]:
        return LEFT + COL_W * step, TOP + ROW_H * cand

    title = f"beam search, prompt {seq}: {trace.num_beams} beams, {trace.num_steps} steps"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="tracer-beam-tree" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="monospace" font-size="11">',
             f'<text x="4" y="16" font-weight="bold">{html.escape(title)}</text>',
             f'<text x="4" y="{TOP + NODE_H / 2 + 4}">prompt</text>']
    for s in range(trace.num_steps):
        parts.append(f'<text x="{LEFT + COL_W * s}" y="{height - 8}" fill="#555">step {s}</text>')
    for node in tree["nodes"]:  # edges first, nodes on top
        x, y = pos(node["step"], node["candidate"])
        if node["parent"] is None:
            px, py = LEFT - 14, TOP
        else:
            px, py = pos(*node["parent"])
            px += NODE_W
        on_best = (node["step"], node["candidate"]) in best
        colour = BEST if on_best else {"survivor": SURVIVOR, "finished": FINISHED}.get(node["state"], PRUNED)
        parts.append(f'<line x1="{px}" y1="{py + NODE_H / 2}" x2="{x}" y2="{y + NODE_H / 2}" stroke="{colour}" '
                     f'stroke-width="{3 if on_best else 1}" opacity="{1 if node["state"] != "pruned" else 0.5}"/>')
    for node in tree["nodes"]:
        x, y = pos(node["step"], node["candidate"])
        on_best = (node["step"], node["candidate"]) in best
        colour = {"survivor": SURVIVOR, "finished": FINISHED}.get(node["state"], PRUNED)
        title = (f"step {node['step']} candidate {node['candidate']}: token {node['token']} "
                 f"{trace.text(node['token'])!r} continues beam {node['parent_beam']}, cumulative log-prob "
                 f"{node['score']:.4f}, {node['state']}"
                 + (f" as beam {node['beam']}" if node["state"] == "survivor" else ""))
        parts.append(f'<g class="node {node["state"]}"><title>{html.escape(title)}</title>'
                     f'<rect x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="4" fill="white" '
                     f'stroke="{BEST if on_best else colour}" stroke-width="{3 if on_best else 1.5}"/>'
                     f'<text x="{x + 4}" y="{y + 15}" fill="{colour if node["state"] != "pruned" else "#777"}">'
                     f'{html.escape(_label(trace, node["token"]))} {node["score"]:.2f}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def beam_tree_text(trace: BeamTrace, seq: int = 0) -> str:
    """The beam tree as text: per step each kept candidate, its beam and fate; then the ranking."""
    tree = beam_tree(trace, seq)
    lines = [f"beam search, prompt {seq}: {trace.num_beams} beams, {trace.num_steps} steps, "
             f"length_penalty={trace.length_penalty}, early_stopping={trace.early_stopping}"]
    for node in tree["nodes"]:
        fate = f"beam {node['beam']}" if node["state"] == "survivor" else node["state"]
        lines.append(f"  step {node['step']:>2} cand {node['candidate']:>2}: beam {node['parent_beam']} + "
                     f"{trace.text(node['token'])!r:<14} {node['score']:>9.4f}  -> {fate}")
    lines.append("ranking:")
    for h in tree["ranking"]:
        text = trace.text_of(h.tokens)
        lines.append(f"  #{h.rank} {h.score:.4f} (finished at step {h.step}){' returned' if h.returned else ''}: "
                     f"{text!r}")
    return "\n".join(lines)


def beam_report_html(trace: BeamTrace, path: Any = None) -> str:
    """A standalone HTML page: the beam tree of each prompt and its ranking table."""
    body = []
    for b in range(trace.batch_size):
        rows = "".join(
            f"<tr><td>{h.rank}</td><td>{h.score:.4f}</td><td>{h.step}</td><td>{'yes' if h.returned else ''}</td>"
            f"<td>{html.escape(trace.text_of(h.tokens))}</td>"
            f"<td>{html.escape(' '.join(map(str, h.beams)))}</td></tr>" for h in trace.ranking(b))
        body.append(f"<h2>prompt {b}</h2>{beam_tree_svg(trace, b)}<table><tr><th>rank</th><th>score</th>"
                    f"<th>finished at step</th><th>returned</th><th>text</th><th>beam per step</th></tr>"
                    f"{rows}</table>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>tracer beam search</title><style>"
            "body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:2px 6px;font-family:monospace}</style></head><body>"
            f"<h1>beam search: {trace.num_beams} beams</h1>{''.join(body)}</body></html>")
    if path is not None:
        from pathlib import Path

        Path(path).write_text(page, encoding="utf-8")
    return page

