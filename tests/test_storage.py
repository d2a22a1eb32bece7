"""Trace files: round trips, lazy loading, validation, fuzzing, HTML and Perfetto export.

No model is needed: traces come from ``tracer.testing.make_trace``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as st_numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracer import storage
from tracer.records import MemoryStore, Trace, TraceFormatError, blob_key, replace
from tracer.export import inspect_trace, trace_summary_html, trace_to_html, trace_to_perfetto
from tracer.storage import SafetensorsStore, load_trace, save_trace
from tracer.testing import make_trace

REPO_ROOT = Path(__file__).resolve().parents[1]
FUZZ_EXAMPLES = 300  # hypothesis max_examples of test_fuzz_mutated_files_raise_only_trace_format_error
FUZZ_JSON_EXAMPLES = 200  # ... of test_fuzz_manifest_values_raise_only_trace_format_error


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def assert_same(a, b, where="trace"):
    """Recursive exact equality for dataclasses, numpy arrays (dtype and shape too), tuples,
    lists and dicts; container types must match (a tuple must not come back as a list)."""
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
        for f in dataclasses.fields(a):
            if f.name == "blobs":
                continue
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), f"{where}: {type(b).__name__} is not an array"
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{where}: shape {a.shape} != {b.shape}"
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert isinstance(b, dict), f"{where}: {type(b).__name__} is not a dict"
        assert list(a) == list(b) or set(a) == set(b), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, str):  # str subclasses (torch's TorchVersion) come back as str
        assert isinstance(b, str) and a == b, f"{where}: {a!r} != {b!r}"
    else:
        assert type(a) is type(b), f"{where}: {type(a).__name__} ({a!r}) != {type(b).__name__} ({b!r})"
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_round_trip(trace: Trace, folder: Path) -> Trace:
    path = save_trace(trace, folder / "run.trace")
    loaded = load_trace(path)
    assert_same(trace, loaded)
    assert sorted(trace.blobs.keys()) == sorted(loaded.blobs.keys())
    for key in trace.blobs.keys():
        assert_same(np.asarray(trace.blobs.get(key)), loaded.blobs.get(key), key)
    if trace.num_steps:
        for layer in trace.attention_layers:
            for head in trace.attention_heads:
                assert_same(trace.head_map(layer, head, seq=0), loaded.head_map(layer, head, seq=0))
    assert loaded.summary() == trace.summary()
    return loaded


def rewrite_entry(folder: Path, name: str) -> None:
    """Make the manifest's files entry match the (tampered) file, to reach deeper checks."""
    mpath = folder / "manifest.json"
    m = json.loads(mpath.read_text())
    data = (folder / name).read_bytes()
    for e in m["files"]:
        if e["name"] == name:
            e["bytes"], e["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    mpath.write_text(json.dumps(m))


def edit_manifest(folder: Path, fn) -> None:
    mpath = folder / "manifest.json"
    m = json.loads(mpath.read_text())
    fn(m)
    mpath.write_text(json.dumps(m))


@pytest.fixture
def saved(tmp_path):
    trace = make_trace(batch=2, steps=5)
    return save_trace(trace, tmp_path / "run.trace")


# --------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(batch=1),
        dict(batch=3),
        dict(batch=2, attention=False),
        dict(batch=2, steps=1),
        dict(batch=3, steps=8, seed=4, layers=2, heads=2, kv_heads=1),
    ],
    ids=["batch1", "batch3", "no-attention", "one-step", "batch3-long"],
)
def test_round_trip(tmp_path, kwargs):
    assert_round_trip(make_trace(**kwargs), tmp_path)


def test_round_trip_zero_steps_interrupted(tmp_path):
    trace = make_trace(batch=2, steps=0)
    # make_trace builds its empty cache arrays as (0,); the documented shape is (S, L) = (0, L)
    layers = trace.cache.num_layers
    trace.cache = replace(trace.cache, **{k: np.zeros((0, layers), np.int64)
                                          for k in ("seq_len", "kept_len", "allocated_len", "nbytes")})
    trace.meta.status = "interrupted"
    trace.meta.error = "KeyboardInterrupt"
    loaded = assert_round_trip(trace, tmp_path)
    assert loaded.num_steps == 0 and loaded.stop_reasons == ["interrupted", "interrupted"]
    assert "steps: 0" in inspect_trace(tmp_path / "run.trace")
    trace_to_html(loaded)
    assert [e["ph"] for e in trace_to_perfetto(loaded)["traceEvents"]] == ["M", "M"]


