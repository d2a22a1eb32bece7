"""Issue 23's rough edges, each held by a test: a save into an unwritable place names the path
asked for, `compare` of runs of different lengths counts identical steps over the steps both
runs have, and bitsandbytes' offline hub-kernel message is dropped during a quantized load
while everything else it logs still shows."""

from __future__ import annotations

import logging

import pytest
import torch

import tracer
from tracer import RecordConfig


def _greedy(model, inputs, n):
    with tracer.trace(model, record=RecordConfig(top_k=5)) as t:
        model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return t.trace


def test_save_into_proc_names_the_target(tiny_model, tiny_inputs):
    trace = _greedy(tiny_model, tiny_inputs(batch=1, seq=4), 3)
    with pytest.raises(OSError) as info:
        trace.save("/proc/x.trace")
    assert "/proc/x.trace" in str(info.value)
    assert ".tmp-" not in str(info.value)  # never the hidden temporary folder's name


def test_identical_fraction_over_shared_steps(tiny_model, tiny_inputs):
    inputs = tiny_inputs(batch=1, seq=4)
    short, long = _greedy(tiny_model, inputs, 4), _greedy(tiny_model, inputs, 8)
    seq = tracer.compare(short, long).summary()["sequences"][0]
    assert (seq["steps_a"], seq["steps_b"], seq["shared_steps"]) == (4, 8, 4)
    assert seq["first_divergence"] is None
    assert seq["identical_fraction"] == 1.0  # was 0.5: the fraction over the longer run
    assert "identical 100% of 4 shared" in tracer.compare(short, long).text()


def test_hub_kernel_message_dropped_only_while_loading(caplog):
    from tracer.quantization import HUB_KERNEL_MESSAGE, quiet_hub_kernel_message

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        with quiet_hub_kernel_message() as drop:
            before = drop.dropped  # importing bitsandbytes inside may log (and drop) the real one
            log.warning("%s: %s", HUB_KERNEL_MESSAGE, "trust_remote_code ...")
            log.warning("something else bitsandbytes says")
        log.warning("%s: after the load", HUB_KERNEL_MESSAGE)
    shown = [r.getMessage() for r in caplog.records]
    assert drop.dropped == before + 1
    assert "something else bitsandbytes says" in shown
    assert any("after the load" in m for m in shown)  # the filter is removed afterwards
    assert not any("trust_remote_code" in m for m in shown)
