"""Smoke tests of ``benchmarks/step_cost.py`` and ``benchmarks/gpu.py`` (``--device cpu
--quick``): every configuration timed, traced ids equal to plain ``generate``'s, per-layer
slopes and targets filled, the JSON written.  Not timing tests.  The ``gpu`` test checks on a
real CUDA device that recorder code never synchronises during decoding."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

import tracer

from conftest import REPO_ROOT, make_inputs, make_tiny_llama


def _load(name):
    path = REPO_ROOT / "benchmarks" / f"{name}.py"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"tracer_benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_step_cost_quick(tmp_path, one_thread):
    sc = _load("step_cost")
    report = sc.main(["--layers", "1,3", "--tokens", "4", "--repeats", "1", "--vocab", "512", "--no-nnsight",
                      "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "step_cost.json").read_text())
    assert saved["layers"] == [1, 3] and set(saved["subjects"]) == {"1 layers", "3 layers"}
    names = {"plain", "light", "modules", "attention", "full_logits", "hf_scores", "hf_eager_attn", "hooks"}
    for subject in saved["subjects"].values():
        rows = subject["configs"]
        assert set(rows) == names
        assert rows["plain"]["ratio"] == 1.0 and rows["plain"]["added_ms_per_step"] == 0.0
        for name in ("light", "modules", "attention", "full_logits", "hf_scores", "hooks"):
            assert rows[name]["identical_to_plain"] is True, name
            assert len(rows[name]["times_s"]) == 1 and rows[name]["error"] is None
    light = report["summary"]["configs"]["light"]
    assert set(light["added_ms_per_step"]) == {1, 3} and light["slope_ms_per_layer"] is not None
    targets = report["summary"]["targets"]
    assert {"light <= hf_scores", "attention <= hf_eager_attn", "modules <= 2 x light"} <= set(targets)


def test_gpu_script_on_cpu_quick(tmp_path, one_thread):
    gpu = _load("gpu")
    report = gpu.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["device_name"].startswith("cpu") and not saved["skipped"]
    assert set(saved["sections"]) == {f"{n} sdpa" for n in gpu.TINY_SHAPES}
    for section in report["sections"].values():
        assert section["configs"]["light"]["identical_to_plain"] is True
        assert section["configs"]["attention"]["identical_to_plain"] is True
    assert saved["flash_attention_2"] == "no CUDA" or not torch.cuda.is_available()


def test_measure_groups_outputs_and_records_a_mismatch(one_thread):
    """A configuration that changes one token: strict (CPU) raises; not strict (a GPU, where plain
    itself can flip at a tie) records the run's output group, the step and the trace's top-2 gap."""
    sc = _load("step_cost")
    ov = sys.modules["overhead"]
    subj = sc.llama_subject(1, torch.device("cpu"), vocab=512)
    light = ov.traced(tracer.RecordConfig())
    calls = []

    def flipped(s, n):  # light, with the token of step 5 changed in every run but the first
        ids, trace = light(s, n)
        calls.append(1)
        if len(calls) > 1:
            ids = ids.clone()
            ids[0, ids.shape[1] - n + 5] += 1
            trace.sequences = ids.numpy().copy()  # a trace holds its own run's output
        return ids, trace

    configs = {"plain": ov.run_plain, "light": flipped}
    with pytest.raises(AssertionError, match="light: output ids differ"):
        sc.measure({"s": subj}, configs, new_tokens=8, repeats=1)
    calls.clear()
    out = sc.measure({"s": subj}, configs, new_tokens=8, repeats=2, strict=False)["s"]
    rows = out["configs"]
    assert rows["plain"]["output_groups"] == [0, 0, 0] and rows["light"]["output_groups"] == [0, 1, 1]
    assert rows["light"]["identical_to_plain"] is False and rows["light"]["equals_a_plain_output"] is False
    assert out["distinct_outputs"] == 2 and out["first_differing_step_of_each_output"] == [None, 5]
    def untrue(s, n):  # a trace that does not hold its run's output is a broken trace, GPU or not
        ids, trace = light(s, n)
        ids = ids.clone()
        ids[0, -1] += 1
        return ids, trace

    with pytest.raises(AssertionError, match="trace.sequences differ"):
        sc.measure({"s": subj}, {"plain": ov.run_plain, "light": untrue}, new_tokens=8, repeats=1, strict=False)
    divs = rows["light"]["divergence"]
    assert len(divs) == 2 and all(d["step"] == 5 and d["sequence"] == 0 for d in divs)
    assert divs[0]["top2_gap"] >= 0 and len(divs[0]["top2_ids"]) == 2


def test_divergence_names_the_sequence_that_parts():
    """Batch 2, the second sequence parts at step 1: its own top-2 gap and reference token."""
    import types

    import numpy as np

    ov = _load("overhead")
    top = types.SimpleNamespace(ids=np.array([[4, 5], [8, 9]]), values=np.array([[3.0, 1.0], [2.5, 2.25]]))
    trace = types.SimpleNamespace(num_steps=2, steps=[None, types.SimpleNamespace(stages=[types.SimpleNamespace(top=top)])])
    ref = torch.tensor([[1, 2, 4, 4], [1, 2, 9, 9]])
    ids = torch.tensor([[1, 2, 4, 4], [1, 2, 9, 8]])
    assert ov.divergence(ids, ref, trace) == {"step": 1, "sequence": 1, "top2_ids": [8, 9], "top2_gap": 0.25,
                                             "reference_token": 9}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("record", ["light", "attention", "everything"])
def test_recorder_never_synchronises_on_cuda(record):
    """torch's sync debug mode set to "error" inside every recorder event during decoding: a
    synchronising CUDA call made by tracer code raises (and stops recording, which we assert
    did not happen)."""
    import tracer
    from tracer import RecordConfig
    from tracer.recorder import StepRecorder

    config = {"light": RecordConfig(), "attention": RecordConfig(attention=True),
              "everything": RecordConfig.everything(hidden_layers="all", full_logits=True)}[record]
    model = make_tiny_llama().cuda()
    inputs = {k: v.cuda() for k, v in make_inputs(batch=2, seq=5, left_pad=1).items()}
    gen = dict(max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    plain = model.generate(**inputs, **gen)
    events = ["forward_start", "forward_end", "layer_output", "point", "scores", "stop_check"]
    originals = {name: getattr(StepRecorder, name) for name in events}

    def strict(fn):
        def run(self, *args, **kwargs):
            if not self.done:  # the prompt step may read its cache position once
                return fn(self, *args, **kwargs)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return run

    try:
        for name, fn in originals.items():
            setattr(StepRecorder, name, strict(fn))
        with tracer.trace(model, record=config) as session:
            out = model.generate(**inputs, **gen)
    finally:
        for name, fn in originals.items():
            setattr(StepRecorder, name, fn)
    assert torch.equal(out, plain)
    assert session.trace.meta.status == "complete" and not session.trace.meta.notes, session.trace.meta.notes


def test_active_and_finished_follow_from_each_steps_is_done_as_generate_updates_them():
    """``active``/``finished`` are derived at the end from each step's criteria result (two
    device ops a step fewer); they equal generate's own ``unfinished_sequences`` update, step by
    step: a sequence done again later (EOS fired on its padding) does not finish twice."""
    import numpy as np

    from tracer.assemble import _active_finished

    rng = np.random.default_rng(0)
    for n, b in [(1, 1), (2, 3), (9, 4), (30, 2)]:
        done = rng.random((n, b)) < 0.3
        unfinished = torch.ones(b, dtype=torch.bool)
        want_active, want_finished = [], []
        for row in torch.from_numpy(done):  # the recorder's former per-step ops
            finished = unfinished & row
            want_active.append(unfinished.numpy())
            want_finished.append(finished.numpy())
            unfinished = unfinished ^ finished
        active, finished = _active_finished([torch.from_numpy(r) for r in done])
        assert active.dtype == finished.dtype == np.bool_
        assert np.array_equal(active, np.stack(want_active)) and np.array_equal(finished, np.stack(want_finished))
        assert finished.sum(0).max() <= 1  # at most once per sequence
    empty_active, empty_finished = _active_finished([])
    assert empty_active.shape == empty_finished.shape == (0, 0)


def test_steps_do_not_keep_every_steps_whole_sequence_alive(monkeypatch):
    """Each step's chosen tokens start as a view of that step's whole ``input_ids``; kept so,
    memory grows with the square of the length.  The recorder packs them every CHOSEN_PACK
    steps: at the end at most CHOSEN_PACK steps still hold a sequence, and the trace's chosen
    tokens are generate's own."""
    from tracer import recorder as recorder_mod

    model = make_tiny_llama()
    inputs = make_inputs(batch=2, seq=5)
    n = 2 * recorder_mod.CHOSEN_PACK + 7
    seen = {}
    finish = recorder_mod.StepRecorder.finish

    def spy(self, *args, **kwargs):
        row = 2 * 8  # one (2,) int64 row of chosen tokens
        seen["holding"] = sum(d.chosen.untyped_storage().nbytes() > row * recorder_mod.CHOSEN_PACK for d in self.done)
        seen["steps"] = len(self.done)
        return finish(self, *args, **kwargs)

    monkeypatch.setattr(recorder_mod.StepRecorder, "finish", spy)
    with tracer.trace(model, None) as session:
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    assert seen["steps"] == n
    assert 0 < seen["holding"] < recorder_mod.CHOSEN_PACK  # only the steps since the last pack
    chosen = torch.stack([torch.from_numpy(s.chosen) for s in session.trace.steps], dim=1)
    assert torch.equal(chosen, out[:, inputs["input_ids"].shape[1]:])