def test_round_trip_without_cache_and_optional_parts(tmp_path):
    trace = make_trace(batch=2, steps=6)
    steps = list(trace.steps)
    steps[1] = replace(steps[1], logit_lens=None, attention_stats=None, residual_norms=None)
    steps[3] = replace(steps[3], inputs=replace(steps[3].inputs, position_ids=None, attention_mask_shape=None))
    steps[4] = replace(steps[4], residual_norms=None)
    trace = replace(trace, cache=None, steps=steps, prompts=None)
    trace.meta.terminators = {1: "<|eot|>", 49152: "<|end|>"}
    trace.meta.notes = ["a note"]
    loaded = assert_round_trip(trace, tmp_path)
    assert loaded.cache is None and loaded.steps[1].logit_lens is None
    assert loaded.steps[3].inputs.position_ids is None
    assert loaded.meta.terminators == {1: "<|eot|>", 49152: "<|end|>"}


def test_stage_entropy_and_output_text_round_trip(tmp_path):
    trace = make_trace(batch=2, steps=4)
    steps = list(trace.steps)
    for i in (0, 2):
        stages = list(steps[i].stages)
        stages[1] = replace(stages[1], entropy=np.array([0.5, 1.5], np.float32))
        steps[i] = replace(steps[i], stages=tuple(stages))
    trace = replace(trace, steps=steps, output_text=["a <b>", "c"])
    loaded = assert_round_trip(trace, tmp_path)
    assert loaded.steps[1].stages[1].entropy is None and loaded.output_text == ["a <b>", "c"]


def test_storage_knows_every_record_field():
    """A new record field must be added to storage (and docs/trace-format.md) on purpose."""
    from tracer import records

    known = {
        "TopK": ["ids", "values", "logsumexp"],
        "Stage": ["name", "params", "top", "n_masked", "chosen_rank", "chosen_logprob", "kl", "entropy",
                  "newly_masked"],
        "StepInputs": ["input_ids", "position_ids", "cache_slots", "attention_mask_shape", "cache_len_before",
                       "names", "attention_mask", "mask_padding", "logits_to_keep", "cache_class"],
        "AttentionStats": ["layers", "entropy", "sink", "argmax"],
        "LogitLens": ["layers", "chosen_rank", "chosen_prob", "top_id"],
        "StepRecord": ["index", "inputs", "stages", "chosen", "sampled", "active", "finished", "stop_reasons",
                       "time_s", "residual_norms", "logit_lens", "attention_stats"],
        "CacheLayerInfo": ["kind", "dtype", "device", "kv_heads", "head_dim", "max_len"],
        "CacheTimeline": ["cache_class", "layers", "seq_len", "kept_len", "allocated_len", "nbytes", "batch_size",
                          "reused_len"],
        "Trace": ["meta", "prompts", "prompt_ids", "prompt_mask", "sequences", "steps", "cache", "token_text",
                  "blobs", "residual_points", "attention_layers", "attention_heads", "kv_head_of", "output_text",
                  "token_bytes"],
        "StopReason": ["kind", "token_id", "text"],
    }
    for name, fields in known.items():
        assert [f.name for f in dataclasses.fields(getattr(records, name))] == fields, name


def test_numpy_scalars_in_meta_become_json(tmp_path):
    trace = make_trace(batch=1, steps=2)
    trace.meta.generation_config = {"temperature": np.float32(0.5), "top_k": np.int64(3), "ids": (1, 2)}
    trace.meta.model_config = {"eos": np.array([1, 2])}
    loaded = load_trace(save_trace(trace, tmp_path / "x.trace"))
    assert loaded.meta.generation_config == {"temperature": 0.5, "top_k": 3, "ids": [1, 2]}
    assert loaded.meta.model_config == {"eos": [1, 2]}


