"""Token display for multibyte text: characters split over byte-level tokens are shown whole,
never as "�"; whitespace and control tokens get visible markers; terminal output is safe."""

from __future__ import annotations

import dataclasses
import re

import pytest

from tracer.testing import make_trace
from tracer.text import (Piece, clip, clip_middle, display_width, graphemes, html_text, piece_of, pieces, terminal_safe,
                         token_pieces, visible)

# the seed's prompts and harder cases: emoji with skin tone, a ZWJ family, a flag, combining marks
TEXTS = [
    "你是一个乐于助人的助手。",
    "请介绍一下北京",
    "北京是中国的首都，有三千多年的历史。",
    "👍🏽 ok 👨\u200d👩\u200d👧 🇫🇷",
    "e\u0301 n\u0303 a\u0308\u0304 Zalgo: Z\u0351\u0350o\u0353",
    "mixed: 日本語 and English\n\tnext line 🎉",
]


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> unicode table, inverted (as byte-level BPE tokenizers use it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def tokenizer_bytes(tok, ids) -> dict[int, bytes]:
    """id -> raw bytes, the way the recorder keeps them (special tokens: their text)."""
    dec = _byte_decoder()
    special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})
    out = {}
    for i in {int(i) for i in ids}:
        piece = tok.convert_ids_to_tokens(i)
        out[i] = piece.encode("utf-8") if i in special else bytes(dec[c] for c in piece)
    return out


@dataclasses.dataclass
class _T:  # the two fields text.py reads
    token_text: dict
    token_bytes: dict


def _trace_for(tok, ids):
    return _T({i: tok.decode([i]) for i in set(ids)}, tokenizer_bytes(tok, ids))


