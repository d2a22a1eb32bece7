"""The attention recorder's paths in the fast tier: GQA head mapping (all heads and a subset),
softcap, the 2-D (flash-style) padding mask, eager's own weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tracer
from tracer import RecordConfig
from tracer.attention import AttentionRecorder

from conftest import make_inputs, make_tiny_llama


def _eager_maps(model, seqs, mask):
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(input_ids=seqs, attention_mask=mask, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("heads", ["all", [1, 2], [3]])
def test_gqa_heads_match_eager(heads):
    """4 query heads over 2 KV heads: head h reads KV head h // 2, whichever heads are recorded."""
    model = make_tiny_llama()
    inputs = make_inputs(batch=2, seq=6, left_pad=2, seed=11)
    record = RecordConfig(attention=True, attention_heads=heads, attention_dtype="float32")
    with tracer.trace(model, record=record) as t:
        out = model.generate(**inputs, do_sample=False, max_new_tokens=4, pad_token_id=0)
    trace = t.trace
    assert trace.kv_head_of == (0, 0, 1, 1)
    recorded = trace.attention_heads
    assert recorded == ((0, 1, 2, 3) if heads == "all" else tuple(heads))
    seqs = out[:, :-1]
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, seqs.shape[1] - 6, dtype=torch.long)], dim=1)
    eager = _eager_maps(model, seqs, mask)
    for layer in (0, 1):
        for b in range(2):
            valid = mask[b].bool().numpy()
            for h in recorded:
                mine = trace.head_map(layer, h, seq=b)
                np.testing.assert_allclose(mine[valid], eager[layer][b, h].numpy()[valid], atol=1e-5,
                                           err_msg=f"layer {layer} seq {b} head {h}")


class _Module(torch.nn.Module):
    def __init__(self, scaling):
        super().__init__()
        self.scaling = scaling


def _reference(query, key, scaling, softcap=None, allowed=None):
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    scores = (query @ k.transpose(-1, -2)) * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0)


def _recorder(module, heads, n_heads=4):
    rec = AttentionRecorder({0: module}, heads=heads, num_heads=n_heads, store_maps=True, dtype=torch.float32,
                            steps=None)
    rec.begin_step(0, 0)
    return rec


@pytest.mark.parametrize("decode", [False, True])
def test_softcap_is_applied(decode):
    torch.manual_seed(0)
    module = _Module(scaling=0.5)
    q_len, k_len = (1, 5) if decode else (5, 5)
    query, key = torch.randn(1, 4, q_len, 8) * 3, torch.randn(1, 2, k_len, 8) * 3
    rec = _recorder(module, heads=[0, 1, 2, 3])
    if decode:
        rec.cache_len_before = 4
    rec.observe(module, query, key, None, (torch.zeros(1),), {"softcap": 2.0})
    stats, maps = rec.collect()
    causal = torch.arange(k_len)[None, :] <= (k_len - q_len + torch.arange(q_len))[:, None]
    want = _reference(query, key, 0.5, softcap=2.0, allowed=causal)
    np.testing.assert_allclose(maps[0].numpy(), want.numpy(), atol=1e-6)
    without = _reference(query, key, 0.5, allowed=causal)
    assert not np.allclose(maps[0].numpy(), without.numpy(), atol=1e-3)  # the cap changed them


def test_two_d_padding_mask_flash_style():
    """flash kernels receive the (B, T) padding mask itself: padded keys get no weight and
    padding query rows are zero."""
    torch.manual_seed(1)
    module = _Module(scaling=1 / math.sqrt(8))
    query, key = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    rec = _recorder(module, heads=[1, 3])
    rec.observe(module, query, key, mask, (torch.zeros(1),), {})
    stats, maps = rec.collect()
    causal = torch.arange(5)[None, :] <= torch.arange(5)[:, None]
    allowed = causal[None, None] & mask[:, None, None, :].bool()
    want = _reference(query, key, module.scaling, allowed=allowed)[:, [1, 3]]
    np.testing.assert_allclose(maps[0].numpy(), want.numpy(), atol=1e-6)
    assert np.all(maps[0].numpy()[1, :, :2] == 0)  # padding query rows
    assert np.all(maps[0].numpy()[1, :, :, :2] == 0)  # padded keys
    layers, entropy, sink, argmax = stats  # each (L, B, H)
    assert layers == (0,)
    sink = sink[0]
    np.testing.assert_allclose(sink.numpy()[1], maps[0].numpy()[1, :, -1, 2], atol=1e-7)  # first attended key


def test_eager_weights_are_used_when_given():
    module = _Module(scaling=1.0)
    query, key = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    weights = torch.softmax(torch.randn(1, 4, 3, 3), -1)
    rec = _recorder(module, heads=[2])
    rec.observe(module, query, key, None, (torch.zeros(1), weights), {})
    _, maps = rec.collect()
    causal = torch.arange(3)[None, :] <= torch.arange(3)[:, None]
    np.testing.assert_allclose(maps[0].numpy()[0, 0], weights[0, 2].masked_fill(~causal, 0).numpy(), atol=1e-7)