def test_layout_and_manifest(saved):
    assert sorted(os.listdir(saved)) == ["blobs.safetensors", "manifest.json", "tables.safetensors"]
    m = json.loads((saved / "manifest.json").read_text())
    assert m["format"] == "tracer-trace" and m["schema_version"] == storage.SCHEMA_VERSION
    assert {e["name"] for e in m["files"]} == {"tables.safetensors", "blobs.safetensors"}
    for e in m["files"]:
        data = (saved / e["name"]).read_bytes()
        assert e["bytes"] == len(data) and e["sha256"] == hashlib.sha256(data).hexdigest()
    tables = st_numpy.load_file(str(saved / "tables.safetensors"))
    assert tables["steps.chosen"].shape == (5, 2)
    assert tables["stages.top_ids"].shape == (5, 3, 2, 5)
    assert tables["inputs.input_ids"].shape == (2, 5 + 4)  # prompt + one token per decode step
    assert tables["residual_norms"].shape == (5, 5, 2)
    blobs = st_numpy.load_file(str(saved / "blobs.safetensors"))
    assert blob_key("attention", 3, 2) in blobs
    # no pickle anywhere: the data files are safetensors (8-byte header length then JSON)
    for name in ("tables.safetensors", "blobs.safetensors"):
        head = (saved / name).read_bytes()[:9]
        assert head[8:9] == b"{"


def test_load_accepts_manifest_path_and_lazy_store(saved):
    trace = load_trace(saved / "manifest.json")
    assert isinstance(trace.blobs, SafetensorsStore)
    key = blob_key("attention", 0, 0)
    assert key in trace.blobs and "nope/1" not in trace.blobs
    assert trace.blobs.get(key).dtype == np.float16
    with pytest.raises(KeyError):
        trace.blobs.get("attention/99/0")


def test_save_overwrites_trace_but_not_other_folders(tmp_path):
    p = save_trace(make_trace(batch=1, steps=2), tmp_path / "a.trace")
    save_trace(make_trace(batch=2, steps=3), p)
    assert load_trace(p).batch_size == 2
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        save_trace(make_trace(batch=1, steps=1), other)
    assert (other / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["a.trace", "other"]  # no temp folders left


def test_crash_during_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    p = save_trace(make_trace(batch=1, steps=2), tmp_path / "a.trace")
    calls = []

    def failing(tensors, filename, metadata=None):
        calls.append(filename)
        if filename.endswith("blobs.safetensors"):
            raise OSError("disk full")
        return real(tensors, filename, metadata)

    real = st_numpy.save_file
    monkeypatch.setattr(storage.st_numpy, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        save_trace(make_trace(batch=2, steps=3), p)
    with pytest.raises(OSError):
        save_trace(make_trace(batch=2, steps=3), tmp_path / "b.trace")
    assert sorted(os.listdir(tmp_path)) == ["a.trace"]
    assert load_trace(p).batch_size == 1  # the old trace is intact


def test_lazy_open_of_large_blob_file_reads_only_what_is_asked(tmp_path, monkeypatch):
    """Opening a trace never reads (or hashes) the blob file; one blob reads one tensor."""
    trace = make_trace(batch=1, steps=2)
    trace.blobs.put(blob_key("hidden", 0, 0), np.ones((2, 25_000_000), dtype=np.float32))  # 200 MB
    path = save_trace(trace, tmp_path / "big.trace")
    assert (path / "blobs.safetensors").stat().st_size > 200_000_000
    read: list[str] = []
    real_read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self.name) or real_read(self))
    monkeypatch.setattr(storage, "sha256_file", lambda p: pytest.fail(f"hashed {p} on a lazy open"))
    loaded = load_trace(path)
    assert "blobs.safetensors" not in read and set(read) == {"manifest.json", "tables.safetensors"}
    small = loaded.blobs.get(blob_key("attention", 1, 0))
    assert small.nbytes < 10_000  # the attention map alone, not the 200 MB next to it
    assert_same(np.asarray(trace.blobs.get(blob_key("attention", 1, 0))), small)
    assert loaded.hidden(0, 0).shape == (2, 25_000_000)


