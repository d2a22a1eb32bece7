"""Token text for every view: one lookup, multibyte-safe, control characters made visible.

Byte-level tokenizers (GPT-2 style BPE, as in SmolLM2 and Llama 3) split many characters —
most Chinese characters, emoji, combining marks — over several tokens.  Decoding one token at a
time gives "�" for each part.  Here a run of token ids is decoded as one byte stream and each
character is shown **whole on the token that completes it**; a token that holds only part of a
character shows its own bytes, escaped, followed by the character they belong to when a
later token completes it (``\\xe5\\x9b→因``: these bytes go on to make 因, shown whole on
the token that completes it).  So the whole characters of the pieces (``Piece.chars``), in
order, are exactly the text the tokenizer decodes, and no valid character ever shows as "�".

Bytes come from ``trace.token_bytes`` (id -> raw UTF-8 bytes, recorded from the tokenizer).
Traces without it (older files) fall back to ``trace.token_text``; a part-character token there
only has "�", which is shown as ``\\x??`` (bytes unknown).

Standard library only (no numpy needed), so storage, export and the CLI can all use it.
"""

from __future__ import annotations

import html
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

__all__ = [
    "Piece",
    "token_pieces",
    "pieces",
    "piece_of",
    "running_text",
    "Broken",
    "Partial",
    "visible",
    "terminal_safe",
    "safe_lines",
    "html_text",
    "escape_bytes",
    "is_blank",
    "graphemes",
    "display_width",
    "clip",
    "clip_middle",
]

#: Markers for whitespace and control characters in token displays.
MARKS = {"\n": "↵", "\t": "⇥", "\r": "␍"}
SPACE_MARK = "·"  # a space in a token made only of whitespace
UNKNOWN_BYTES = "\\x??"  # a part-character token of a trace without token bytes
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
#: Format characters an identifier keeps raw: zero-width (non-)joiners build emoji and scripts.
JOINERS = frozenset("\u200c\u200d")


def _escape_char(c: str) -> str:
    o = ord(c)
    if 0xDC80 <= o <= 0xDCFF:  # a byte smuggled through os.fsdecode's surrogateescape
        return f"\\x{o - 0xDC00:02x}"
    if o < 0x100:
        return f"\\x{o:02x}"
    return f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def _unsafe(c: str) -> bool:
    """Characters of text (prompts, token texts, answers) never written raw: controls (C0, DEL,
    C1), lone surrogates, line/paragraph separators and bidirectional overrides (which can
    reorder what a terminal shows).  Other format characters are text: Thai and Khmer break
    words with U+200B, Arabic number signs are drawn, a subdivision flag is built of tags."""
    return unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") or c in _BIDI


def unsafe_char(c: str) -> bool:
    """Characters of an identifier (a prompt id, a path, a name in a CLI line) never written
    raw: those of :func:`_unsafe`, and every other format character but the zero-width
    (non-)joiners (a zero-width space, a BOM, a soft hyphen or a tag character would make two
    ids that differ look alike)."""
    cat = unicodedata.category(c)
    return cat in ("Cc", "Cs", "Zl", "Zp") or (cat == "Cf" and c not in JOINERS)


def identifier_safe(s: Any, limit: int | None = None) -> str:
    """:func:`terminal_safe` for an identifier (prompt id, dataset name): also escapes the
    format characters :func:`unsafe_char` names."""
    return _escaped(str(s), unsafe_char, limit)


def escape_bytes(data: bytes) -> str:
    """``b"\\xe5\\x9b"`` -> the 8-character text ``\\xe5\\x9b``."""
    return "".join(f"\\x{b:02x}" for b in data)


def is_blank(text: str) -> bool:
    """Is ``text`` non-empty and made only of whitespace and control characters?"""
    return bool(text) and all(c.isspace() or _unsafe(c) for c in text)


def visible(text: str, *, blank: bool | None = None) -> str:
    """``text`` of one token for a label or table cell: newline ↵, tab ⇥, carriage return ␍,
    spaces of a whitespace-only token ·, other controls escaped (``\\x07``), a leading
    combining mark on a dotted circle (◌́).  ``blank``: whether the whole token is whitespace
    (default: whether ``text`` is)."""
    ws_only = is_blank(text) if blank is None else blank
    out = []
    for c in text:
        if c in MARKS:
            out.append(MARKS[c])
        elif c == " " and ws_only:
            out.append(SPACE_MARK)
        elif _unsafe(c) or (ws_only and c.isspace()):
            out.append(_escape_char(c))
        else:
            out.append(c)
    s = "".join(out)
    if s and unicodedata.combining(s[0]):
        s = "◌" + s
    return s


