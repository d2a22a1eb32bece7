"""The one path every view and the HTML report share (numpy and the standard library only).

- token text: :mod:`tracer.text` (pieces decoded per run, never "�" for valid text), placed in
  HTML by :func:`token_span`;
- one colour ramp for probabilities (:func:`prob_color`) and one for maps (viridis,
  :func:`heat_rgb`), PNG through PIL (:func:`png_bytes`);
- one "whole attention map" assembly (:func:`whole_maps`): the prefill matrix plus one row per
  decode step, reading each ``attention/<step>/<layer>`` blob **once** for all heads, with an
  optional row stride so exporters bound what they read.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..records import TraceFormatError, stack_rows
from ..text import Piece, escape_bytes, html_text, is_blank, pieces, visible

if TYPE_CHECKING:  # pragma: no cover
    from ..records import Trace

__all__ = [
    "prob_color",
    "heat_rgb",
    "png_bytes",
    "whole_maps",
    "map_read_plan",
    "token_span",
    "run_pieces",
    "backend_of",
    "missing_note",
]


# --------------------------------------------------------------------------------------
# Colours and images
# --------------------------------------------------------------------------------------


def prob_color(x: float) -> str:
    """0 → red, 1 → green (HSL), light enough to read black text on; NaN → grey."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x):
        return "hsl(0, 0%, 85%)"
    return f"hsl({int(120 * min(max(x, 0.0), 1.0))}, 70%, 80%)"


# matplotlib's viridis at 17 evenly spaced points (the maps' colours in figures and in the report)
_VIRIDIS = np.array(
    [[68, 1, 84], [72, 24, 106], [71, 45, 123], [66, 64, 134], [59, 82, 139], [51, 99, 141], [44, 114, 142],
     [38, 130, 142], [33, 145, 140], [31, 160, 136], [40, 174, 128], [63, 188, 115], [94, 201, 98],
     [132, 212, 75], [173, 220, 48], [216, 226, 25], [253, 231, 37]], dtype=np.float32)