def test_load_does_not_import_torch_or_transformers(saved):
    code = (
        "import sys, tracer\n"
        f"t = tracer.load_trace({str(saved)!r})\n"
        "t.head_map(0, 0); t.to_html(); t.to_perfetto(); t._repr_html_()\n"
        "from tracer.export import inspect_trace; inspect_trace(t.blobs.path.parent)\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# --------------------------------------------------------------------------------------
# validation: each failure is one TraceFormatError naming the file
# --------------------------------------------------------------------------------------


def test_missing_folder_and_not_a_folder(tmp_path):
    with pytest.raises(TraceFormatError, match="no such trace"):
        load_trace(tmp_path / "missing.trace")
    (tmp_path / "file.trace").write_text("x")
    with pytest.raises(TraceFormatError, match="not a trace folder"):
        load_trace(tmp_path / "file.trace")
    (tmp_path / "empty.trace").mkdir()
    with pytest.raises(TraceFormatError, match="manifest.json is missing"):
        load_trace(tmp_path / "empty.trace")


def test_manifest_not_json_or_not_object(saved):
    (saved / "manifest.json").write_bytes(os.urandom(300))
    with pytest.raises(TraceFormatError, match=r"manifest\.json.*not valid JSON"):
        load_trace(saved)
    (saved / "manifest.json").write_text("[1, 2]")
    with pytest.raises(TraceFormatError, match="not a JSON object"):
        load_trace(saved)


def test_changed_byte_in_manifest(saved):
    raw = (saved / "manifest.json").read_bytes()
    (saved / "manifest.json").write_bytes(b"[" + raw[1:])
    with pytest.raises(TraceFormatError, match="not valid JSON"):
        load_trace(saved)


def test_changed_digit_in_size_field_is_caught(saved):
    m = json.loads((saved / "manifest.json").read_text())
    size = next(e["bytes"] for e in m["files"] if e["name"] == "tables.safetensors")
    raw = (saved / "manifest.json").read_text()
    needle = f'"bytes": {size}'
    assert raw.count(needle) == 1
    changed = str(size)[:-1] + str((int(str(size)[-1]) + 1) % 10)
    (saved / "manifest.json").write_text(raw.replace(needle, f'"bytes": {changed}'))
    with pytest.raises(TraceFormatError, match=r"tables\.safetensors: size is .* the manifest says"):
        load_trace(saved)


def test_wrong_format_and_newer_schema(saved):
    edit_manifest(saved, lambda m: m.update(format="something-else"))
    with pytest.raises(TraceFormatError, match="not a tracer trace"):
        load_trace(saved)
    edit_manifest(saved, lambda m: m.update(format="tracer-trace", schema_version="2.0"))
    with pytest.raises(TraceFormatError, match=r"newer tracer \(schema 2\.0\); this tracer reads 1\.x — upgrade tracer"):
        load_trace(saved)
    edit_manifest(saved, lambda m: m.update(schema_version="1.7"))  # newer minor: additive, accepted
    assert load_trace(saved).num_steps == 5
    edit_manifest(saved, lambda m: m.update(schema_version="one"))
    with pytest.raises(TraceFormatError, match="major.minor"):
        load_trace(saved)


def test_newer_minor_with_extra_fields_is_read(saved):
    def add(m):
        m["schema_version"] = "1.3"
        m["some_new_section"] = {"x": 1}
        m["meta"]["a_new_meta_field"] = 5

    edit_manifest(saved, add)
    assert load_trace(saved).num_steps == 5


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "sub/tables.safetensors", "..", "a\\b"])
def test_files_entry_pointing_outside(saved, name):
    edit_manifest(saved, lambda m: m["files"][0].update(name=name))
    with pytest.raises(TraceFormatError, match="points outside the trace"):
        load_trace(saved)


@pytest.mark.parametrize("field", ["num_steps", "files", "steps", "meta", "token_text", "batch_size"])
def test_missing_field(saved, field):
    edit_manifest(saved, lambda m: m.pop(field))
    with pytest.raises(TraceFormatError, match=f"missing field '{field}'"):
        load_trace(saved)


def test_missing_nested_field_and_wrong_type(saved):
    edit_manifest(saved, lambda m: m["steps"].pop("time_s"))
    with pytest.raises(TraceFormatError, match="missing field 'steps.time_s'"):
        load_trace(saved)
    edit_manifest(saved, lambda m: m["steps"].update(time_s="fast"))
    with pytest.raises(TraceFormatError, match="'steps.time_s' should be a list"):
        load_trace(saved)