_ZWJ = "\u200d"
_VS16 = "\ufe0f"  # emoji presentation: the character before it is drawn two columns wide


def _extends(c: str) -> bool:
    """Does ``c`` belong to the cluster before it (combining marks, variation selectors, emoji
    skin-tone modifiers, tag characters of subdivision flags)?"""
    o = ord(c)
    return (unicodedata.category(c) in ("Mn", "Me", "Mc") or 0x1F3FB <= o <= 0x1F3FF
            or 0xE0020 <= o <= 0xE007F or c == _ZWJ)


def _regional(c: str) -> bool:
    return 0x1F1E6 <= ord(c) <= 0x1F1FF


def graphemes(text: str) -> list[str]:
    """``text`` split into what a reader sees as one character: a base character with its
    combining marks, variation selector and skin-tone modifier (``👍🏽``, ``é``), emoji joined
    by ZWJ (``👨\u200d👩\u200d👧``), a pair of regional indicators (a flag).  A close, standard
    library approximation of Unicode's extended grapheme clusters, enough for clipping and
    measuring display text."""
    out: list[str] = []
    for c in text:
        if out and (_extends(c) or out[-1].endswith(_ZWJ)
                    or (_regional(c) and _regional(out[-1][-1]) and len(out[-1]) == 1)):
            out[-1] += c
        else:
            out.append(c)
    return out


def _cluster_width(g: str) -> int:
    base = g[0]
    if _regional(base) or _VS16 in g or unicodedata.east_asian_width(base) in "WF":
        return 2
    if _extends(base) and base != _ZWJ and unicodedata.category(base) != "Mc":
        return 1  # a mark with nothing to sit on is drawn on its own (visible() adds a dotted circle)
    return 0 if base == _ZWJ else 1


def display_width(text: str) -> int:
    """Terminal columns: East Asian wide/full-width characters and emoji take two, a character's
    combining marks, variation selectors, skin-tone modifiers and ZWJ-joined emoji none more
    (measured per :func:`graphemes`)."""
    return sum(_cluster_width(g) for g in graphemes(text))


def _units(text: str | Sequence[str]) -> list[str]:
    return graphemes(text) if isinstance(text, str) else list(text)


def _fit(widths: Sequence[int], room: int) -> int:
    """How many of the leading ``widths`` fit in ``room`` columns."""
    used = 0
    for n, w in enumerate(widths):
        used += w
        if used > room:
            return n
    return len(widths)


def clip(text: str | Sequence[str], width: int, *, mark: str = "…") -> str:
    """``text`` if it fits in ``width`` terminal columns, else its longest start that fits
    together with ``mark``.  ``text``: a string, cut only between :func:`graphemes` (a Chinese
    character or an emoji is never cut in half), or a sequence of pieces never cut (e.g. a
    character's escape ``\\x0a``).  The result is at most ``width`` columns; one less only where
    the next piece is two columns wide."""
    units = _units(text)
    widths = [display_width(u) for u in units]
    if sum(widths) <= width:
        return "".join(units)
    room = width - display_width(mark)
    return "" if room < 0 else "".join(units[: _fit(widths, room)]) + mark


def clip_middle(text: str | Sequence[str], width: int, *, head: float = 0.5, mark: str = "…") -> str:
    """``text`` if it fits in ``width`` terminal columns, else its start and its end around
    ``mark``: the start takes the fraction ``head`` of the room, the end the rest.  ``text`` as
    for :func:`clip`; at most ``width`` columns in all."""
    units = _units(text)
    widths = [display_width(u) for u in units]
    if sum(widths) <= width:
        return "".join(units)
    room = width - display_width(mark)
    if room < 0:
        return ""
    n = _fit(widths, int(room * head))
    m = _fit(widths[n:][::-1], room - sum(widths[:n]))
    return "".join(units[:n]) + mark + "".join(units[len(units) - m:])


def terminal_safe(s: Any, limit: int | None = None) -> str:
    """``s`` for one line of terminal output: control characters (escape sequences, bells,
    newlines), lone surrogates, line separators and bidi overrides escaped; emoji, ZWJ
    sequences and combining marks kept.  Past ``limit`` terminal columns, cut with "…" by
    :func:`clip`: never inside a character, an emoji cluster or an escape."""
    return _escaped(str(s), _unsafe, limit)


def _escaped(text: str, unsafe: Callable[[str], bool], limit: int | None) -> str:
    if limit is None:
        return "".join(_escape_char(c) if unsafe(c) else c for c in text)
    return clip(escaped_units(text, unsafe), limit)


