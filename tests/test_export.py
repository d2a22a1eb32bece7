"""The HTML report, Perfetto JSON and ``tracer inspect`` text: built from the view path, the
displayed numbers equal the records, multibyte text legible, bounded reads."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from tracer import export
from tracer.export import inspect_trace, trace_to_html, trace_to_perfetto
from tracer.records import MemoryStore, TopK, blob_key, replace
from tracer.storage import save_trace
from tracer.testing import make_trace
from tracer.text import display_width, graphemes, html_text, piece_of, terminal_safe
from tracer.viz import report
from tracer.viz.shared import heat_rgb, whole_maps

REPO_ROOT = Path(__file__).resolve().parents[1]
ZH = "北京是中国的首都。👨\u200d👩\u200d👧 e\u0301\n好"  # CJK, a ZWJ family, a combining mark, a newline


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def with_bytes(trace, token_bytes):
    """``trace`` with ``token_bytes`` set (a field after the core merge, an attribute before)."""
    object.__setattr__(trace, "token_bytes", dict(token_bytes))
    return trace


def multibyte_trace(text: str = ZH, chunk=(2, 1)):
    """A synthetic trace whose sequence 0 generates ``text`` split into 1- and 2-byte tokens
    (so most characters span tokens), then the terminator; the prompt is ASCII."""
    data = text.encode("utf-8")
    chunks, i, k = [], 0, 0
    while i < len(data):
        n = chunk[k % len(chunk)]
        chunks.append(data[i : i + n])
        i += n
        k += 1
    ids: dict[bytes, int] = {}
    for c in chunks:
        ids.setdefault(c, 10 + len(ids))
    assert 10 + len(ids) < 200
    trace = make_trace(batch=1, steps=len(chunks) + 1, vocab=200)
    gen = [ids[c] for c in chunks]
    steps = [replace(s, chosen=np.array([gen[n]], np.int64)) if n < len(gen) else s for n, s in enumerate(trace.steps)]
    trace.steps = steps
    trace.prompt_ids = np.full((1, 5), 3, np.int64)
    trace.sequences = np.concatenate([trace.prompt_ids, np.array([gen + [1]], np.int64)], axis=1)
    tb = {i: f"t{i}".encode() for i in range(200)}
    tb.update({0: b"<pad>", 1: b"<|eot|>", 3: b"Q"})
    tb.update({v: k for k, v in ids.items()})
    trace.token_text = {i: b.decode("utf-8", "replace") for i, b in tb.items()}  # the old per-token decode
    trace.output_text = [text]
    return with_bytes(trace, tb)


class _Spans(HTMLParser):
    """Text read off the token spans of the report's generated text (markers and partial
    bytes, which are not selectable, left out)."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.gen: list[str] = []
        self.in_gen = 0

    def handle_starttag(self, tag, attrs):
        cls = dict(attrs).get("class") or ""
        self.stack.append(cls)
        if "gen" in cls.split() and tag == "div":
            self.in_gen = len(self.stack)

    def handle_endtag(self, tag):
        if self.in_gen == len(self.stack):
            self.in_gen = 0
        self.stack.pop()

    def handle_data(self, data):
        if self.in_gen and not any(c in ("tr-mk", "tr-part") for c in self.stack):
            self.gen.append(data)


def read_generated(html_text: str) -> str:
    p = _Spans()
    p.feed(html_text)
    return "".join(p.gen)


# --------------------------------------------------------------------------------------
# multibyte text
# --------------------------------------------------------------------------------------


def test_html_shows_every_character_and_reads_back_the_text(tmp_path):
    trace = multibyte_trace()
    assert any("\ufffd" in trace.token_text[int(i)] for i in trace.generated_ids(0))  # the old display
    out = trace_to_html(trace)
    assert "\ufffd" not in out
    assert read_generated(out) == ZH + "<|eot|>"
    for ch in "北京是中国的首都。👨👩👧好":
        assert ch in out, ch
    # the first token of 北 (e5 8c) shows its bytes; the character sits on the token completing it
    assert "<span class=\"tr-part\"" in out and "\\xe5\\x8c" in out
    assert "↵" in out  # the newline token's marker


