"""The record contracts other layers code against: StopReason, StepInputs, Trace.from_steps,
token bytes, backend meta, errors without torch, and old (schema 1.0) trace files."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as st_numpy

from tracer.records import STOP_KINDS, StepInputs, StopReason, Trace, TraceMeta
from tracer.storage import load_trace, save_trace
from tracer.testing import make_trace
from tracer import TraceFormatError

# --------------------------------------------------------------------------------------
# StopReason
# --------------------------------------------------------------------------------------


def test_stop_reason_string_forms_and_parse_round_trip():
    cases = {
        StopReason("eos", 2, "<|im_end|>"): "eos:<|im_end|>",
        StopReason("max_length"): "max_length",
        StopReason("stop_string", None, "\n\n"): "stop_string:\n\n",
        StopReason("stop_string"): "stop_string",
        StopReason("criteria", None, "confidence"): "confidence",
        StopReason("interrupted"): "interrupted",
        StopReason("stop_token", 7, "</s>"): "stop_token:</s>",
    }
    for reason, text in cases.items():
        assert str(reason) == text and reason == text and hash(reason) == hash(text)
        back = StopReason.parse(text)
        assert back.kind == reason.kind and back.text == reason.text
        assert StopReason.parse(reason.to_json()).same(reason)
        assert json.dumps(reason) == json.dumps(text)
    assert StopReason.parse("stopped").kind == "criteria"  # 1.0 files' unnamed criterion
    assert StopReason.parse(None) is None
    with pytest.raises(ValueError, match="unknown stop reason kind"):
        StopReason("bored")


def test_stop_reason_priority_is_one_rule():
    eos, length, time_, string, custom = (StopReason("eos", 2, "x"), StopReason("max_length"),
                                          StopReason("max_time"), StopReason("stop_string", None, "ab"),
                                          StopReason("criteria", None, "Mine"))
    assert StopReason.first([length, time_, custom, string, eos]) is eos
    assert StopReason.first([length, time_, custom, string]) is string
    assert StopReason.first([length, time_, custom]) is custom
    assert StopReason.first([length, time_]) is time_
    assert StopReason.first([]) is None
    assert [StopReason(k).priority for k in STOP_KINDS] == list(range(len(STOP_KINDS)))


def test_stop_reason_of_a_plain_run():
    terms = {2: "<|im_end|>", 9: "<|eot_id|>"}
    assert StopReason.from_last_token(9, terms).same(StopReason("eos", 9, "<|eot_id|>"))
    assert StopReason.from_last_token(5, terms) == "max_length"
    assert StopReason.from_last_token(None, terms) == "max_length"


def test_recorder_prefers_eos_when_max_length_fires_at_the_same_step(tiny_model, tiny_inputs):
    """The last allowed token is also a terminator: both criteria fire; eos wins."""
    import tracer

    inputs = tiny_inputs(batch=1, seq=5, seed=3)
    ref = tiny_model.generate(**inputs, do_sample=False, max_new_tokens=4, pad_token_id=0)
    last = int(ref[0, -1])
    assert last not in ref[0, 5:-1].tolist()  # so eos fires only at the last step
    with tracer.trace(tiny_model) as t:
        tiny_model.generate(**inputs, do_sample=False, max_new_tokens=4, pad_token_id=0, eos_token_id=last)
    reason = t.trace.stop_reasons[0]
    assert isinstance(reason, StopReason) and reason.kind == "eos" and reason.token_id == last
    assert t.trace.steps[-1].stop_reasons[0] == f"eos:<{last}>"


# --------------------------------------------------------------------------------------
# StepInputs, Trace.from_steps, meta
# --------------------------------------------------------------------------------------


def test_step_inputs_old_constructor_still_works():
    old = StepInputs(input_ids=np.zeros((2, 3), np.int64), position_ids=None,
                     cache_position=np.arange(4, 7), attention_mask_shape=(2, 7), cache_len_before=4)
    assert old.cache_slots.tolist() == [4, 5, 6] and old.cache_position is old.cache_slots
    assert old.names == () and old.attention_mask is None and old.logits_to_keep is None
    positional = StepInputs(np.zeros((1, 2), np.int64), None, np.arange(2), None, 0)
    assert positional.cache_slots.tolist() == [0, 1]
    mask = np.array([[0, 1, 1], [1, 1, 1]], np.int8)
    derived = StepInputs(np.zeros((2, 3), np.int64), None, attention_mask=mask)
    assert derived.cache_slots.tolist() == [0, 1, 2] and derived.mask_padding.tolist() == [1, 0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        derived.names = ("x",)


def test_from_steps_builds_whole_trace():
    base = make_trace(batch=2, steps=4)
    built = Trace.from_steps(base.meta, base.steps, prompt_ids=base.prompt_ids, prompt_mask=base.prompt_mask,
                             token_text={5: "é"}, blobs={"logits/0": np.ones((2, 40), np.float32)})
    assert np.array_equal(built.sequences, base.sequences)  # prompt + each step's chosen token
    assert built.kv_head_of == (0, 0, 1, 1)  # from meta: 4 heads over 2 KV heads
    assert built.token_bytes == {5: "é".encode()}
    assert built.full_logits(0).shape == (2, 40)
    with pytest.raises(ValueError, match="sequences"):
        Trace.from_steps(base.meta, base.steps, prompt_ids=base.prompt_ids[:1])


def test_old_string_reasons_become_stop_reasons():
    base = make_trace(batch=2, steps=4)
    steps = [dataclasses.replace(s, stop_reasons=tuple(None if r is None else str(r) for r in s.stop_reasons))
             for s in base.steps]
    trace = dataclasses.replace(base, steps=steps)
    assert all(isinstance(r, StopReason) for s in trace.steps for r in s.stop_reasons if r is not None)
    assert trace.stop_reasons[1] == "eos:<|eot|>"


def test_new_fields_round_trip(tmp_path):
    trace = make_trace(batch=2, steps=4)
    trace.meta.backend, trace.meta.backend_info = "vllm", {"engine": "0.32.0", "logprobs_mode": "raw_logprobs"}
    trace = dataclasses.replace(trace, token_bytes={**trace.token_bytes, 7: b"\xe5\x9b"})
    loaded = load_trace(save_trace(trace, tmp_path / "x.trace"))
    assert loaded.meta.backend == "vllm" and loaded.meta.backend_info["logprobs_mode"] == "raw_logprobs"
    assert loaded.token_bytes[7] == b"\xe5\x9b" and loaded.token_bytes == trace.token_bytes
    for a, b in zip(trace.steps, loaded.steps):
        assert a.inputs.names == b.inputs.names and a.inputs.logits_to_keep == b.inputs.logits_to_keep == 1
        assert a.inputs.cache_class == b.inputs.cache_class == "DynamicCache"
        assert np.array_equal(a.inputs.attention_mask, b.inputs.attention_mask)
        assert b.inputs.attention_mask.dtype == np.int8
        assert np.array_equal(a.inputs.mask_padding, b.inputs.mask_padding)
        assert all(x.same(y) if x is not None else y is None for x, y in zip(a.stop_reasons, b.stop_reasons))
    assert loaded.stop_reasons[1].token_id == 1


def _as_schema_1_0(folder: Path) -> None:
    """Rewrite a saved trace the way tracer 1.0 wrote it."""
    m = json.loads((folder / "manifest.json").read_text())
    tables = st_numpy.load_file(str(folder / "tables.safetensors"))
    tables["inputs.cache_position"] = tables.pop("inputs.cache_slots")
    for key in ("inputs.attention_mask", "inputs.mask_padding"):
        tables.pop(key)
    st_numpy.save_file(tables, str(folder / "tables.safetensors"))
    m["schema_version"] = "1.0"
    for key in ("input_names", "mask_len", "has_mask_padding", "logits_to_keep", "cache_class"):
        del m["steps"][key]
    m["steps"]["stop_reasons"] = [[None if r is None else (f"eos:{r['text']}" if r["kind"] == "eos" else r["kind"])
                                   for r in row] for row in m["steps"]["stop_reasons"]]
    del m["token_bytes"]
    del m["meta"]["backend"], m["meta"]["backend_info"]
    import hashlib

    for e in m["files"]:
        data = (folder / e["name"]).read_bytes()
        e["bytes"], e["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(m))


def test_schema_1_0_files_still_load(tmp_path):
    trace = make_trace(batch=2, steps=5)
    folder = save_trace(trace, tmp_path / "old.trace")
    _as_schema_1_0(folder)
    old = load_trace(folder)
    assert old.stop_reasons == trace.stop_reasons
    assert old.stop_reasons[1].token_id == 1  # resolved through meta.terminators
    assert old.token_bytes == {} and old.meta.backend == "transformers"
    for a, b in zip(trace.steps, old.steps):
        assert np.array_equal(a.inputs.cache_slots, b.inputs.cache_slots)
        assert b.inputs.names == () and b.inputs.attention_mask is None and b.inputs.logits_to_keep is None


def test_load_trace_os_errors_become_trace_format_errors(tmp_path):
    with pytest.raises(TraceFormatError, match="cannot read the trace"):
        load_trace(tmp_path / ("x" * 300))  # file name too long
    with pytest.raises(TraceFormatError):
        load_trace(str(tmp_path / ("d" * 200)) + "/" + "e" * 4000)
    folder = save_trace(make_trace(batch=1, steps=2), tmp_path / "locked.trace")
    if os.geteuid() == 0:
        pytest.skip("root reads unreadable folders")
    os.chmod(folder, 0)
    try:
        with pytest.raises(TraceFormatError, match="locked.trace"):
            load_trace(folder)
    finally:
        os.chmod(folder, 0o755)


def test_unreadable_manifest_is_trace_format_error(tmp_path, monkeypatch):
    folder = save_trace(make_trace(batch=1, steps=2), tmp_path / "t.trace")
    real = Path.is_file

    def denied(self):
        if self.name == "tables.safetensors":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "is_file", denied)
    with pytest.raises(TraceFormatError, match="tables.safetensors"):
        load_trace(folder)


def test_errors_import_without_torch():
    code = ("import sys; import tracer.errors as e; import tracer.records; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
            "assert issubclass(e.TraceFormatError, ValueError) and tracer.records.TracerError is e.TracerError; "
            "import tracer; assert tracer.TracerWarning is e.TracerWarning")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})


def test_meta_defaults():
    meta = TraceMeta()
    assert meta.backend == "transformers" and meta.backend_info == {}


# --------------------------------------------------------------------------------------
# token bytes from real tokenizers
# --------------------------------------------------------------------------------------

TEXTS = ["北京是中国的首都。", "emoji 🙂👍🏽 ok", "combining e\u0301 a\u0308", "plain words"]


def _check_bytes(tok):
    from tracer.byte_tokens import token_bytes

    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        raw = token_bytes(tok, ids)
        assert b"".join(raw[i] for i in ids).decode("utf-8") == tok.decode(ids), text


def test_token_bytes_llama3(llama3_tokenizer):
    _check_bytes(llama3_tokenizer)
    from tracer.byte_tokens import token_bytes

    ids = llama3_tokenizer.encode("北", add_special_tokens=False)
    raw = token_bytes(llama3_tokenizer, ids)
    if len(ids) > 1:  # a character split over tokens: each holds part of its UTF-8 bytes
        assert all(len(raw[i]) < 3 for i in ids)


def test_token_bytes_embedded(embedded):
    _check_bytes(embedded[1])


def test_token_bytes_sentencepiece_byte_tokens():
    from tracer.byte_tokens import token_bytes

    class SP:
        all_special_ids = [2]
        vocab = {0: "<0xE5>", 1: "\u2581hello", 2: "</s>", 3: "<0x9B>"}

        def convert_ids_to_tokens(self, ids):
            return [self.vocab[i] for i in ids]

        def encode(self, text, add_special_tokens=False):
            return [1]

        def decode(self, ids, **kw):
            return "".join(self.vocab[i] for i in ids)

    assert token_bytes(SP(), [0, 1, 2, 3]) == {0: b"\xe5", 1: b" hello", 2: b"</s>", 3: b"\x9b"}


# --------------------------------------------------------------------------------------
# module hygiene
# --------------------------------------------------------------------------------------

# The views, export and CLI layers are checked by their own owners (export.py still imports
# storage._jsonable / _trace_folder, kept as aliases: switch to tracer.manifest's public names).
_OTHER_LAYERS = ("export.py", "cli.py", "viz")


def test_no_core_module_imports_another_modules_private_names():
    import ast

    root = Path(__file__).parents[1] / "tracer"
    found = set()
    for path in root.rglob("*.py"):
        rel = str(path.relative_to(root))
        if rel.startswith(_OTHER_LAYERS):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            # `from . import _mod` is a module; private names of other packages (llama_cpp) are each
            # backend's own compatibility touch, kept in one module and guarded by its equality tests
            if (isinstance(node, ast.ImportFrom) and node.module is not None
                    and (node.level > 0 or node.module.split(".")[0] == "tracer")):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.add((rel, node.module, alias.name))
    assert not found, sorted(found)


def test_no_core_module_over_about_500_lines():
    root = Path(__file__).parents[1] / "tracer"
    core = ["records.py", "recorder.py", "session.py", "storage.py", "encode.py", "decode.py", "manifest.py",
            "assemble.py", "plan.py", "_hf_compat.py", "attention.py", "cache_inspector.py", "stops.py", "blobs.py",
            "cache_records.py", "errors.py", "config.py", "testing.py", "models.py"]
    sizes = {name: len((root / name).read_text(encoding="utf-8").splitlines()) for name in core}
    assert max(sizes.values()) <= 530, sizes


def test_hooks_module_still_exports_the_session_api():
    import tracer
    import tracer.hooks as hooks
    import tracer.session as session

    for name in ("trace", "trace_generate", "prepare_generate", "encode_prompts", "TraceSession",
                 "default_terminators", "decoder_parts"):
        assert getattr(hooks, name) is getattr(session, name)
    assert tracer.trace is session.trace and tracer.TraceSession is session.TraceSession