def test_truncated_tables(saved):
    data = (saved / "tables.safetensors").read_bytes()
    (saved / "tables.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceFormatError, match=r"tables\.safetensors: size is"):
        load_trace(saved)
    rewrite_entry(saved, "tables.safetensors")  # manifest agrees: safetensors itself must object
    with pytest.raises(TraceFormatError, match=r"tables\.safetensors: corrupt safetensors"):
        load_trace(saved)


def test_changed_byte_in_tables_fails_checksum(saved):
    data = bytearray((saved / "tables.safetensors").read_bytes())
    data[-3] ^= 0x40
    (saved / "tables.safetensors").write_bytes(bytes(data))
    with pytest.raises(TraceFormatError, match="sha256 does not match"):
        load_trace(saved)


def test_random_bytes_as_tables(saved):
    size = (saved / "tables.safetensors").stat().st_size
    (saved / "tables.safetensors").write_bytes(np.random.default_rng(1).bytes(size))
    with pytest.raises(TraceFormatError, match="sha256 does not match"):
        load_trace(saved)
    rewrite_entry(saved, "tables.safetensors")
    with pytest.raises(TraceFormatError, match="corrupt safetensors"):
        load_trace(saved)


def test_inconsistent_shapes_vs_manifest(saved):
    tables = st_numpy.load_file(str(saved / "tables.safetensors"))
    tables["steps.chosen"] = tables["steps.chosen"][:-1].copy()
    st_numpy.save_file(tables, str(saved / "tables.safetensors"))
    rewrite_entry(saved, "tables.safetensors")
    with pytest.raises(TraceFormatError, match=r"'steps\.chosen' has shape \(4, 2\), expected \(5, 2\)"):
        load_trace(saved)


def test_step_count_changed_in_manifest(saved):
    edit_manifest(saved, lambda m: m.update(num_steps=4))
    with pytest.raises(TraceFormatError, match="has 5 entries, expected 4"):
        load_trace(saved)


def test_blobs_size_checked_on_open_and_sha_on_request(saved):
    data = bytearray((saved / "blobs.safetensors").read_bytes())
    data[-1] ^= 1
    (saved / "blobs.safetensors").write_bytes(bytes(data))
    load_trace(saved)  # only the size is checked by default (documented)
    with pytest.raises(TraceFormatError, match=r"blobs\.safetensors: sha256"):
        load_trace(saved, verify_blobs=True)
    (saved / "blobs.safetensors").write_bytes(bytes(data[:-10]))
    with pytest.raises(TraceFormatError, match=r"blobs\.safetensors: size is"):
        load_trace(saved)
    (saved / "blobs.safetensors").write_bytes(b"\xff" * 64)
    rewrite_entry(saved, "blobs.safetensors")
    with pytest.raises(TraceFormatError, match=r"blobs\.safetensors: not a readable safetensors"):
        load_trace(saved)


def test_listed_file_missing(saved):
    (saved / "blobs.safetensors").unlink()
    with pytest.raises(TraceFormatError, match="listed in the manifest but missing"):
        load_trace(saved)


_FUZZ_BASE: dict[str, Path] = {}


def _fuzz_base() -> Path:
    if "path" not in _FUZZ_BASE:
        folder = Path(tempfile.mkdtemp(prefix="tracer-fuzz-"))
        _FUZZ_BASE["path"] = save_trace(make_trace(batch=2, steps=4, layers=2), folder / "base.trace")
    return _FUZZ_BASE["path"]


FUZZ_RUNS = {"loaded": 0, "rejected": 0}


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    target=st.sampled_from(["manifest.json", "manifest.json", "tables.safetensors", "tables+rehash"]),
    mode=st.sampled_from(["replace", "replace", "truncate", "insert", "delete"]),
    frac=st.floats(0, 1, exclude_max=True),
    byte=st.integers(0, 255),
)
def _fuzz_mutated_files(target, mode, frac, byte):
    base = _fuzz_base()
    work = Path(tempfile.mkdtemp(prefix="tracer-fuzz-case-"))
    try:
        folder = Path(shutil.copytree(base, work / "t.trace"))
        rehash = target == "tables+rehash"  # manifest updated to match: reaches safetensors/shape checks
        target = "tables.safetensors" if rehash else target
        data = bytearray((folder / target).read_bytes())
        if rehash:
            frac = frac * min(1.0, 4096 / len(data))  # mostly the header, where the structure is
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
            rewrite_entry(folder, target)
        try:
            trace = load_trace(folder)
        except TraceFormatError:
            FUZZ_RUNS["rejected"] += 1
            return
        FUZZ_RUNS["loaded"] += 1
        if not rehash:
            assert target == "manifest.json"  # any change to the tables is caught by size or sha256
        assert (trace.batch_size, trace.prompt_len, trace.num_steps) == (2, 5, 4)
        trace_summary_html(trace)
        trace_to_html(trace)
        trace_to_perfetto(trace)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _leaf_paths(obj, path=()):
    yield path
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _leaf_paths(v, (*path, k))


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=FUZZ_JSON_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def _fuzz_manifest_values(data):
    """Structural fuzz: replace or delete one field anywhere in a valid manifest."""
    base = _fuzz_base()
    manifest = json.loads((base / "manifest.json").read_text())
    paths = [p for p in _leaf_paths(manifest) if p]
    path = data.draw(st.sampled_from(paths), label="path")
    obj = manifest
    for k in path[:-1]:
        obj = obj[k]
    if isinstance(obj, dict) and data.draw(st.booleans(), label="delete"):
        del obj[path[-1]]
    else:
        obj[path[-1]] = data.draw(_JSON_VALUES, label="value")
    work = Path(tempfile.mkdtemp(prefix="tracer-fuzz-case-"))
    try:
        folder = Path(shutil.copytree(base, work / "t.trace"))
        (folder / "manifest.json").write_text(json.dumps(manifest))
        try:
            trace = load_trace(folder)
        except TraceFormatError:
            FUZZ_RUNS["rejected"] += 1
            return
        FUZZ_RUNS["loaded"] += 1
        assert (trace.batch_size, trace.prompt_len, trace.num_steps) == (2, 5, 4)
        trace_summary_html(trace)
        trace_to_html(trace)
        trace_to_perfetto(trace)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_fuzz(search, examples: int) -> dict[str, int]:
    FUZZ_RUNS.update(loaded=0, rejected=0)
    search()  # hypothesis runs every example of the search here
    runs = dict(FUZZ_RUNS)
    print(f"fuzz cases: {runs['loaded'] + runs['rejected']} ({runs})")
    assert runs["loaded"] + runs["rejected"] >= examples * 0.9, runs
    return runs