def escaped_units(text: str, unsafe: Callable[[str], bool],
                  escape: Callable[[str], str] = _escape_char) -> list[str]:
    """``text`` as the units :func:`clip` cuts between: its :func:`graphemes`, except that a
    cluster holding a character ``unsafe`` says to escape is split into its characters, each
    unsafe one written as ``escape`` gives it (``\\x1b``), never cut."""
    units: list[str] = []
    for g in graphemes(text):
        if any(unsafe(c) for c in g):
            units.extend(escape(c) if unsafe(c) else c for c in g)
        else:
            units.append(g)
    return units


def safe_lines(s: Any) -> str:
    """Multi-line text for a notebook or terminal: like :func:`terminal_safe` but newlines
    and tabs kept."""
    return "".join(_escape_char(c) if (_unsafe(c) and c not in "\n\t") else c for c in str(s))


def html_text(s: Any) -> str:
    """``s`` escaped for HTML text or a quoted attribute; lone surrogates and controls other
    than newline and tab are written as visible escapes (so the page always encodes as UTF-8)."""
    return html.escape(safe_lines(s), quote=True)


# --------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------


class Broken(bytes):
    """Bytes that are not part of any whole character: invalid UTF-8, or a character the run
    never completes (e.g. generation stopped mid-character)."""


class Partial(bytes):
    """Bytes of a character that a later token of the run completes; ``char`` is that character."""

    char: str = ""


#: Between a token's partial bytes and the character they belong to (``\xe5\x9b→因``).
PART_OF = "→"


@dataclass(frozen=True)
class Piece:
    """What one token shows.

    ``parts``: in order, ``str`` runs of whole characters completed by this token and
    ``bytes`` runs of this token's bytes that belong to a character it does not complete
    (shown escaped; a :class:`Partial` also names the character a later token completes).  ``text``: the characters this token adds to the decoded text (what the
    tokenizer's decode of the whole run gives at this point; "\\ufffd" only where the bytes are
    not valid UTF-8).  ``known``: the bytes were recorded (``trace.token_bytes``)."""

    token_id: int
    parts: tuple[str | bytes, ...]
    text: str
    known: bool = True

    @property
    def chars(self) -> str:
        """The whole characters shown on this token (``text`` without replacement chars)."""
        return "".join(p for p in self.parts if isinstance(p, str))

    @property
    def partial(self) -> bytes:
        return b"".join(p for p in self.parts if isinstance(p, bytes))

    @property
    def running(self) -> str:
        """This token in running text: its whole characters, plus escaped :class:`Broken`
        bytes (bytes completed by a later token are left to that token)."""
        out = [escape_bytes(p) if isinstance(p, Broken) else p for p in self.parts
               if isinstance(p, (str, Broken))]
        return safe_lines("".join(out))

    @property
    def display(self) -> str:
        """One display string: characters made :func:`visible`, partial bytes escaped."""
        blank = is_blank(self.chars)
        s = "".join(_shown_bytes(p) if isinstance(p, bytes) else visible(p, blank=blank) for p in self.parts)
        return s if self.known else s.replace("\ufffd", UNKNOWN_BYTES)


def _shown_bytes(part: bytes) -> str:
    """Partial bytes escaped, plus the character they belong to when a later token completes it."""
    char = getattr(part, "char", "")
    return escape_bytes(part) + (PART_OF + visible(char) if char else "")


def _expected(lead: int) -> int:
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def _valid_next(cur: list[int], b: int) -> bool:
    """Is ``b`` a valid next byte of the UTF-8 sequence ``cur`` (no overlongs, no surrogates)."""
    if not 0x80 <= b <= 0xBF:
        return False
    if len(cur) == 1:
        lo, hi = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}.get(cur[0], (0x80, 0xBF))
        return lo <= b <= hi
    return True