def heat_rgb(a: np.ndarray, vmax: float = 1.0) -> np.ndarray:
    """`(H, W, 3)` uint8 viridis colours of ``a / vmax`` (clipped to [0, 1]; NaN as 0)."""
    v = np.nan_to_num(np.asarray(a, dtype=np.float32), nan=0.0, posinf=vmax, neginf=0.0) / max(vmax, 1e-12)
    x = np.clip(v, 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.floor(x).astype(np.int64)
    hi = np.minimum(lo + 1, len(_VIRIDIS) - 1)
    f = (x - lo)[..., None]
    return np.round(_VIRIDIS[lo] * (1 - f) + _VIRIDIS[hi] * f).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    """PNG of an `(H, W, 3)` uint8 image through PIL (installed with matplotlib)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# --------------------------------------------------------------------------------------
# Whole attention maps
# --------------------------------------------------------------------------------------


def map_read_plan(trace: Trace, layer: int, max_elements: int | None) -> int:
    """Row stride that keeps the prefill block read of ``layer`` under ``max_elements``
    (1: read it all).  Uses the blob's shape only (nothing is read)."""
    if max_elements is None:
        return 1
    block = trace.attention(0, layer)
    _, heads, q, t = (int(d) for d in block.shape)
    return max(1, math.ceil(heads * q * t / max(max_elements, 1)))


def whole_maps(
    trace: Trace,
    layer: int,
    seq: int = 0,
    *,
    upto_step: int | None = None,
    heads: Sequence[int] | None = None,
    row_stride: int = 1,
) -> np.ndarray:
    """`(N, T_rows, T)` float32: the whole lower-triangular map of each recorded head in
    ``heads`` (default: all), assembled from the prefill matrix and the new query row of each
    decode step up to ``upto_step``.  Each step's blob is read once for all heads.  With
    ``row_stride > 1`` only every ``row_stride``-th prefill query row is read (exporters
    bounding what they read); decode rows are always kept."""
    if not trace.attention_layers or not trace.attention_heads:
        raise KeyError("no attention maps recorded (RecordConfig(attention=True))")
    if not 0 <= seq < trace.batch_size:
        raise IndexError(f"sequence {seq} out of range: the trace has {trace.batch_size} sequences")
    recorded = list(trace.attention_heads)
    if heads is None:
        idx: Any = slice(None)
    else:
        missing = [h for h in heads if h not in recorded]
        if missing:
            raise KeyError(f"heads {missing} were not recorded (recorded: {recorded})")
        idx = [recorded.index(h) for h in heads]
    last = trace.num_steps - 1 if upto_step is None else int(upto_step)
    if not 0 <= last < max(trace.num_steps, 1) or trace.num_steps == 0:
        raise IndexError(f"step {last} out of range: the trace has {trace.num_steps} steps")
    first = trace.attention(0, layer)  # shape-checked (batch, heads)
    rows = [_as_float(first[seq][idx][:, :: max(int(row_stride), 1), :])]
    for s in range(1, last + 1):
        block = trace.attention(s, layer)
        if block.shape[2] < 1:
            raise TraceFormatError(f"attention/{s}/{layer} has no query row")
        rows.append(_as_float(block[seq][idx][:, -1:, :]))  # the new query row
    n = rows[0].shape[0]
    width = max(r.shape[-1] for r in rows)
    out = np.zeros((n, sum(r.shape[1] for r in rows), width), dtype=np.float32)
    for h in range(n):
        out[h] = stack_rows([r[h] for r in rows])
    return out


def _as_float(a: Any) -> np.ndarray:
    try:
        return np.asarray(a, dtype=np.float32)
    except (TypeError, ValueError) as exc:  # e.g. a complex or structured blob
        raise TraceFormatError(f"attention blob of dtype {getattr(a, 'dtype', '?')} is not numeric: {exc}") from None


# --------------------------------------------------------------------------------------
# Token text in HTML
# --------------------------------------------------------------------------------------

MARK_STYLE = "color:#9a9a9a;user-select:none"
PART_STYLE = "color:#7a5c00;font-size:.85em;user-select:none"


def token_span(piece: Piece, *, style: str = "", title: str = "", cls: str = "tok") -> str:
    """One token as an HTML ``<span>`` of running text.  Its text content (minus the
    ``tr-mk`` markers and ``tr-part`` byte runs, which are not selectable) is exactly the
    characters the token completes, so the text read off a run of spans is the decoded text.
    Whitespace/control-only tokens get a grey marker (↵ · ⇥ \\x07) before their whitespace;
    bytes of a character completed by a later token are shown escaped (``\\xe5\\x9b``)."""
    chars = piece.chars
    blank = is_blank(chars)
    out = []
    if blank:
        out.append(f'<span class="tr-mk" style="{MARK_STYLE}">{html_text(visible(chars))}</span>')
    for p in piece.parts:
        if isinstance(p, bytes):
            out.append(f'<span class="tr-part" style="{PART_STYLE}">{html_text(escape_bytes(p))}</span>')
        elif blank:
            out.append(html_text("".join(c for c in p if c in " \n\t")))
        else:
            out.append(html_text(p if piece.known else p.replace("\ufffd", "\\x??")))
    attrs = f' class="{cls}"' if cls else ""
    attrs += f' style="{style}"' if style else ""
    attrs += f' title="{html_text(title)}"' if title else ""
    return f"<span{attrs}>" + "".join(out) + "</span>"


def run_pieces(trace: Trace, seq: int) -> tuple[list[Piece], list[Piece]]:
    """Pieces of the prompt (without padding) and of the generated tokens of ``seq``, decoded
    as one run so a character split across the boundary is joined too."""
    prompt = [int(i) for i in trace.prompt_tokens(seq)]
    gen = [int(i) for i in trace.generated_ids(seq)]
    got = pieces(trace, prompt + gen)
    return got[: len(prompt)], got[len(prompt):]


# --------------------------------------------------------------------------------------
# Backends that do not record everything
# --------------------------------------------------------------------------------------


def backend_of(trace: Trace) -> str:
    backend = getattr(getattr(trace, "meta", None), "backend", None)
    return backend if isinstance(backend, str) and backend else "transformers"


def missing_note(trace: Trace, what: str) -> str:
    """"not recorded by this backend" for a non-transformers trace, else "no <what> recorded"."""
    backend = backend_of(trace)
    if backend != "transformers":
        return f"{what}: not recorded by this backend ({backend})"
    return f"no {what} recorded"