def test_fuzz_mutated_files_raise_only_trace_format_error():
    """Byte-level fuzz of the manifest and tables; each case loads (and renders) or is refused."""
    runs = _run_fuzz(_fuzz_mutated_files, FUZZ_EXAMPLES)
    assert runs["rejected"] > 0


def test_fuzz_manifest_values_raise_only_trace_format_error():
    runs = _run_fuzz(_fuzz_manifest_values, FUZZ_JSON_EXAMPLES)
    assert runs["rejected"] > 0 and runs["loaded"] > 0


# --------------------------------------------------------------------------------------
# inspect, HTML, Perfetto
# --------------------------------------------------------------------------------------


def test_inspect(tmp_path):
    trace = make_trace(batch=2, steps=5, text="\x1b[31mred\x07")
    trace.blobs.put(blob_key("logits", 0), np.zeros((2, 40), np.float32))
    path = save_trace(trace, tmp_path / "i.trace")
    text = inspect_trace(path)
    for needle in ("model: synthetic", "status: complete", "steps: 5 (prefill + 4 decode)", "new tokens:",
                   "stop reasons:", "generated[1]:", "attention 3 layers x 4 heads", "full logits 1 steps",
                   "logit lens 5 steps", "manifest.json", "tables.safetensors", "blobs.safetensors", "prompt[0]"):
        assert needle in text, needle
    assert "\x1b" not in text and "\x07" not in text


def _trace_with_token_7(text: str) -> Trace:
    trace = make_trace(batch=2, steps=6, seed=29, text=text)  # seed 29: id 7 in prompt and output
    assert 7 in trace.generated_ids(0).tolist() and 7 in trace.prompt_ids.ravel().tolist()
    return trace