def test_perfetto_shows_each_character_on_the_token_that_completes_it():
    trace = multibyte_trace()
    shown = [e["args"]["chosen_tokens"][0] for e in trace_to_perfetto(trace)["traceEvents"]
             if "chosen_tokens" in e.get("args", {})]
    assert shown[:2] == ["\\xe5\\x8c→北", "北"]  # 北 = e5 8c 97, split 2 + 1
    joined = "".join(shown)
    for ch in "北京是中国的首都。👨👩👧好":
        assert ch in joined, ch
    assert "\ufffd" not in joined


def test_text_views_and_inspect_have_no_replacement_char(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from tracer import viz

    trace = multibyte_trace()
    for s in range(trace.num_steps):
        assert "\ufffd" not in viz.step_text(trace, s)
    strip = viz.token_strip_html(trace)
    assert "\ufffd" not in strip
    # inspect on a saved folder, reading this in-memory trace (token_bytes may not be saved yet)
    folder = save_trace(trace, tmp_path / "zh.trace")
    monkeypatch.setattr(export, "load_trace", lambda path: trace)
    text = inspect_trace(folder)
    assert "\ufffd" not in text
    assert "generated[0]: 北京是中国的首都。👨\u200d👩\u200d👧 e\u0301\\x0a好" in text  # newline escaped


def fed_as_generated(trace):
    """``trace`` with each step's ``input_ids`` what generate feeds: the prompt at step 0, then
    the token chosen at the step before (:func:`multibyte_trace` keeps the synthetic ones)."""
    gen = [int(s.chosen[0]) for s in trace.steps]
    for n, s in enumerate(trace.steps):
        ids = trace.prompt_ids if n == 0 else np.array([[gen[n - 1]]], np.int64)
        trace.steps[n] = replace(s, inputs=replace(s.inputs, input_ids=ids))
    return trace


def steps_columns(table: str) -> list[tuple[str, str]]:
    """(input tokens, chosen) of each row of the report's steps table, as the page's text."""
    import html

    cells = re.findall(r"<tr><td class='num'>\d+</td><td><span class='tok'>(.*?)</span></td>"
                       r"<td><span class='tok'>(.*?)</span></td>", table)
    return [(html.unescape(a), html.unescape(b)) for a, b in cells]


def test_steps_table_input_tokens_show_characters_as_the_chosen_column():
    trace = fed_as_generated(multibyte_trace("北京<&>", chunk=(2, 1)))  # e5 8c | 97 | e4 ba | ac | <& | >
    cols = steps_columns(report.steps_table_html(trace, 0, 100))
    assert [c for _, c in cols] == ["\\xe5\\x8c→北", "北", "\\xe4\\xba→京", "京", "<&", ">", "<|eot|>"]
    assert [i for i, _ in cols] == ["Q Q Q Q Q", "\\xe5\\x8c→北", "北", "\\xe4\\xba→京", "京", "<&", ">"]
    assert all(inp == chosen for (inp, _), (_, chosen) in zip(cols[1:], cols))  # the token chosen, then fed
    assert "<&" not in report.steps_table_html(trace, 0, 100)  # still escaped
    from tracer.viz.steps import _inputs_html, step_text  # the step explorer's inputs pane alike

    assert "tokens         ['北']" in step_text(trace, 2) and "<code>北</code>" in _inputs_html(trace, 2, 0)
    assert "<code>&lt;&amp;</code>" in _inputs_html(trace, 5, 0)


def test_display_text_escapes_a_cut_character():
    trace = multibyte_trace("ab北", chunk=(1,))  # a, b, e5, 8c, 97
    short = replace(trace.steps[4], chosen=np.array([1], np.int64))  # eos instead of the last byte
    trace.steps = trace.steps[:4] + [short]
    assert export.display_text(trace, 0) == "ab\\xe5\\x8c"


# --------------------------------------------------------------------------------------
# arrays shown = arrays recorded
# --------------------------------------------------------------------------------------


def _pngs(out: str) -> list[np.ndarray]:
    from PIL import Image

    found = re.findall(r"<figure><img alt='[^']*' src='data:image/png;base64,([^']+)'", out)
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")) for b in found]


def test_report_maps_are_the_recorded_maps():
    pytest.importorskip("PIL")
    trace = make_trace(batch=2, steps=5, layers=2, heads=4)
    imgs = _pngs(trace_to_html(trace))
    assert len(imgs) == 2
    for layer, img in enumerate(imgs):
        expected = np.mean([trace.head_map(layer, h, 0) for h in trace.attention_heads], axis=0)
        assert img.shape == (*expected.shape, 3) == (5 + 4, 9, 3)
        np.testing.assert_array_equal(img, heat_rgb(expected))
    # viridis ends: 0 is dark violet, 1 is yellow (the notebook figures' colormap)
    assert heat_rgb(np.array([[0.0, 1.0]])).tolist() == [[[68, 1, 84], [253, 231, 37]]]


def test_whole_maps_equal_head_map_for_every_step_and_head():
    trace = make_trace(batch=2, steps=6, layers=2, heads=4)
    for layer in trace.attention_layers:
        for step in range(trace.num_steps):
            for seq in range(2):
                got = whole_maps(trace, layer, seq, upto_step=step)
                for i, h in enumerate(trace.attention_heads):
                    np.testing.assert_array_equal(got[i], trace.head_map(layer, h, seq, upto_step=step))


def test_whole_maps_take_the_new_query_row_of_refed_decode_blocks():
    """With use_cache=False every step re-feeds the whole sequence: a decode block then has
    several query rows, and the new one is the last."""
    trace = make_trace(batch=1, steps=4, layers=1, heads=2)
    rng = np.random.default_rng(1)
    for s in range(1, 4):
        key = blob_key("attention", s, 0)
        last = trace.blobs.get(key)
        noise = rng.random((1, 2, 3, last.shape[-1])).astype(np.float16)
        trace.blobs.put(key, np.concatenate([noise, last], axis=2))
    got = whole_maps(trace, 0, 0)
    for i, h in enumerate(trace.attention_heads):
        np.testing.assert_array_equal(got[i], trace.head_map(0, h, 0))


class CountingStore(MemoryStore):
    def __init__(self, inner):
        super().__init__({k: inner.get(k) for k in inner.keys()})
        self.reads = 0

    def get(self, key):
        self.reads += 1
        return super().get(key)


def test_attention_views_read_each_blob_once_per_step():
    pytest.importorskip("matplotlib")
    pytest.importorskip("ipywidgets")
    from tracer import viz

    trace = make_trace(batch=1, steps=20, layers=4, heads=8, kv_heads=2)
    trace.blobs = CountingStore(trace.blobs)
    viz.attention_maps(trace, 19, 0)
    assert trace.blobs.reads == 4 * 20  # was 4 layers x 8 heads x 20 steps = 640
    trace.blobs.reads = 0
    viz.attention_maps(trace, 19, 0, kv_heads=True)
    assert trace.blobs.reads == 4 * 20
    w = viz.attention_grid(trace, step=0)
    trace.blobs.reads = 0
    w.step.value = 19  # one slider move: maps read once, the grid drawn from them
    assert trace.blobs.reads == 4 * 20  # was 1280 (640 for the maps, 640 again for the figure)
    trace.blobs.reads = 0
    trace_to_html(trace)
    assert trace.blobs.reads == 4 * 20


def test_cache_section_shows_recorded_bytes():
    trace = make_trace(batch=2, steps=6)
    c = trace.cache
    trace.cache = c = replace(c, nbytes=c.nbytes + 64)  # measured: the memory model's bytes + 64 per layer
    out = report.cache_html(trace)
    rows = re.findall(r"<tr>(<td class='num'>.*?)</tr>", out)
    assert len(rows) == c.seq_len.shape[0]
    for s, row in enumerate(rows):
        cells = re.findall(r"<td class='num'>(.*?)</td>", row)
        assert cells[0] == str(s) and cells[1] == str(int(c.seq_len[s, 0]))
        assert cells[4] == str(int(c.nbytes[s, 0]))  # per layer (all layers equal here)
        assert cells[5] == f"{int(c.total_bytes[s]):,}"  # measured
        assert cells[6] == f"{int(c.predicted_bytes()[s]):,}"  # predicted
        assert int(c.total_bytes[s]) == int(c.predicted_bytes()[s]) + 64 * c.num_layers
    assert "measured" in out and "predicted" in out and "predicted without GQA" in out
    assert "KV cache" in trace_to_html(trace)


def test_steps_table_leaves_masked_candidates_out_with_a_count():
    trace = make_trace(batch=1, steps=3)
    step = trace.steps[1]
    top = step.stages[-1].top
    values = top.values.copy()
    values[0, 3:] = -np.inf  # the last two candidates were masked
    stage = replace(step.stages[-1], top=TopK(ids=top.ids, values=values, logsumexp=top.logsumexp))
    trace.steps[1] = replace(step, stages=(*step.stages[:-1], stage))
    out = report.steps_table_html(trace, 0, 10)
    row = out.split("<tr>")[3]  # header, step 0, step 1
    masked = [int(i) for i in top.ids[0, 3:]]
    kept = [int(i) for i in top.ids[0, :3]]
    assert "+2 masked" in row
    shown = lambda i: f"<span class='tok'>{html_text(piece_of(trace, i).display)}</span> "  # noqa: E731
    for i in kept:
        assert shown(i) in row
    for i in masked:
        assert shown(i) not in row


def test_generation_config_shows_only_non_default_settings():
    # a real recorded config (transformers 5.24, sampled run): 40 keys
    cfg = {"max_length": 65, "max_new_tokens": 24, "min_length": 0, "early_stopping": False, "do_sample": True,
           "num_beams": 1, "use_cache": True, "temperature": 0.7, "top_k": 50, "top_p": 0.9, "typical_p": 1.0,
           "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "repetition_penalty": 1.1, "encoder_repetition_penalty": 1.0,
           "length_penalty": 1.0, "no_repeat_ngram_size": 0, "remove_invalid_values": False,
           "num_return_sequences": 1, "output_attentions": False, "output_hidden_states": False,
           "output_scores": False, "return_dict_in_generate": False, "pad_token_id": 2, "bos_token_id": 1,
           "eos_token_id": [2], "encoder_no_repeat_ngram_size": 0, "num_assistant_tokens": 20,
           "num_assistant_tokens_schedule": "constant", "assistant_confidence_threshold": 0.4,
           "assistant_lookbehind": 10, "target_lookbehind": 10, "diversity_penalty": 0.0, "num_beam_groups": 1,
           "_from_model_config": True, "transformers_version": "5.24.0", "_bos_token_tensor": 1,
           "_eos_token_tensor": [2], "_pad_token_tensor": 2, "_decoder_start_token_tensor": None}
    rows, hidden = report.generation_rows(cfg)
    assert dict(rows) == {"bos_token_id": "1", "do_sample": "True", "eos_token_id": "[2]", "max_length": "65",
                          "max_new_tokens": "24", "pad_token_id": "2", "repetition_penalty": "1.1",
                          "temperature": "0.7", "top_p": "0.9"}
    assert hidden == len(cfg) - 9
    trace = make_trace()
    trace.meta.generation_config = cfg
    out = trace_to_html(trace)
    assert "<th>temperature</th><td>0.7</td>" in out and "typical_p" not in out and "31 more settings" in out


def test_generation_defaults_match_transformers():
    transformers = pytest.importorskip("transformers")
    gc = transformers.GenerationConfig
    if hasattr(gc, "_get_default_generation_params"):  # 5.x: the effective defaults
        defaults = gc._get_default_generation_params()
    else:  # 4.x: the constructor's defaults
        defaults = gc().to_dict()
    for k, v in report.GENERATION_DEFAULTS.items():
        if k in defaults:
            assert defaults[k] == v or (v is False and defaults[k] is None), (k, defaults[k], v)


def test_export_imports_no_torch_or_transformers():
    code = ("import sys, tracer.export\n"
            "from tracer.testing import make_trace\n"
            "tracer.export.trace_to_html(make_trace()); tracer.export.trace_to_perfetto(make_trace())\n"
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


# --------------------------------------------------------------------------------------
# API and robustness
# --------------------------------------------------------------------------------------


def test_to_html_and_to_perfetto_return_the_path(tmp_path):
    trace = make_trace()
    assert trace.to_html(tmp_path / "r.html") == tmp_path / "r.html"
    assert (tmp_path / "r.html").read_text(encoding="utf-8") == trace.to_html()
    assert trace.to_perfetto(tmp_path / "p.json") == tmp_path / "p.json"
    assert json.loads((tmp_path / "p.json").read_text(encoding="utf-8")) == json.loads(json.dumps(trace.to_perfetto()))


def test_lone_surrogates_and_controls_are_written_safely(tmp_path):
    trace = make_trace(text="\ud800\x1b[31m\x00")
    trace.meta.model_name = "m\udcff\x07"
    trace.meta.notes = ["\ud83d"]
    path = trace_to_html(trace, tmp_path / "r.html")
    out = path.read_text(encoding="utf-8")
    # the token's text is escaped (as text, or as the surrogate-passed bytes Trace.from_steps
    # derives from it): never a raw escape sequence, NUL or lone surrogate in the file
    assert ("\\ud800\\x1b[31m\\x00" in out or "\\xed\\xa0\\x80\\x1b[31m\\x00" in out)
    assert "\x1b" not in out and "\x00" not in out
    doc = trace_to_perfetto(trace, tmp_path / "p.json")
    raw = doc.read_bytes().decode("utf-8")  # strict UTF-8: no lone surrogate written
    assert json.loads(raw)["otherData"]["model"] == "m\\xff\\x07"
    assert "\x1b" not in raw and "\x07" not in raw


def test_not_recorded_by_this_backend():
    pytest.importorskip("matplotlib")
    from tracer import viz

    trace = make_trace(attention=False)
    trace.cache = None
    trace.meta.backend = "vllm"  # a TraceMeta field after the core merge
    out = trace_to_html(trace)
    assert "attention maps: not recorded by this backend (vllm)" in out
    assert "KV-cache timeline: not recorded by this backend (vllm)" in out
    assert viz.cache_text(trace) == "cache timeline: not recorded by this backend (vllm)"
    with pytest.raises(KeyError, match="not recorded by this backend"):
        viz.attention_maps(trace, 0)
    trace.meta.backend = "transformers"
    assert "no attention maps recorded" in trace_to_html(trace)


def _sparse_blob_trace(tmp_path: Path, side: int) -> Path:
    """A saved trace whose prefill attention blob is ``(1, 2, side, side)`` float16, written
    as a sparse file (the manifest's size updated; the sha256 is only checked on request)."""
    trace = make_trace(batch=1, steps=2, layers=1, heads=2, kv_heads=1)
    folder = save_trace(trace, tmp_path / "big.trace")
    tensors = {blob_key("attention", 0, 0): [1, 2, side, side], blob_key("attention", 1, 0): [1, 2, 1, side + 1]}
    header, offset = {}, 0
    for k, shape in tensors.items():
        n = int(np.prod(shape)) * 2
        header[k] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    blobs = folder / "blobs.safetensors"
    with open(blobs, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)  # a hole: reads as zeros, takes no disk
    m = json.loads((folder / "manifest.json").read_text())
    for e in m["files"]:
        if e["name"] == "blobs.safetensors":
            e["bytes"] = blobs.stat().st_size
    (folder / "manifest.json").write_text(json.dumps(m))
    return folder


def test_huge_sparse_blob_is_sampled_not_read_whole(tmp_path):
    pytest.importorskip("PIL")
    side = 24_000  # 2 x 24000^2 float16 = 2.3 GB: read whole, float32, it would need ~7 GB
    folder = _sparse_blob_trace(tmp_path, side)
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))\n"  # the 2.3 GB map stays virtual
        "from tracer.storage import load_trace\n"
        "from tracer.export import trace_to_html\n"
        f"out = trace_to_html(load_trace({str(folder)!r}))\n"
        "assert 'sampled every' in out, out[-3000:]\n"
        # VmHWM: this process's own peak. ru_maxrss would also count the pytest process it was
        # forked from (Linux keeps the pre-exec peak), which is large once a model was loaded.
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) // 1024)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    peak_mb = int(res.stdout.strip().splitlines()[-1])
    assert peak_mb < 1200, f"peak RSS {peak_mb} MB: the whole blob was read"