def _split(chunks: list[bytes]) -> list[tuple[list[str | bytes], str]]:
    """Decode the concatenation of ``chunks`` as UTF-8; per chunk its display parts and text."""
    parts: list[list[str | bytes]] = [[] for _ in chunks]
    texts: list[list[str]] = [[] for _ in chunks]
    cur: list[int] = []  # bytes of the character being assembled
    owners: list[int] = []  # chunk of each byte in cur

    def add_str(i: int, s: str) -> None:
        if parts[i] and isinstance(parts[i][-1], str):
            parts[i][-1] += s  # type: ignore[operator]
        else:
            parts[i].append(s)
        texts[i].append(s)

    def add_bytes(i: int, data: bytes, broken: bool, char: str = "") -> None:
        if char:  # the bytes of one character a later token completes: never merged
            part = Partial(data)
            part.char = char
            parts[i].append(part)
            return
        kind = Broken if broken else bytes
        if parts[i] and type(parts[i][-1]) is kind:
            parts[i][-1] = kind(parts[i][-1] + data)  # type: ignore[operator]
        else:
            parts[i].append(kind(data))

    def spill(complete: bool) -> None:
        """cur ends: as one character on the last owner, or as invalid bytes on every owner."""
        if complete:
            done, char = owners[-1], bytes(cur).decode("utf-8")
            for o in sorted(set(owners)):
                if o != done:
                    add_bytes(o, bytes(b for b, w in zip(cur, owners) if w == o), False, char)
            add_str(done, char)
        else:
            for o in sorted(set(owners)):
                add_bytes(o, bytes(b for b, w in zip(cur, owners) if w == o), True)
            texts[owners[0]].append("\ufffd")
        cur.clear()
        owners.clear()

    for i, chunk in enumerate(chunks):
        for b in chunk:
            if cur and not _valid_next(cur, b):
                spill(False)
            if cur:
                cur.append(b)
                owners.append(i)
                if len(cur) == _expected(cur[0]):
                    spill(True)
            elif b < 0x80:
                add_str(i, chr(b))
            elif _expected(b):
                cur.append(b)
                owners.append(i)
            else:
                add_bytes(i, bytes([b]), True)
                texts[i].append("\ufffd")
    if cur:
        spill(False)
    return [(p, "".join(t)) for p, t in zip(parts, texts)]


def _bytes_of(trace: Any, tid: int) -> bytes | None:
    data = (getattr(trace, "token_bytes", None) or {}).get(tid)
    return bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else None


def _fallback(trace: Any, tid: int) -> Piece:
    text = (getattr(trace, "token_text", None) or {}).get(tid)
    if not isinstance(text, str):
        text = f"<{tid}>"
    return Piece(tid, (text,) if text else (), text, known=False)


def pieces(trace: Any, ids: Iterable[Any]) -> list[Piece]:
    """One :class:`Piece` per id, the ids decoded together as one byte stream (pass a whole
    run, e.g. prompt + generated tokens, so characters split over tokens are joined)."""
    ids = [int(i) for i in ids]
    out: list[Piece] = []
    run: list[tuple[int, bytes]] = []

    def flush() -> None:
        for (tid, _), (parts, text) in zip(run, _split([b for _, b in run])):
            out.append(Piece(tid, tuple(parts), text))
        run.clear()

    for tid in ids:
        data = _bytes_of(trace, tid)
        if data is None:
            flush()
            out.append(_fallback(trace, tid))
        else:
            run.append((tid, data))
    flush()
    return out


def running_text(items: Iterable[Piece]) -> str:
    """The text of a run of pieces as one string: whole characters, with bytes that never make
    a character shown escaped (``\\xe5\\x9b``) instead of "�"."""
    return "".join(p.running if p.known else p.running.replace("\ufffd", UNKNOWN_BYTES) for p in items)


def token_pieces(trace: Any, ids: Iterable[Any]) -> list[str]:
    """One display string per token of the run ``ids`` (see :class:`Piece.display`)."""
    return [p.display for p in pieces(trace, ids)]


def piece_of(trace: Any, token_id: Any) -> Piece:
    """One token on its own (a top-k candidate, a table cell): its own bytes, decoded where
    they hold whole characters, escaped where they hold part of one."""
    return pieces(trace, [token_id])[0]


class TokenTexts:
    """Token text for a record that keeps ``token_text`` (id -> text) and ``token_bytes`` (id ->
    raw UTF-8 bytes), as :class:`~tracer.records.Trace` does: one token shown on its own, a run
    of tokens decoded together (a character split over tokens comes out whole), and the JSON of
    both maps (bytes as hex)."""

    token_text: dict[int, str]
    token_bytes: dict[int, bytes]

    def text(self, token_id: int) -> str:
        """One token for a label or table cell (:attr:`Piece.display`): partial bytes escaped."""
        return piece_of(self, int(token_id)).display

    def text_of(self, ids: Iterable[Any]) -> str:
        """The text of a run of tokens, its characters whole."""
        return running_text(pieces(self, ids))

    def token_maps_to_json(self) -> dict[str, Any]:
        return {"token_text": {str(k): v for k, v in self.token_text.items()},
                "token_bytes": {str(k): bytes(v).hex() for k, v in self.token_bytes.items()}}

    @staticmethod
    def token_maps_from_json(data: dict[str, Any]) -> dict[str, Any]:
        """The ``token_text``/``token_bytes`` keyword arguments from :meth:`token_maps_to_json`'s
        output (files written before ``token_bytes`` existed have only texts)."""
        return {"token_text": {int(k): str(v) for k, v in data.get("token_text", {}).items()},
                "token_bytes": {int(k): bytes.fromhex(v) for k, v in data.get("token_bytes", {}).items()}}
