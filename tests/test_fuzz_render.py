"""Everything ``load_trace`` accepts renders in every exporter and text view, or is refused
with ``TraceFormatError``: no IndexError, AxisError, RecursionError, UnicodeEncodeError,
OverflowError...

Mutations as in ``tests/test_storage.py``'s fuzz tests (one byte replaced, inserted or deleted,
or the file truncated; or one manifest value replaced or deleted), plus the blob file, whose
checksum is only verified on request: a mutated blob file of the same size loads.  Each test
counts its own cases and asserts how many ran and how many loaded and rendered.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracer.export import inspect_trace, trace_summary_html, trace_to_html, trace_to_perfetto
from tracer.records import MemoryStore, TraceFormatError, replace
from tracer.storage import load_trace, save_trace
from tracer.testing import make_trace

pytest.importorskip("matplotlib")
import matplotlib  # noqa: E402

matplotlib.use("Agg")

from tracer import viz  # noqa: E402

BYTE_EXAMPLES = 300
JSON_EXAMPLES = 200
_BASE: dict[str, Path] = {}


def _base() -> Path:
    if "path" not in _BASE:
        folder = Path(tempfile.mkdtemp(prefix="tracer-fuzz-render-"))
        trace = make_trace(batch=2, steps=4, layers=2, heads=2, kv_heads=1, text="x\ny")
        object.__setattr__(trace, "token_bytes", {i: t.encode("utf-8") for i, t in trace.token_text.items()})
        _BASE["path"] = save_trace(trace, folder / "base.trace")
    return _BASE["path"]


def _rewrite_entry(folder: Path, name: str) -> None:
    """The manifest's files entry made to match the (tampered) file, to reach deeper checks."""
    mpath = folder / "manifest.json"
    m = json.loads(mpath.read_text())
    data = (folder / name).read_bytes()
    for e in m["files"]:
        if e["name"] == name:
            e["bytes"], e["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    mpath.write_text(json.dumps(m))


def render_everything(folder: Path) -> None:
    """Load ``folder`` and run every exporter and text view on it."""
    trace = load_trace(folder)
    trace_summary_html(trace)
    html = trace_to_html(trace)
    html.encode("utf-8")  # strict: no lone surrogate
    json.dumps(trace_to_perfetto(trace), allow_nan=False).encode("utf-8")
    inspect_trace(folder).encode("utf-8")
    for seq in range(trace.batch_size):
        viz.token_strip_html(trace, seq).encode("utf-8")
        for step in range(trace.num_steps):
            viz.step_text(trace, step, seq).encode("utf-8")
    viz.cache_text(trace).encode("utf-8")
    if trace.attention_layers and trace.attention_heads and trace.num_steps:
        try:
            viz.attention_maps(trace, trace.num_steps - 1, 0)
        except KeyError as exc:  # a listed layer with no recorded blob: the views' "not recorded" error
            assert "recorded" in str(exc)


def _load_and_render(folder: Path, runs: Counter) -> None:
    """Count one mutant: rejected by the loader, or loaded and then rendered (or refused with
    TraceFormatError) by every exporter and view; anything else propagates and fails the test."""
    try:
        load_trace(folder)
    except TraceFormatError:
        runs["rejected"] += 1
        return
    runs["loaded"] += 1
    try:
        render_everything(folder)
        runs["rendered"] += 1
    except TraceFormatError:
        runs["refused"] += 1


def _mutate_and_render(runs: Counter, target: str, mode: str, frac: float, byte: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="tracer-fuzz-render-case-"))
    try:
        folder = Path(shutil.copytree(_base(), work / "t.trace"))
        rehash = target.endswith("+rehash")
        target = target.removesuffix("+rehash")
        data = bytearray((folder / target).read_bytes())
        if rehash:
            frac = frac * min(1.0, 4096 / len(data))  # mostly the header, where the structure is
        # blobs.safetensors without rehash: anywhere (a same-size change loads: garbage values)
        i = int(frac * len(data))
        if mode == "replace":
            data[i] = byte if byte != data[i] else (byte + 1) % 256
        elif mode == "truncate":
            del data[i:]
        elif mode == "insert":
            data.insert(i, byte)
        else:
            del data[i]
        (folder / target).write_bytes(bytes(data))
        if rehash:
            _rewrite_entry(folder, target)
        _load_and_render(folder, runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_fuzz_render_mutated_files():
    runs: Counter = Counter()

    @settings(max_examples=BYTE_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(
        target=st.sampled_from(["manifest.json", "tables.safetensors+rehash", "blobs.safetensors",
                                "blobs.safetensors+rehash"]),
        mode=st.sampled_from(["replace", "replace", "truncate", "insert", "delete"]),
        frac=st.floats(0, 1, exclude_max=True),
        byte=st.integers(0, 255),
    )
    def case(target, mode, frac, byte):
        _mutate_and_render(runs, target, mode, frac, byte)

    case()
    print(f"render fuzz (bytes): {sum(runs[k] for k in ('loaded', 'rejected'))} cases {dict(runs)}")
    assert runs["loaded"] + runs["rejected"] >= BYTE_EXAMPLES * 0.9
    assert runs["rendered"] >= 20  # enough loadable mutants went through every view (about 1 in 10)
    assert runs["rendered"] + runs["refused"] == runs["loaded"]


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def _leaf_paths(obj, path=()):
    yield path
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _leaf_paths(v, (*path, k))


def test_fuzz_render_manifest_values():
    runs: Counter = Counter()
    manifest0 = json.loads((_base() / "manifest.json").read_text())
    paths = [p for p in _leaf_paths(manifest0) if p]

    @settings(max_examples=JSON_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def case(data):
        manifest = json.loads(json.dumps(manifest0))
        path = data.draw(st.sampled_from(paths), label="path")
        obj = manifest
        for k in path[:-1]:
            obj = obj[k]
        if isinstance(obj, dict) and data.draw(st.booleans(), label="delete"):
            del obj[path[-1]]
        else:
            obj[path[-1]] = data.draw(_JSON_VALUES, label="value")
        work = Path(tempfile.mkdtemp(prefix="tracer-fuzz-render-case-"))
        try:
            folder = Path(shutil.copytree(_base(), work / "t.trace"))
            (folder / "manifest.json").write_text(json.dumps(manifest))
            _load_and_render(folder, runs)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    case()
    print(f"render fuzz (manifest values): {runs['loaded'] + runs['rejected']} cases {dict(runs)}")
    assert runs["loaded"] + runs["rejected"] >= JSON_EXAMPLES * 0.9
    assert runs["rendered"] >= 25  # (36 of 200 here)
    assert runs["rendered"] + runs["refused"] == runs["loaded"]


@pytest.mark.parametrize("text", ["\ud800", "\x1b]0;owned\x07", "\u202e", "a" * 5000, "\x00"])
def test_hostile_token_text_renders(tmp_path, text):
    mark = "HOSTILE-TEXT"
    trace = make_trace(batch=2, steps=6, seed=29, text=mark)  # id 7 in prompt and output
    trace.meta.model_name = mark
    folder = save_trace(trace, tmp_path / "h.trace")
    manifest = folder / "manifest.json"  # JSON can hold what save_trace refuses (a lone surrogate)
    manifest.write_text(manifest.read_text().replace(mark, json.dumps(text)[1:-1]))
    assert load_trace(folder).meta.model_name == text
    render_everything(folder)
    out = inspect_trace(folder)
    assert "\x1b" not in out and "\x00" not in out and "\ud800" not in out and "\u202e" not in out


def _render_memory(trace) -> None:
    """Every exporter and text view on an in-memory trace: renders or TraceFormatError."""
    try:
        trace_summary_html(trace)
        trace_to_html(trace).encode("utf-8")
        json.dumps(trace_to_perfetto(trace), allow_nan=False)
        for seq in range(trace.batch_size):
            viz.token_strip_html(trace, seq)
            for step in range(trace.num_steps):
                viz.step_text(trace, step, seq)
        viz.cache_text(trace)
        if trace.attention_layers and trace.num_steps:
            viz.attention_maps(trace, trace.num_steps - 1, 0)
    except TraceFormatError:
        pass


def _put(trace, key, value):
    trace.blobs.put(key, value)
    return trace


HOSTILE = {
    "decode block without query rows": lambda t: _put(t, "attention/1/0", np.zeros((2, 2, 0, 6), np.float16)),
    "3-d prefill block": lambda t: _put(t, "attention/0/0", np.zeros((2, 2, 5), np.float16)),
    "wrong head count": lambda t: _put(t, "attention/0/1", np.zeros((2, 7, 5, 5), np.float16)),
    "layers of different widths": lambda t: _put(t, "attention/0/1", np.zeros((2, 2, 5, 9), np.float16)),
    "very wide decode row": lambda t: _put(t, "attention/1/0", np.ones((2, 2, 1, 200_000), np.float16)),
    "nan and inf weights": lambda t: _put(t, "attention/0/0", np.full((2, 2, 5, 5), np.nan, np.float16)),
    "integer maps": lambda t: _put(t, "attention/0/0", np.full((2, 2, 5, 5), 2**40, np.int64)),
    "missing decode blob": lambda t: setattr(t, "blobs", MemoryStore({k: t.blobs.get(k) for k in t.blobs.keys()
                                                                     if k != "attention/2/1"})) or t,
    "cache rows fewer than steps": lambda t: setattr(t, "cache", replace(t.cache, seq_len=t.cache.seq_len[:1],
                                                                     kept_len=t.cache.kept_len[:1],
                                                                     allocated_len=t.cache.allocated_len[:1],
                                                                     nbytes=t.cache.nbytes[:1])) or t,
    "huge cache bytes": lambda t: setattr(t, "cache", replace(t.cache, nbytes=t.cache.nbytes * 2**60)) or t,
    "kv_head_of too short": lambda t: setattr(t, "kv_head_of", (0,)) or t,
    "terminators not a dict": lambda t: setattr(t.meta, "terminators", [1, 2]) or t,
    "token bytes of the wrong type": lambda t: object.__setattr__(t, "token_bytes", {7: "text", 8: 5}) or t,
    "generation config a list": lambda t: setattr(t.meta, "generation_config", [1, 2]) or t,
    "nan step time": lambda t: setattr(t, "steps", [replace(s, time_s=float("nan")) for s in t.steps]) or t,
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_in_memory_traces_render_or_refuse(name):
    trace = make_trace(batch=2, steps=4, layers=2, heads=2, kv_heads=1)
    with np.errstate(all="ignore"):
        _render_memory(HOSTILE[name](trace))
