"""Inputs as fed: what the model's forward really received, per step (issue 12 item 8), and
recording under ``inference_mode`` / ``no_grad`` / grad mode and from other threads (issue 16)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import tracer
from tracer import NotSupportedError, RecordConfig

from conftest import make_inputs, make_tiny_llama


class _Spy:
    """A forward pre-hook of the test's own: every kwarg the model's forward received."""

    def __init__(self, model):
        self.calls: list[dict] = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.calls.append({
            "names": tuple(k for k, v in kwargs.items() if v is not None),
            "input_ids": kwargs["input_ids"].clone(),
            "position_ids": None if kwargs.get("position_ids") is None else kwargs["position_ids"].clone(),
            "attention_mask": None if kwargs.get("attention_mask") is None else kwargs["attention_mask"].clone(),
            "logits_to_keep": kwargs.get("logits_to_keep"),
            "cache_class": None if cache is None else type(cache).__name__,
            "cache_len": 0 if cache is None else int(cache.get_seq_length()),
        })


def _check_against_spy(trace, calls):
    assert len(calls) == trace.num_steps
    for step, fed in zip(trace.steps, calls):
        i = step.inputs
        assert i.names == fed["names"]
        assert np.array_equal(i.input_ids, fed["input_ids"].numpy())
        assert fed["position_ids"] is not None
        assert np.array_equal(i.position_ids, fed["position_ids"].numpy()), step.index
        if fed["attention_mask"] is None:
            assert i.attention_mask is None and i.attention_mask_shape is None
        else:
            assert np.array_equal(i.attention_mask, fed["attention_mask"].numpy())
            assert i.attention_mask_shape == tuple(fed["attention_mask"].shape)
            assert i.mask_padding.tolist() == (fed["attention_mask"] == 0).sum(-1).tolist()
        assert i.logits_to_keep == fed["logits_to_keep"]
        assert i.cache_class == fed["cache_class"]
        assert i.cache_len_before == fed["cache_len"]
        q = i.input_ids.shape[1]
        assert i.cache_slots.tolist() == list(range(fed["cache_len"], fed["cache_len"] + q))
        assert np.array_equal(i.cache_position, i.cache_slots)  # deprecated alias


def test_left_padded_positions_as_fed_tiny():
    model = make_tiny_llama()
    inputs = make_inputs(batch=3, seq=7, left_pad=3, seed=2)
    spy = _Spy(model)
    try:
        with tracer.trace(model) as t:
            model.generate(**inputs, do_sample=False, max_new_tokens=6, pad_token_id=0)
    finally:
        spy.handle.remove()
    trace = t.trace
    _check_against_spy(trace, spy.calls)
    # the padded row's positions are its own (3 fewer than its cache slots), not the cache slots
    s1 = trace.steps[1].inputs
    assert s1.position_ids[2, 0] == s1.cache_slots[0] - 3 and s1.position_ids[0, 0] == s1.cache_slots[0]
    assert trace.steps[0].inputs.mask_padding.tolist() == [0, 0, 3]


def test_left_padded_batch_of_three_embedded(embedded):
    """Done-when of issue 12: 3 prompts of different lengths, each step's recorded position_ids
    equal what forward received."""
    from tracer.session import encode_prompts

    model, tok = embedded
    prompts = ["What is the capital of France?", "Write one sentence about the sea and the wind over it.", "Hi"]
    _, enc = encode_prompts(tok, prompts, chat=True)
    assert len(set(enc["attention_mask"].sum(1).tolist())) == 3
    spy = _Spy(model)
    try:
        with tracer.trace(model, tok) as t:
            model.generate(**enc, do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)
    finally:
        spy.handle.remove()
    _check_against_spy(t.trace, spy.calls)
    pads = (enc["attention_mask"] == 0).sum(1).tolist()
    step = t.trace.steps[1].inputs
    assert [int(step.cache_slots[0]) - int(p) for p in pads] == step.position_ids[:, 0].tolist()


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "grad"])
def test_recording_under_every_grad_mode(mode):
    model = make_tiny_llama()
    inputs = make_inputs(batch=2, seq=6, left_pad=2, seed=5)
    kw = dict(do_sample=True, temperature=0.7, top_k=20, max_new_tokens=6, pad_token_id=0)
    ctx = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}[mode]
    torch.manual_seed(7)
    ref = model.generate(**inputs, **kw)
    with ctx():
        with tracer.trace(model, record=RecordConfig(attention=True, modules=True)) as t:
            torch.manual_seed(7)
            out = model.generate(**inputs, **kw)
    assert torch.equal(ref, out)
    trace = t.trace
    assert trace.meta.status == "complete" and trace.meta.error is None
    assert trace.num_steps == 6 and np.array_equal(trace.sequences, ref.numpy())
    assert [s.name for s in trace.steps[0].stages] == ["logits", "TemperatureLogitsWarper", "TopKLogitsWarper"]
    assert trace.attention(3, 1).shape == (2, 4, 1, 6 + 3)


def test_in_place_processor_under_inference_mode():
    """Without version counters, an in-place edit must still be seen as a change."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Ban(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, 5] = -float("inf")
            return scores

    model = make_tiny_llama()
    with torch.inference_mode(), tracer.trace(model) as t:
        model.generate(**make_inputs(seq=5), do_sample=False, max_new_tokens=3, pad_token_id=0,
                       logits_processor=LogitsProcessorList([Ban()]))
    assert t.trace.num_steps == 3
    for step in t.trace.steps:
        ban = next(p for p in step.processors if p.name == "Ban")
        assert ban.newly_masked[0] == 1


