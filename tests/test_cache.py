"""KV-cache inspector: every cache kind the installed transformers runs on this machine."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

import tracer
from tracer import RecordConfig
from tracer.cache_inspector import build_timeline, read_layer

from conftest import make_inputs, make_tiny_llama

WINDOW = 4


@pytest.fixture(scope="module")
def sliding_model():
    config = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=WINDOW,
                           max_position_embeddings=256)
    torch.manual_seed(0)
    return MistralForCausalLM(config).eval()


def _run(model, inputs, **kw):
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, **kw}
    ref = model.generate(**inputs, **kw)
    with tracer.trace(model, record=kw.pop("record", None)) as t:
        out = model.generate(**inputs, **kw)
    assert torch.equal(ref, out)
    return t.trace


def test_dynamic_grows_one_per_step(tiny_model):
    trace = _run(tiny_model, make_inputs(batch=2, seq=5), min_new_tokens=6)
    cache = trace.cache
    assert cache.seq_len[:, 0].tolist() == [5, 6, 7, 8, 9, 10]
    assert np.array_equal(cache.kept_len, cache.seq_len) and np.array_equal(cache.allocated_len, cache.seq_len)
    assert np.array_equal(cache.total_bytes, cache.predicted_bytes())
    assert cache.summary(query_heads=4)["bytes_without_gqa"] == 2 * cache.summary()["measured_bytes"]


def test_static_allocated_vs_used(tiny_model):
    trace = _run(tiny_model, make_inputs(seq=5), cache_implementation="static", min_new_tokens=6)
    cache = trace.cache
    assert cache.cache_class == "StaticCache" and {i.kind for i in cache.layers} == {"StaticLayer"}
    assert cache.seq_len[:, 0].tolist() == [5, 6, 7, 8, 9, 10]
    # allocated up front for max_length - 1 positions (the last token is never fed back)
    assert len(np.unique(cache.allocated_len)) == 1 and cache.allocated_len[0, 0] == 5 + 6 - 1
    assert cache.layers[0].max_len == cache.allocated_len[0, 0]
    assert np.all(cache.total_bytes == cache.predicted_bytes(allocated=True))


def test_dynamic_sliding_window_kept_vs_seen(sliding_model):
    trace = _run(sliding_model, {"input_ids": torch.arange(3, 9)[None]}, min_new_tokens=6)
    cache = trace.cache
    assert {i.kind for i in cache.layers} == {"DynamicSlidingWindowLayer"}
    assert cache.layers[0].max_len == WINDOW
    assert cache.seq_len[:, 0].tolist() == [6, 7, 8, 9, 10, 11]  # seen keeps growing
    assert cache.kept_len[:, 0].tolist() == [WINDOW - 1] * 6  # held stays at the window
    assert np.array_equal(cache.total_bytes, cache.predicted_bytes())


def test_static_sliding_window(sliding_model):
    trace = _run(sliding_model, {"input_ids": torch.arange(3, 9)[None]}, cache_implementation="static",
                 max_new_tokens=3, min_new_tokens=3)
    cache = trace.cache
    assert cache.cache_class == "StaticCache" and cache.layers[0].kind == "StaticSlidingWindowLayer"
    assert cache.seq_len[:, 0].tolist() == [6, 7, 8]
    assert cache.kept_len[:, 0].tolist() == [WINDOW] * 3
    assert cache.allocated_len[:, 0].tolist() == [WINDOW] * 3


@pytest.mark.skipif(importlib.util.find_spec("optimum") is None, reason="quantized KV cache needs optimum-quanto")
def test_quantized_cache(tiny_model):  # pragma: no cover - not installed in CI
    trace = _run(tiny_model, make_inputs(seq=5), cache_implementation="quantized")
    assert trace.cache.cache_class == "QuantizedCache"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloaded caches need CUDA")
def test_offloaded_cache_on_gpu():  # pragma: no cover - CI has no GPU
    model = make_tiny_llama().cuda()
    inputs = {k: v.cuda() for k, v in make_inputs(seq=5).items()}
    trace = _run(model, inputs, cache_implementation="offloaded", min_new_tokens=6)
    assert trace.cache.seq_len[:, 0].tolist() == [5, 6, 7, 8, 9, 10]


def test_unknown_cache_reported_by_name():
    class MysteryCache:
        def get_seq_length(self, layer_idx=0):
            return 7

    timeline = build_timeline(MysteryCache(), [None, None], batch_size=1, reused_len=0)
    assert timeline.cache_class == "MysteryCache" and timeline.num_layers == 0
    assert timeline.summary()["measured_bytes"] == 0

    class OddLayer:  # a layer kind the inspector has never seen: bytes of its key/value tensors
        is_initialized = True

        def __init__(self):
            self.keys = torch.zeros(1, 2, 5, 8)
            self.values = torch.zeros(1, 2, 5, 8)
            self._packed_keys = torch.zeros(10, dtype=torch.uint8)

        def get_seq_length(self):
            return 9

    reading = read_layer(OddLayer())
    assert (reading.seen, reading.kept, reading.allocated) == (9, 5, 5)
    assert reading.nbytes == 2 * 1 * 2 * 5 * 8 * 4 + 10


def test_kv_snapshots(tiny_model):
    inputs = make_inputs(batch=2, seq=5)
    record = RecordConfig(kv_layers=[1], kv_steps=[0, 3])
    with tracer.trace(tiny_model, record=record) as t:
        out = tiny_model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
                                  return_dict_in_generate=True)
    trace = t.trace
    keys0, values0 = trace.kv_snapshot(0, 1)
    keys3, _ = trace.kv_snapshot(3, 1)
    assert keys0.shape == (2, 2, 5, 16) and values0.shape == (2, 2, 5, 16)
    assert keys3.shape == (2, 2, 8, 16)
    np.testing.assert_array_equal(keys3[:, :, :5], keys0)  # earlier positions never change
    final = (getattr(out, "cache", None) or out.past_key_values).layers[1].keys
    np.testing.assert_array_equal(final[:, :, :8].numpy(), keys3)
    with pytest.raises(KeyError):
        trace.kv_snapshot(1, 1)
    with pytest.raises(KeyError):
        trace.kv_snapshot(0, 0)