@pytest.fixture(scope="module", params=["smollm2", "llama-3"])
def tok(request):
    from tracer.models import load_tokenizer

    return load_tokenizer(request.param)


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_read_back_the_decoded_text(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    t = _trace_for(tok, ids)
    got = pieces(t, ids)
    assert len(got) == len(ids)
    assert "".join(p.text for p in got) == tok.decode(ids) == text
    assert "".join(p.chars for p in got) == text
    shown = token_pieces(t, ids)
    assert all("\ufffd" not in s for s in shown), shown
    # the old per-token decode shows "�" for these texts: the case is real
    if any(ord(c) > 0x7FF for c in text):
        assert any("\ufffd" in tok.decode([i]) for i in ids) or len(ids) <= len(text)
    # a part-character token shows exactly its own bytes, escaped
    for p in got:
        if p.partial:
            assert p.display.startswith(p.display[: len(p.chars)])
            assert "".join(f"\\x{b:02x}" for b in p.partial) in p.display
            assert p.partial in t.token_bytes[p.token_id]


def test_chinese_character_split_over_tokens_shows_whole_on_last_token(tok):
    text = "请介绍一下北京，饕餮 🐼"  # rare characters: split by the Llama-3 tokenizer too
    ids = tok.encode(text, add_special_tokens=False)
    t = _trace_for(tok, ids)
    got = pieces(t, ids)
    split = [p for p in got if p.partial]
    assert len(split) >= 2, "this tokenizer splits none of these characters: pick another text"
    # every character appears whole exactly once, on the token holding its last byte
    assert "".join(c for p in got for c in p.chars) == text
    for p in got:
        for c in p.chars:
            assert c.encode()[-1] in t.token_bytes[p.token_id]
    for p in split:  # the partial token shows its bytes, and the next token completes the char
        nxt = got[got.index(p) + 1]
        assert nxt.chars or nxt.partial


def test_single_token_views_show_own_bytes(tok):
    ids = tok.encode("北", add_special_tokens=False)
    t = _trace_for(tok, ids)
    for i in ids:
        p = piece_of(t, i)
        assert "\ufffd" not in p.display
        own = t.token_bytes[i]
        try:
            assert p.display == own.decode("utf-8")
        except UnicodeDecodeError:
            assert p.display == "".join(f"\\x{b:02x}" for b in own)


def test_llama3_tokenizer_text_round_trip_with_special_tokens():
    from tracer.models import load_tokenizer

    tok = load_tokenizer("llama-3")
    ids = tok.apply_chat_template([{"role": "user", "content": "请介绍一下北京 🐼"}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    t = _trace_for(tok, ids)
    got = pieces(t, ids)
    assert "".join(p.text for p in got) == tok.decode(ids, skip_special_tokens=False)
    assert "<|start_header_id|>" in [p.display for p in got]


# -- visible markers -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, shown",
    [
        ("\n", "↵"), ("\n\n", "↵↵"), (" ", "·"), ("   ", "···"), ("\t", "⇥"), (" \n", "·↵"),
        ("\x07", "\\x07"), ("\x1b[31m", "\\x1b[31m"), (" the", " the"), ("a\nb", "a↵b"),
        ("\u0301", "◌\u0301"), ("\u202e", "\\u202e"), ("\ud800", "\\ud800"), ("\xa0", "\\xa0"),
    ],
)
def test_visible_markers(text, shown):
    assert visible(text) == shown


def test_pieces_markers_for_whitespace_tokens():
    t = _T({}, {1: b"\n", 2: b" ", 3: b" the", 4: b"\x07", 5: b"\xe5\x8c", 6: b"\x97"})
    assert token_pieces(t, [1, 2, 3, 4]) == ["↵", "·", " the", "\\x07"]
    assert token_pieces(t, [5, 6]) == ["\\xe5\\x8c→北", "北"]
    assert token_pieces(t, [6]) == ["\\x97"]  # a continuation byte on its own
    assert [p.text for p in pieces(t, [5])] == ["\ufffd"]  # an unfinished character at the end
    assert token_pieces(t, [5, 1]) == ["\\xe5\\x8c", "↵"]  # interrupted: the bytes, then the newline


def test_fallback_without_token_bytes():
    trace = make_trace(batch=1, steps=3)
    trace.token_bytes.clear()  # as in a trace file written before schema 1.1
    trace.token_text[7] = "\ufffd"
    trace.token_text[8] = "\n"
    assert not getattr(trace, "token_bytes", None)
    assert token_pieces(trace, [7, 8, 9, 999]) == ["\\x??", "↵", "t9", "<999>"]
    assert pieces(trace, [9])[0].known is False


def test_invalid_bytes_are_escaped_not_replaced():
    t = _T({}, {1: b"\xff", 2: b"\xed\xa0\x80", 3: b"\xc0\xaf", 4: b"ok"})
    shown = token_pieces(t, [1, 2, 3, 4])
    assert shown == ["\\xff", "\\xed\\xa0\\x80", "\\xc0\\xaf", "ok"]
    assert "".join(p.text for p in pieces(t, [1, 2, 3, 4])) == (b"\xff\xed\xa0\x80\xc0\xafok").decode("utf-8", "replace")


def test_split_matches_python_decoder_on_random_bytes():
    import random

    rng = random.Random(0)
    for _ in range(400):
        data = [bytes(rng.choice([rng.randrange(256), 0xE5, 0x8C, 0x97, 0xF0, 0x9F, 0x41]) for _ in range(rng.randrange(4)))
                for _ in range(rng.randrange(1, 8))]
        t = _T({}, dict(enumerate(data)))
        got = pieces(t, range(len(data)))
        assert "".join(p.text for p in got) == b"".join(data).decode("utf-8", "replace"), data
        assert all("\ufffd" not in p.display for p in got)
        for p, raw in zip(got, data):
            assert set(p.partial) <= set(raw)


# -- terminal and HTML -----------------------------------------------------------------


def test_terminal_safe():
    assert terminal_safe("a\x1b[2Jb\x07\n\r") == "a\\x1b[2Jb\\x07\\x0a\\x0d"
    assert terminal_safe("\ud800x") == "\\ud800x"
    assert terminal_safe("name\udcff.trace") == "name\\xff.trace"  # surrogateescape'd byte
    assert terminal_safe("\u202eevil") == "\\u202eevil"
    family = "👨\u200d👩\u200d👧 北京 e\u0301"
    assert terminal_safe(family) == family  # ZWJ, CJK and combining marks are kept
    assert terminal_safe("x" * 10, limit=5) == "xxxx…"
    # format characters are text (Thai breaks words with U+200B, Arabic number signs are drawn) ...
    thai, arabic = "สวัสดี\u200bครับ", "\u0600\u0661\u0662 \u06dd"
    assert terminal_safe(thai) == thai and terminal_safe(arabic) == arabic and html_text(thai) == thai
    # ... but in an identifier they would hide a difference (ids "a" and "a\u200b" look alike)
    from tracer.cli.common import shown
    from tracer.text import identifier_safe

    assert identifier_safe("a\u200b|\ufeff|soft\u00adhyphen|\U000e0041|x\u200dy") == \
        "a\\u200b|\\ufeff|soft\\xadhyphen|\\U000e0041|x\u200dy"
    assert shown("a\u200bb\u200d") == "a\\u200bb\u200d"  # the same rule in the CLI lines
    assert not re.search(r"[\x00-\x1f\x7f-\x9f]", terminal_safe("".join(map(chr, range(256)))))


# -- clipping to terminal columns -----------------------------------------------------


def test_display_width_counts_what_a_terminal_draws():
    assert display_width("北京。，") == 8  # wide and full-width: two columns each
    assert display_width("ok") == 2
    # one cluster each, two columns: skin tone, ZWJ family, flag, emoji presentation
    for emoji in ("👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "❤\ufe0f"):
        assert graphemes(emoji) == [emoji] and display_width(emoji) == 2, emoji
    assert graphemes("e\u0301x") == ["e\u0301", "x"] and display_width("e\u0301x") == 2


def test_clip_chinese_fits_the_width_exactly():
    prompt = "为什么要减少污染，保护环境？" * 3  # 42 characters, 84 columns
    for width in range(1, 40, 2):  # odd widths: whole characters (2 each) and "…" (1) fill them
        got = clip(prompt, width)
        assert display_width(got) == width and got == prompt[: (width - 1) // 2] + "…", (width, got)
    for width in range(2, 40, 2):  # even widths: one column short, never half a character
        got = clip(prompt, width)
        assert display_width(got) == width - 1 and got == prompt[: (width - 2) // 2] + "…", (width, got)
    assert clip(prompt, 84) == prompt and clip(prompt, 83) == prompt[:41] + "…"
    assert clip("北京", 0) == "" and clip("北京", 1) == "…"


def test_clip_emoji_keeps_whole_clusters():
    text = "👍🏽a👨\u200d👩\u200d👧b🇫🇷c" + "e\u0301" * 10
    clusters = graphemes(text)
    assert clusters[:6] == ["👍🏽", "a", "👨\u200d👩\u200d👧", "b", "🇫🇷", "c"]
    assert display_width(text) == 19
    for width in range(1, display_width(text)):
        got = clip(text, width)
        assert got.endswith("…"), (width, got)
        assert text.startswith(got[:-1]) and graphemes(got[:-1]) == clusters[: len(graphemes(got[:-1]))]
        nxt = clusters[len(graphemes(got[:-1]))]
        assert display_width(got) == width or display_width(got) + display_width(nxt) > width, (width, got)
    assert clip(text, 4) == "👍🏽a…"  # exactly 4 columns
    assert clip(text, 6) == "👍🏽a👨\u200d👩\u200d👧…" and display_width(clip(text, 6)) == 6
    assert clip(text, 5) == "👍🏽a…"  # the family would need 2 more: never a part of it


def test_clip_middle_keeps_head_and_tail():
    text = "前" * 20 + "中" * 20 + "后" * 20
    got = clip_middle(text, 41, head=0.25)
    assert display_width(got) == 41 and got == "前" * 5 + "…" + "后" * 15
    assert clip_middle("短", 10) == "短"


def test_html_text_escapes_and_encodes():
    out = html_text("<b a='1'>\ud800\x00&\n")
    assert out == "&lt;b a=&#x27;1&#x27;&gt;\\ud800\\x00&amp;\n"
    out.encode("utf-8")  # no lone surrogate left


def test_piece_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Piece(1, ("a",), "a").text = "b"  # type: ignore[misc]


def test_running_text_joins_characters_and_escapes_only_broken_bytes():
    from tracer.text import running_text

    t = _T({}, {5: b"\xe5\x8c", 6: b"\x97", 7: b"\xe4\xba", 8: b"!", 9: b"\xff"})
    assert running_text(pieces(t, [5, 6, 8])) == "北!"
    assert running_text(pieces(t, [8, 5, 6, 7])) == "!北\\xe4\\xba"  # stopped mid-character
    assert running_text(pieces(t, [9, 8])) == "\\xff!"


def test_running_text_escapes_lone_surrogates_and_controls_but_keeps_newlines():
    from tracer.text import running_text

    t = _T({1: "\ud800", 2: "a\nb\x1b"}, {})  # no bytes: the recorded texts
    assert running_text(pieces(t, [1, 2])) == "\\ud800a\nb\\x1b"


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 8, 13, 21])
def test_terminal_safe_limit_is_display_columns_and_never_cuts_a_cluster_or_escape(limit):
    """The limit counts terminal columns (a Chinese character takes two), and the cut falls only
    between whole characters, emoji clusters and escapes."""
    text = "北京是中国的首都👨‍👩‍👧 a\x1b[31m👍🏽!"
    out = terminal_safe(text, limit)
    assert display_width(out) <= limit
    body = out[:-1] if out.endswith("…") else out
    assert terminal_safe(text).startswith(body)
    whole = ["北", "京", "是", "中", "国", "的", "首", "都", "👨‍👩‍👧", " ", "a", "\\x1b", "[", "3", "1", "m", "👍🏽", "!"]
    assert body in {"".join(whole[:n]) for n in range(len(whole) + 1)}
    assert terminal_safe(text, 100) == terminal_safe(text)


def test_cli_shown_cuts_the_middle_by_columns_without_breaking_clusters():
    from tracer.cli.common import shown

    text = "中" * 200 + "\n" + "👍🏽" * 100
    out = shown(text, 40)
    assert display_width(out) <= 40 and "…" in out
    head, tail = out.split("…")
    assert set(head) == {"中"} and tail == "👍🏽" * (len(tail) // 2)
    assert shown("a\x1bb\nc") == "a\\x1bb\\nc"


def test_run_summary_prompt_cut_never_splits_an_escape():
    from tracer.cli.common import Result, format_summary

    r = Result(prompt="ab\x1bcd 北京", output="", new_tokens=1, stop_reason="eos", time_s=1.0)
    cells = [format_summary([r], width=w).splitlines()[2] for w in (3, 4, 5, 6, 7)]
    assert [c.split("  ")[1].strip() for c in cells] == ["ab…", "ab…", "ab…", "ab…", "ab\\x1b…"]