def test_map_rows_are_strided_above_the_budget(monkeypatch):
    pytest.importorskip("PIL")
    trace = make_trace(batch=1, steps=3, layers=1, heads=4, prompt_len=12)
    monkeypatch.setattr(report, "MAX_MAP_ELEMENTS", 4 * 12 * 13 // 3)  # the 12x12 prefill read every 3rd row
    out = trace_to_html(trace)
    assert "sampled every 3th query row" in out
    (img,) = _pngs(out)
    full = np.mean([trace.head_map(0, h, 0) for h in trace.attention_heads], axis=0)
    expected = np.concatenate([full[:12][::3], full[12:]])  # every 3rd prefill row, then the decode rows
    np.testing.assert_array_equal(img, heat_rgb(expected))


# --------------------------------------------------------------------------------------
# the real embedded model, the seed's Chinese prompt
# --------------------------------------------------------------------------------------


def test_inspect_escapes_the_folder_name(tmp_path):
    folder = save_trace(make_trace(), tmp_path / "\x1b[2J\x07evil\u202e.trace")
    out = inspect_trace(folder)
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "\\x1b[2J\\x07evil\\u202e.trace" in out


@pytest.mark.parametrize("name", [None, "llama-3"])  # the embedded SmolLM2's tokenizer, Llama 3's
def test_inspect_prompt_preview_shows_the_users_instruction(tmp_path, name):
    from tracer.models import load_tokenizer
    from tracer.session import encode_prompts

    instruction = "请用三句话介绍北京，\n并说明原因。"
    texts, _ = encode_prompts(load_tokenizer(name), instruction)  # SmolLM2 adds its long default system prompt
    assert texts[0].index(instruction) > 80 or name is not None  # the old 80-character preview stopped before it
    trace = make_trace(batch=1)
    trace.prompts = texts
    out = inspect_trace(save_trace(trace, tmp_path / "p.trace"))
    preview = next(ln for ln in out.splitlines() if ln.startswith("prompt[0]: "))[len("prompt[0]: "):]
    assert terminal_safe(instruction) in preview  # the user's own text, whole and exact
    assert display_width(preview) <= export.PROMPT_PREVIEW_COLUMNS
    head, tail = preview.split("…")  # exact text on both sides of one ellipsis, cut between
    units = [terminal_safe(g) for g in graphemes(texts[0])]  # whole characters, never inside "\\x0a"
    assert head in {"".join(units[:i]) for i in range(15, len(units))}
    assert tail in {"".join(units[i:]) for i in range(len(units))}


def test_chinese_prompt_on_the_embedded_model(embedded, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from tracer import viz
    from tracer.config import RecordConfig
    from tracer.hooks import trace_generate

    from test_text import tokenizer_bytes

    model, tok = embedded
    trace = trace_generate(model, tok, "请介绍一下北京", system="你是一个乐于助人的助手。", max_new_tokens=24,
                           record=RecordConfig(attention=True, attention_layers=[0, 29]))
    if not getattr(trace, "token_bytes", None):  # before the core merge the recorder keeps no bytes
        with_bytes(trace, tokenizer_bytes(tok, trace.token_text))
    gen_ids = [int(i) for i in trace.generated_ids(0)]
    assert any("\ufffd" in tok.decode([i]) for i in gen_ids), "no split character: the case is not exercised"
    text = trace.generated_text[0]
    assert "\ufffd" not in text
    out = trace_to_html(trace, tmp_path / "zh.html").read_text(encoding="utf-8")
    assert "\ufffd" not in out
    terms = [tok.decode([i]) for i in gen_ids if i in trace.meta.terminators]
    assert read_generated(out) == tok.decode(gen_ids, skip_special_tokens=False) == text + "".join(terms)
    for s in range(trace.num_steps):
        assert "\ufffd" not in viz.step_text(trace, s)
    assert "\ufffd" not in viz.token_strip_html(trace)
    steps = report.steps_table_html(trace, 0, 100)
    assert "\ufffd" not in steps and "北" in steps
    cols = steps_columns(steps)  # each token fed as it was shown when chosen, split characters whole
    assert [i for i, _ in cols[1:]] == [c for _, c in cols[:-1]] and any("→" in c for _, c in cols)
    folder = save_trace(trace, tmp_path / "zh.trace")
    monkeypatch.setattr(export, "load_trace", lambda path: trace)  # the saved file may not keep bytes yet
    shown = inspect_trace(folder)
    assert "\ufffd" not in shown and f"generated[0]: {text[:40]}" in shown.replace("\\x0a", "\n")


def test_step_explorer_panes_show_characters_in_context():
    pytest.importorskip("ipywidgets")
    pytest.importorskip("matplotlib")
    from tracer import viz

    trace = multibyte_trace("北", chunk=(2, 1))  # e5 8c | 97
    w = viz.step_explorer(trace)
    w.slider.value = 1  # the token completing 北
    assert "<code>北</code> (token bytes <code>\\x97</code>)" in w.table_html.value
    assert "北" in w.text_html.value and "\ufffd" not in w.text_html.value + w.inputs_html.value
    w.slider.value = 0
    assert "<code>\\xe5\\x8c</code>" in w.table_html.value


def _contrast(a: str, b: str) -> float:
    """WCAG contrast ratio of two ``#rrggbb`` colours."""
    def lum(c: str) -> float:
        ch = [int(c[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        ch = [x / 12.92 if x <= 0.03928 else ((x + 0.055) / 1.055) ** 2.4 for x in ch]
        return 0.2126 * ch[0] + 0.7152 * ch[1] + 0.0722 * ch[2]
    hi, lo = sorted((lum(a), lum(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_step_text_shows_a_chosen_token_of_only_bytes_legibly():
    """The step view's chip around the chosen token: when that token is the first bytes of a
    character (北's e5 8c), its byte run keeps token_span's own colour, so the chip's background
    must be light enough for it (it was the dark chosen colour: contrast 1.1) and for the text."""
    import re

    from tracer.viz import shared, steps

    trace = multibyte_trace()
    assert trace.token_text[int(trace.steps[0].chosen[0])] != "北"  # step 0 chose bytes only
    out = steps._text_html(trace, 0, 0)
    chip = re.findall(r'<span style="([^"]*)" title="id \d+">(.*?)</span></span>', out)[-1]
    assert "\\xe5\\x8c" in chip[1] and 'class="tr-part"' in chip[1]
    background = re.search(r"background:(#[0-9a-fA-F]{6})", chip[0]).group(1)
    own = re.search(r"(?<![-\w])color:(#[0-9a-fA-F]{6})", chip[0])  # else the page's black
    text = own.group(1) if own else "#000000"
    part = re.search(r"color:(#[0-9a-fA-F]{6})", shared.PART_STYLE).group(1)
    assert _contrast(part, background) >= 3.0
    assert _contrast(text, background) >= 4.5
