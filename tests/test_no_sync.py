"""No host synchronisation per decode step: nothing in ``tracer/`` reads a tensor's value on the
host while ``generate`` decodes.

On CUDA every ``.item()``, ``.cpu()``, ``.tolist()``, ``.numpy()``, ``bool(t)``, ``int(t)`` or
``float(t)`` waits for the GPU queue to drain.  On CPU nothing waits, but the calls are the same
code path, so counting them here (the methods patched, each call attributed to the first frame
outside torch) proves what the GPU would see.  The window is the decode steps: from the second
model forward (the first is the prompt) until the recorder starts building the trace at the end
(one bulk transfer there is expected).

``SYNCS_PER_STEP`` is the published table: what each recording option costs in host reads per
decode step (0 everywhere; ``sync_timing=True`` synchronises on purpose, twice a step).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter

import numpy as np
import pytest
import torch

import tracer
from tracer import RecordConfig
from tracer.recorder import StepRecorder

from conftest import make_inputs

TRACER_DIR = os.path.dirname(tracer.__file__) + os.sep
TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__array__")
NEW_TOKENS = 6


class HostReads:
    """Counts host reads of tensor values made from ``tracer/`` code while ``active``."""

    def __init__(self) -> None:
        self.active = False
        self.calls: Counter[str] = Counter()
        self.syncs = 0  # explicit tracer._device.sync calls

    def _hit(self, name: str) -> None:
        if not self.active:
            return
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
            frame = frame.f_back  # a torch helper (e.g. __format__ -> item): blame its caller
        if frame is not None and frame.f_code.co_filename.startswith(TRACER_DIR):
            where = os.path.relpath(frame.f_code.co_filename, TRACER_DIR)
            self.calls[f"{name} {where}:{frame.f_lineno}"] += 1

    @contextlib.contextmanager
    def patched(self, model):
        originals = {name: getattr(torch.Tensor, name) for name in READS if hasattr(torch.Tensor, name)}

        def wrap(name, fn):
            def counted(self_, *args, **kwargs):
                self._hit(name)
                return fn(self_, *args, **kwargs)

            return counted

        forwards = [0]

        def pre_hook(module, args, kwargs):
            forwards[0] += 1
            if forwards[0] == 2:  # the first decode step's forward
                self.active = True

        finish = StepRecorder.finish

        def finish_then_stop(rec, *args, **kwargs):
            self.active = False
            return finish(rec, *args, **kwargs)

        import tracer._device as device
        import tracer.recorder as recorder_module

        sync = recorder_module.sync

        def counted_sync(dev):
            if self.active:
                self.syncs += 1
            return sync(dev)

        handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)
        try:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, wrap(name, fn))
            StepRecorder.finish = finish_then_stop
            recorder_module.sync = counted_sync
            yield self
        finally:
            self.active = False
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)
            StepRecorder.finish = finish
            recorder_module.sync = sync
            assert device.sync is sync
            handle.remove()


def count_reads(model, inputs, record, **gen):
    """(host reads from tracer/ during the decode steps, explicit syncs, the trace)."""
    gen = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "pad_token_id": 0, **gen}
    counter = HostReads()
    with tracer.trace(model, record=record) as session:
        with counter.patched(model):
            model.generate(**inputs, **gen)
    assert session.trace.num_steps == NEW_TOKENS
    return counter.calls, counter.syncs, session.trace


#: host reads per decode step of each recording option (the README's table)
SYNCS_PER_STEP = {
    "light": (RecordConfig(), 0),
    "modules": (RecordConfig(modules=True), 0),
    "logit_lens": (RecordConfig(logit_lens=True), 0),
    "hidden_layers": (RecordConfig(hidden_layers="all"), 0),
    "full_logits": (RecordConfig(full_logits=True), 0),
    "attention": (RecordConfig(attention=True), 0),
    "attention stats only": (RecordConfig(attention=True, attention_maps=False), 0),
    "kv_layers": (RecordConfig(kv_layers=[0]), 0),
    "everything": (RecordConfig.everything(hidden_layers="all", full_logits=True, kv_layers="all"), 0),
}


@pytest.mark.parametrize("option", list(SYNCS_PER_STEP))
def test_host_reads_per_option(tiny_model, option):
    record, per_step = SYNCS_PER_STEP[option]
    calls, syncs, _ = count_reads(tiny_model, make_inputs(batch=2, seq=5, left_pad=1), record)
    assert sum(calls.values()) == per_step * (NEW_TOKENS - 1), dict(calls)
    assert syncs == 0


@pytest.mark.parametrize("case", ["greedy", "sampling", "static", "no_cache", "padded_batch", "flush_every_step"])
def test_light_path_reads_nothing(tiny_model, case, monkeypatch):
    if case == "flush_every_step":  # the stage statistics computed while decoding, not only at the end
        import tracer.stage_stats as stage_stats

        monkeypatch.setattr(stage_stats, "ROW_POOL_BYTES", 1)
        flushes = []
        original = stage_stats.RowPool._group
        monkeypatch.setattr(stage_stats.RowPool, "_group", lambda self, *a: (flushes.append(1), original(self, *a))[1])
    inputs = make_inputs(batch=2, seq=5, left_pad=2) if case == "padded_batch" else make_inputs(seq=5)
    gen = {
        "greedy": {},
        "sampling": dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2),
        "static": dict(cache_implementation="static"),
        "no_cache": dict(use_cache=False),
        "padded_batch": {},
        "flush_every_step": dict(do_sample=True, temperature=0.8, top_k=20),
    }[case]
    calls, syncs, trace = count_reads(tiny_model, inputs, RecordConfig(), **gen)
    assert not calls and syncs == 0, dict(calls)
    if case == "flush_every_step":
        assert len(flushes) == NEW_TOKENS and all(len(step.stages) >= 3 for step in trace.steps)
    assert trace.cache is not None or case == "no_cache"


def test_sync_timing_synchronises_twice_a_step(tiny_model):
    _, syncs, _ = count_reads(tiny_model, make_inputs(seq=5), RecordConfig(sync_timing=True))
    assert syncs == 2 * (NEW_TOKENS - 1)


def test_counter_sees_a_read(tiny_model, monkeypatch):
    """The counter itself: a recorder that reads a value per step is caught, with its line."""
    import tracer.recorder as recorder_module

    original = recorder_module.StepRecorder._end_step

    def reading_end_step(self, input_ids, is_done, fired):
        int(input_ids[0, -1])  # a host read, as a careless recorder would make
        return original(self, input_ids, is_done, fired)

    monkeypatch.setattr(recorder_module.StepRecorder, "_end_step", reading_end_step)
    # defined in this test file, not in tracer/: attribute it to tracer by its module's file
    reading_end_step.__code__ = reading_end_step.__code__.replace(co_filename=recorder_module.__file__)
    calls, _, _ = count_reads(tiny_model, make_inputs(seq=5), RecordConfig())
    assert sum(calls.values()) == NEW_TOKENS - 1 and all(k.startswith("__int__ recorder.py") for k in calls), calls


def test_processor_changing_dtype_and_in_place(tiny_model):
    """Stage rows are copies taken when each stage runs: a processor writing its input in place
    or returning another dtype leaves the earlier stages' statistics as they were."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class InPlace(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, :10] = float("-inf")  # writes the previous stage's tensor
            return scores

    class Half(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.to(torch.bfloat16)

    inputs = make_inputs(seq=5)
    gen = dict(max_new_tokens=4, min_new_tokens=4, pad_token_id=0,
               logits_processor=LogitsProcessorList([Half(), InPlace()]))
    plain = tiny_model.generate(**inputs, **gen)
    with tracer.trace(tiny_model, record=RecordConfig(full_logits=True)) as session:
        out = tiny_model.generate(**inputs, **gen)
    assert torch.equal(out, plain)
    for step in session.trace.steps:
        by_name = {s.name: s for s in step.stages}
        half, masked = by_name["Half"], by_name["InPlace"]
        assert masked.n_masked[0] == 10  # ids 0-9 (eos 2 among them)
        assert half.n_masked[0] == 1  # eos only: copied before InPlace wrote into the same tensor
        assert masked.kl[0] > 0 and half.top.values.dtype == np.float32
        logits = session.trace.blobs.get(f"logits/{step.index}")
        np_half = torch.from_numpy(logits).to(torch.bfloat16).float().numpy()[0]
        top = np.sort(np_half[np.isfinite(np_half)])[::-1][:3]
        assert np.array_equal(half.top.values[0][:3], top)
