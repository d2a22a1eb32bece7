"""Each token's raw bytes, from the tokenizer (no torch): byte-level BPE pieces mapped back
through GPT-2's byte alphabet, sentencepiece ``<0xNN>`` byte tokens as that byte, the rest as the
UTF-8 of their text.  Used by the recorder and the vLLM backend; the views read the result
(``Trace.token_bytes``) through :mod:`tracer.text`."""

from __future__ import annotations

import re
from typing import Any, Iterable

__all__ = ["token_bytes"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _is_byte_level(tokenizer: Any) -> bool:
    try:
        pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(" a b", add_special_tokens=False))
    except Exception:  # noqa: BLE001 - a tokenizer we cannot probe: use its decode
        return False
    return any(isinstance(p, str) and "Ġ" in p for p in pieces)


def token_bytes(tokenizer: Any, ids: Iterable[int], texts: dict[int, str] | None = None) -> dict[int, bytes]:
    """Each token's raw UTF-8 bytes: byte-level BPE tokens mapped back through GPT-2's byte map,
    sentencepiece ``<0xNN>`` byte tokens as that byte, special tokens and the rest as the UTF-8
    of their decoded text.  A token holding part of a character gets that part's bytes."""
    ids = list(ids)
    if tokenizer is None:
        return {i: (texts or {}).get(i, f"<{i}>").encode("utf-8", "surrogatepass") for i in ids}
    try:
        pieces = tokenizer.convert_ids_to_tokens(ids)
    except Exception:  # noqa: BLE001
        pieces = [None] * len(ids)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    byte_level = _is_byte_level(tokenizer)
    out: dict[int, bytes] = {}
    for i, piece in zip(ids, pieces):
        raw = None
        if isinstance(piece, str) and i not in special:
            m = _BYTE_TOKEN.fullmatch(piece)
            if m:
                raw = bytes([int(m.group(1), 16)])
            elif byte_level and all(ch in _UNICODE_TO_BYTE for ch in piece):
                raw = bytes(_UNICODE_TO_BYTE[ch] for ch in piece)
            elif not byte_level and "\u2581" in piece:  # sentencepiece word boundary
                raw = piece.replace("\u2581", " ").encode("utf-8")
        if raw is None:
            text = (texts or {}).get(i)
            if text is None:
                text = tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            raw = text.encode("utf-8", "surrogatepass")
        out[i] = raw
    return out