@pytest.mark.parametrize("evil", ["<script>alert(1)</script>", "\"'><img src=x onerror=alert(1)>"])
def test_html_escapes_every_text(tmp_path, evil):
    trace = _trace_with_token_7(evil)
    trace.meta.model_name = evil
    trace.meta.notes = [evil]
    trace.prompts = [evil, "ok"]
    path = tmp_path / "r.html"
    assert trace_to_html(trace, path) == path  # with a path: written there, the path returned
    out = path.read_text(encoding="utf-8")
    assert out == trace_to_html(trace)
    import html as html_mod

    assert evil not in out
    assert html_mod.escape(evil, quote=True) in out
    assert "<script" not in out and "<img src=x" not in out
    summary = trace_summary_html(trace)
    assert evil not in summary


def test_html_contents_and_self_contained():
    trace = make_trace(batch=3, steps=6, layers=20)
    out = trace_to_html(trace)
    assert out.startswith("<!DOCTYPE html>")
    assert "http://" not in out and "https://" not in out and "<script" not in out
    for needle in ("TemperatureLogitsWarper", "TopKLogitsWarper", "eos:&lt;|eot|&gt;", "mean over the recorded heads",
                   "sequence 2"):
        assert needle in out, needle
    pngs = out.count("<figure><img")  # attention maps (the cache figure is one more PNG)
    assert pngs == 12  # at most 12 maps
    start = out.index("data:image/png;base64,") + len("data:image/png;base64,")
    png = base64.b64decode(out[start : out.index("'", start)])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert "no attention maps" in trace_to_html(make_trace(attention=False))


def test_perfetto(tmp_path):
    trace = make_trace(batch=2, steps=6)
    path = tmp_path / "p.json"
    assert trace_to_perfetto(trace, path) == path  # with a path: written there, the path returned
    doc = trace_to_perfetto(trace)
    assert json.loads(path.read_text()) == json.loads(json.dumps(doc))
    assert doc["displayTimeUnit"] == "ms"
    events = doc["traceEvents"]
    meta = [e for e in events if e["ph"] == "M"]
    assert {e["name"] for e in meta} == {"process_name", "thread_name"}
    xs = [e for e in events if e["ph"] == "X"]
    assert [e["name"] for e in xs] == ["prefill"] + [f"decode step {i}" for i in range(1, trace.num_steps)]
    ts = 0.0
    for e, step in zip(xs, trace.steps):
        assert e["ts"] == pytest.approx(ts) and e["dur"] == pytest.approx(step.time_s * 1e6)
        assert {"pid", "tid", "args"} <= set(e)
        assert e["args"]["chosen_ids"] == step.chosen.tolist()
        ts += e["dur"]
    stops = [e for e in xs if "stop_reasons" in e["args"]]
    assert sum(len(e["args"]["stop_reasons"]) for e in stops) == 2
    assert any(e["ph"] == "C" for e in events)


def test_repr_html_uses_summary():
    trace = make_trace(batch=1, steps=3)
    out = trace._repr_html_()
    assert out.startswith("<table") and "synthetic" in out
    loaded_like = replace(trace, blobs=MemoryStore())
    assert "synthetic" in trace_summary_html(loaded_like)


def test_saved_files_share_one_mode(tmp_path):
    folder = save_trace(make_trace(), tmp_path / "perm.trace")
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert len(set(modes.values())) == 1, modes


def test_save_never_replaces_a_foreign_folder(tmp_path):
    foreign = tmp_path / "webapp"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"name": "my app"}')
    (foreign / "index.html").write_text("<html></html>")
    with pytest.raises(FileExistsError):
        save_trace(make_trace(), foreign)
    assert (foreign / "index.html").exists()
    ours = save_trace(make_trace(), tmp_path / "ours.trace")
    save_trace(make_trace(steps=2), ours)  # our own trace folder is replaced
    assert load_trace(ours).num_steps == 2


def test_symlinked_files_are_refused(tmp_path):
    folder = save_trace(make_trace(), tmp_path / "t.trace")
    outside = tmp_path / "outside.safetensors"
    os.replace(folder / "blobs.safetensors", outside)
    os.symlink(outside, folder / "blobs.safetensors")
    with pytest.raises(TraceFormatError, match="links are refused"):
        load_trace(folder)