def test_a_run_cut_short_keeps_the_rounds_it_finished(tmp_path, one_thread, monkeypatch):
    """The JSON is written after every round (a device lent for minutes may stop the run):
    killed in round 2 of 2, it holds round 1's times, marked ``rounds_done`` 1."""
    sc = _load("step_cost")
    ov = sys.modules["overhead"]
    timed, state = ov._timed, {"rounds": 0}
    original_log = print

    def counting_print(*args, **kwargs):
        if args and isinstance(args[0], str) and "round 1/2 done" in args[0]:
            state["rounds"] = 1
        return original_log(*args, **kwargs)

    def dying(run, s, n, **kw):
        if state["rounds"] == 1:
            raise KeyboardInterrupt  # the device's time limit, in round 2
        return timed(run, s, n, **kw)

    monkeypatch.setattr(ov, "_timed", dying)
    monkeypatch.setattr("builtins.print", counting_print)
    with pytest.raises(KeyboardInterrupt):
        sc.main(["--layers", "1", "--tokens", "3", "--repeats", "2", "--vocab", "256", "--no-nnsight",
                 "--configs", "light", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "step_cost.json").read_text())
    assert saved["rounds_done"] == 1 and saved["repeats"] == 2
    rows = saved["subjects"]["1 layers"]["configs"]
    assert len(rows["plain"]["times_s"]) == len(rows["light"]["times_s"]) == 1
    assert saved["summary"]["configs"]["light"]["added_ms_per_step"]["1"] is not None


