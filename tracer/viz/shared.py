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

from ..records import TraceFormatError, blob_key, stack_rows
from ..text import Piece, escape_bytes, html_text, is_blank, pieces, visible

if TYPE_CHECKING:  # pragma: no cover
    from ..records import Trace

__all__ = [
    "prob_color",
    "heat_rgb",
    "png_bytes",
    "figure_png",
    "whole_maps",
    "map_read_plan",
    "BlockReader",
    "token_span",
    "top_candidates",
    "run_pieces",
    "input_pieces",
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


def figure_png(fig: Any, dpi: int = 90) -> bytes:
    """PNG of a matplotlib figure (the views' static form)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


# --------------------------------------------------------------------------------------
# Whole attention maps
# --------------------------------------------------------------------------------------


class BlockReader:
    """Reads rows of ``attention/<step>/<layer>`` blobs for one sequence.

    For a trace loaded from a file it slices the safetensors file (only the rows asked for are
    read, so a huge blob costs what the view shows, not its size); otherwise it reads through
    ``trace.attention`` (one ``blobs.get`` per call).  Shapes are checked against the trace:
    a blob of the wrong rank, batch or head count is a :class:`TraceFormatError`."""

    def __init__(self, trace: Trace):
        self.trace = trace
        self._file: Any = None
        self._last: tuple[str, np.ndarray] | None = None  # in-memory path: one get per blob
        from ..storage import SafetensorsStore  # lazily: storage imports safetensors

        path = getattr(trace.blobs, "path", None)
        if path is not None and isinstance(trace.blobs, SafetensorsStore):
            try:
                import safetensors

                self._file = safetensors.safe_open(str(path), framework="numpy")
            except Exception:  # unreadable: fall back to the store's own reads
                self._file = None

    def shape(self, step: int, layer: int) -> tuple[int, ...]:
        key = blob_key("attention", step, layer)
        if key not in self.trace.blobs:
            raise TraceFormatError(f"{key} is missing although the trace lists layer {layer} as recorded")
        if self._file is not None:
            try:
                shape = tuple(int(d) for d in self._file.get_slice(key).get_shape())
            except Exception as exc:
                raise TraceFormatError(f"cannot read the shape of {key} ({exc})") from None
        else:
            shape = tuple(self._get(step, layer).shape)
        t = self.trace
        if len(shape) != 4 or shape[0] != t.batch_size or shape[1] != len(t.attention_heads):
            raise TraceFormatError(f"{key} has shape {shape}, expected (batch {t.batch_size}, heads "
                                   f"{len(t.attention_heads)}, q, k)")
        return shape

    def rows(self, step: int, layer: int, seq: int, start: int, stop: int, stride: int = 1) -> np.ndarray:
        """`(H_rec, R, T)` float32: query rows ``start:stop:stride`` of sequence ``seq``."""
        key = blob_key("attention", step, layer)
        if self._file is not None:
            try:
                block = self._file.get_slice(key)[seq : seq + 1, :, start:stop:stride, :][0]
            except Exception as exc:
                raise TraceFormatError(f"cannot read {key} ({exc})") from None
        else:
            block = self._get(step, layer)[seq, :, start:stop:stride, :]
        return _as_float(block)

    def _get(self, step: int, layer: int) -> np.ndarray:
        key = blob_key("attention", step, layer)
        if self._last is None or self._last[0] != key:
            self._last = (key, self.trace.attention(step, layer))
        return self._last[1]


def map_read_plan(trace: Trace, layer: int, max_elements: int | None, reader: BlockReader | None = None) -> int:
    """Row stride that keeps the read of the prefill block of ``layer`` (one sequence) under
    ``max_elements`` (1: read it all).  Uses the blob's shape only (nothing is read)."""
    if max_elements is None:
        return 1
    _, heads, q, t = (reader or BlockReader(trace)).shape(0, layer)
    return max(1, math.ceil(heads * q * t / max(max_elements, 1)))


def whole_maps(
    trace: Trace,
    layer: int,
    seq: int = 0,
    *,
    upto_step: int | None = None,
    heads: Sequence[int] | None = None,
    row_stride: int = 1,
    reader: BlockReader | None = None,
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
    if trace.num_steps == 0 or not 0 <= last < trace.num_steps:
        raise IndexError(f"step {last} out of range: the trace has {trace.num_steps} steps")
    reader = reader or BlockReader(trace)
    q0 = reader.shape(0, layer)[2]
    rows = [reader.rows(0, layer, seq, 0, q0, max(int(row_stride), 1))[idx]]
    for s in range(1, last + 1):
        q = reader.shape(s, layer)[2]
        if q < 1:
            raise TraceFormatError(f"attention/{s}/{layer} has no query row")
        rows.append(reader.rows(s, layer, seq, q - 1, q)[idx])  # the new query row
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


def top_candidates(trace: Trace, top: Any, seq: int) -> tuple[list[int], np.ndarray, int]:
    """The candidates of a top-k row that are still candidates (masked ones, at -inf, left
    out): their ids, probabilities, and how many were masked."""
    keep = np.isfinite(np.asarray(top.values[seq], dtype=np.float64))
    return [int(i) for i in np.asarray(top.ids[seq])[keep]], np.asarray(top.probs[seq])[keep], int((~keep).sum())


# --------------------------------------------------------------------------------------
# Token text in HTML
# --------------------------------------------------------------------------------------

MARK_STYLE = "color:#9a9a9a;user-select:none"
PART_STYLE = "color:#a07820;font-size:.62em;vertical-align:sub;user-select:none"


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


def input_pieces(trace: Trace, ids: Sequence[int], run: Sequence[Piece], end: int) -> list[Piece]:
    """Pieces of ``ids``, the tokens fed to the model at one step, shown as in ``run`` (the
    sequence's prompt and generated pieces, :func:`run_pieces`): the fed tokens are the run's
    tokens just before position ``end`` (the prompt length plus the tokens generated before the
    step), so a token that completes a character split over earlier tokens shows it whole, as
    the chosen token did.  Fed tokens that are not the run's (left padding) are decoded alone."""
    ids, end = [int(i) for i in ids], min(end, len(run))
    k = 0
    while k < min(len(ids), end) and ids[-1 - k] == run[end - 1 - k].token_id:
        k += 1
    head = pieces(trace, ids[: len(ids) - k]) if k < len(ids) else []
    return head + list(run[end - k: end])


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