@pytest.mark.parametrize("attention", [False, True])
def test_generate_from_another_thread_is_refused_not_mixed(attention):
    model = make_tiny_llama()
    inputs = make_inputs(batch=1, seq=9, seed=1)
    other = make_inputs(batch=1, seq=3, seed=2)
    ref = model.generate(**inputs, do_sample=False, max_new_tokens=5, pad_token_id=0)
    errors: list[BaseException] = []
    forwards: list[torch.Tensor] = []

    def in_thread():
        try:
            model.generate(**other, do_sample=False, max_new_tokens=3, pad_token_id=0)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        forwards.append(model(**other).logits)  # a plain forward from the other thread: never recorded

    with tracer.trace(model, record=RecordConfig(attention=attention)) as t:
        worker = threading.Thread(target=in_thread, name="worker")
        worker.start()
        worker.join()
        out = model.generate(**inputs, do_sample=False, max_new_tokens=5, pad_token_id=0)
    assert len(errors) == 1 and isinstance(errors[0], NotSupportedError)
    assert "thread 'worker'" in str(errors[0]) and "refused" in str(errors[0])
    assert len(forwards) == 1
    assert torch.equal(out, ref)
    assert len(t.traces) == 1 and t.trace.prompt_len == 9 and t.trace.meta.status == "complete"
    if attention:
        assert t.trace.attention(0, 0).shape == (1, 4, 9, 9)


def test_forward_from_another_thread_during_generation_is_not_recorded():
    """A concurrent forward in another thread while the block's generate runs: the trace and its
    attention maps hold only the block's own forwards."""
    from transformers import LogitsProcessor, LogitsProcessorList

    model = make_tiny_llama()
    inputs = make_inputs(batch=1, seq=9, seed=1)
    other = make_inputs(batch=1, seq=3, seed=2)

    class RunOtherThread(LogitsProcessor):
        def __call__(self, input_ids, scores):
            worker = threading.Thread(target=lambda: model(**other))
            worker.start()
            worker.join()
            return scores

    kw = dict(do_sample=False, max_new_tokens=4, pad_token_id=0)
    ref = model.generate(**inputs, **kw)
    with tracer.trace(model, record=RecordConfig(attention=True, modules=True)) as t:
        out = model.generate(**inputs, logits_processor=LogitsProcessorList([RunOtherThread()]), **kw)
    assert torch.equal(out, ref)
    trace = t.trace
    assert trace.num_steps == 4 and trace.meta.status == "complete"
    assert [trace.attention(s, 1).shape[-1] for s in range(4)] == [9, 10, 11, 12]
    assert trace.steps[0].inputs.input_ids.shape == (1, 9)


@pytest.mark.parametrize("family", ["llama", "bloom"])  # (Bloom's forward takes no position_ids)
def test_embeddings_fed_at_step_0_write_their_cache_slots(tmp_path, family):
    """generate(inputs_embeds=...): step 0 feeds embeddings, not ids; its cache slots are still
    the prompt's positions (they were empty), and they survive a save and load."""
    from test_families import OTHER_ATTENTION, make_family

    model = make_tiny_llama() if family == "llama" else make_family(family, OTHER_ATTENTION[family])
    inputs = make_inputs(batch=2, seq=6, left_pad=2)
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach()
    kw = dict(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], max_new_tokens=3, do_sample=False,
              pad_token_id=0)
    ref = model.generate(**kw)
    with tracer.trace(model) as t:
        out = model.generate(**kw)
    assert torch.equal(out, ref)
    trace = t.trace
    assert "inputs_embeds" in trace.steps[0].inputs.names and trace.steps[0].inputs.input_ids.size == 0
    assert trace.steps[0].inputs.cache_slots.tolist() == list(range(6))
    assert [s.inputs.cache_slots.tolist() for s in trace.steps[1:]] == [[6], [7]]
    loaded = tracer.load_trace(trace.save(tmp_path / "t"))
    assert [s.inputs.cache_slots.tolist() for s in loaded.steps] == [list(range(6)), [6], [7]]