def test_step_split_on_cpu_quick(tmp_path, one_thread):
    split = _load("step_split")
    report = split.main(["--rounds", "1", "--tokens", "4", "--vocab", "256", "--layers", "1", "--out", str(tmp_path)])
    row = json.loads((tmp_path / "step_split.json").read_text())["results"]["vocab 256, 1 layers"]
    assert row == report["results"]["vocab 256, 1 layers"]
    assert row["plain_added_ms_per_step"] == 0.0 and row["light_end_ms_per_step"] > 0
    assert {"light_added_ms_per_step", "hf_scores_added_ms_per_step", "light_unpinned_added_ms_per_step"} <= set(row)
    from tracer import stage_stats, recorder, _device

    assert stage_stats.to_host is _device.to_host and recorder.StepRecorder.finish.__name__ == "finish"


def test_step_split_cut_short_keeps_what_it_measured(tmp_path, one_thread, monkeypatch):
    """The JSON is written after every vocabulary and layer count: a run stopped later (a lent
    GPU's time limit) keeps the rows it finished."""
    split = _load("step_split")
    build = split.sc.llama_subject

    def second_fails(layers, *a, **k):
        if layers == 2:
            raise RuntimeError("out of lent time")
        return build(layers, *a, **k)

    monkeypatch.setattr(split.sc, "llama_subject", second_fails)
    with pytest.raises(RuntimeError, match="out of lent time"):
        split.main(["--rounds", "1", "--tokens", "3", "--vocab", "256", "--layers", "1,2", "--out", str(tmp_path)])
    kept = json.loads((tmp_path / "step_split.json").read_text())["results"]
    assert list(kept) == ["vocab 256, 1 layers"] and kept["vocab 256, 1 layers"]["light_end_ms_per_step"] > 0


def test_a_failed_pack_keeps_the_step_that_packs(monkeypatch):
    """Packing runs last in a step's end: if it fails (out of memory), that step is whole and
    recording stops at the next one, which the note names; generation is unchanged."""
    from tracer import recorder as recorder_mod

    def broken(self):
        raise RuntimeError("no memory for the pack")

    monkeypatch.setattr(recorder_mod.StepRecorder, "_pack_chosen", broken)
    model = make_tiny_llama()
    inputs = make_inputs(batch=1, seq=5)
    n = recorder_mod.CHOSEN_PACK + 10
    plain = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    with pytest.warns(tracer.TracerWarning, match="no memory for the pack"):
        with tracer.trace(model, None) as session:
            out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    assert torch.equal(out, plain)
    trace = session.trace
    k = recorder_mod.CHOSEN_PACK
    assert len(trace.steps) == k and trace.steps[-1].index == k - 1
    assert any(f"recording stopped at step {k}:" in note for note in trace.meta.notes)
    chosen = [int(s.chosen[0]) for s in trace.steps]
    assert chosen == out[0, 5 : 5 + k].tolist()
