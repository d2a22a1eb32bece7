"""The step recorder driven by events alone: no model, no generate, no hooks."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from tracer.config import RecordConfig
from tracer.errors import MemoryBudgetError, NotSupportedError
from tracer.plan import ModelPlan, estimate_bytes
from tracer.recorder import StepRecorder

V, B, L, D = 12, 2, 2, 4


def _plan(**changes) -> ModelPlan:
    base = dict(
        num_layers=L, num_heads=4, num_kv_heads=2, head_dim=2, hidden_size=D, vocab_size=V,
        device=torch.device("cpu"), attn_implementation="sdpa", hidden_layers=(), lens_layers=(), kv_layers=(),
        attention_layers=(), attention_heads=(), final_norm=None, lm_head=lambda x: x @ torch.eye(D, V),
        attention=None, auto_compiles=lambda kwargs, gc: False,
        model_facts={"model_name": "fake", "model_class": "Fake", "model_config": {}, "dtype": "torch.float32"},
    )
    base.update(changes)
    return ModelPlan(**base)


class _Criterion:
    def __init__(self, eos=None):
        if eos is not None:
            self.eos_token_id = eos


class MaxLengthCriteria:  # named like transformers' criterion: the recorder reads the class name
    pass


def _gen_config(do_sample=False, max_length=8, eos=3):
    return types.SimpleNamespace(
        do_sample=do_sample, max_length=max_length, num_return_sequences=1, use_cache=True, eos_token_id=eos,
        pad_token_id=0, prefill_chunk_size=None,
        get_generation_mode=lambda: __import__("transformers").generation.configuration_utils.GenerationMode.GREEDY_SEARCH,
        to_diff_dict=lambda: {"max_length": max_length},
    )


class _Temp:
    temperature = 0.5

    def __init__(self):
        self.temperature = 0.5


def _run(recorder, steps: list[dict]):
    """Feed the event sequence of one generate; each dict gives a step's logits, chosen ids, done."""
    temp = _Temp()
    recorder.configure(_gen_config(), [temp], input_len=3)
    ids = torch.tensor([[5, 6, 7], [0, 8, 9]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    for i, s in enumerate(steps):
        fed = ids if i == 0 else ids[:, -1:]
        pos = (mask.cumsum(-1) - 1).clamp(min=0) if i == 0 else (mask.sum(-1, keepdim=True) - 1)
        recorder.forward_start((), {"input_ids": fed, "position_ids": pos, "attention_mask": mask,
                                    "logits_to_keep": 1, "use_cache": True})
        for layer in range(L):
            recorder.layer_output(layer, (torch.full((B, fed.shape[1], D), float(layer + i)),))
        recorder.forward_end(types.SimpleNamespace(cache=None), {})
        logits = s["logits"]
        recorder.scores(None, logits)
        recorder.scores(temp, logits / 0.5)
        ids = torch.cat([ids, s["chosen"][:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
        recorder.stop_check(ids, s["done"], s["fired"])
    return recorder.finish(ids, None)


def _logits(seed):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed))


def test_recorder_builds_steps_from_events():
    rec = StepRecorder(_plan(hidden_layers=(1,)), RecordConfig(top_k=3, hidden_layers=[1], cache=False),
                       input_ids=torch.tensor([[5, 6, 7], [0, 8, 9]]),
                       attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]))
    eos_hit = torch.tensor([False, True])
    steps = [
        {"logits": _logits(0), "chosen": torch.tensor([4, 3]), "done": eos_hit,
         "fired": [(_Criterion(eos=3), eos_hit), (MaxLengthCriteria(), torch.tensor([False, False]))]},
        {"logits": _logits(1), "chosen": torch.tensor([2, 0]), "done": torch.tensor([True, True]),
         "fired": [(_Criterion(eos=3), torch.tensor([False, False])), (MaxLengthCriteria(), torch.tensor([True, True]))]},
    ]
    trace = _run(rec, steps)
    assert trace.num_steps == 2 and trace.meta.status == "complete"
    assert [s.name for s in trace.steps[0].stages] == ["logits", "_Temp"]
    assert trace.steps[0].stages[1].params == {"temperature": 0.5}
    assert trace.steps[0].chosen.tolist() == [4, 3]
    assert trace.stop_reasons == ["max_length", "eos:<3>"]
    assert trace.stop_reasons[1].token_id == 3
    assert trace.steps[1].active.tolist() == [True, False]
    # ranks: the chosen token's rank under the raw logits
    raw = steps[0]["logits"]
    assert trace.steps[0].stages[0].chosen_rank.tolist() == [int((raw[b] > raw[b, c]).sum()) for b, c in
                                                             enumerate([4, 3])]
    np.testing.assert_allclose(trace.steps[0].stages[0].top.logsumexp, torch.logsumexp(raw, -1).numpy(), rtol=1e-6)
    # inputs as fed
    s0, s1 = trace.steps[0].inputs, trace.steps[1].inputs
    assert s0.names == ("input_ids", "position_ids", "attention_mask", "logits_to_keep", "use_cache")
    assert s0.position_ids.tolist() == [[0, 1, 2], [0, 0, 1]] and s1.position_ids.tolist() == [[3], [2]]
    assert s0.attention_mask.tolist() == [[1, 1, 1], [0, 1, 1]] and s1.attention_mask_shape == (2, 4)
    assert s0.mask_padding.tolist() == [0, 1] and s0.logits_to_keep == 1 and s0.cache_class is None
    assert trace.hidden(1, 1).tolist() == [[2.0] * D] * B
    assert trace.meta.model_name == "fake" and trace.meta.terminators == {3: "<3>"}
    assert trace.kv_head_of == (0, 0, 1, 1)


def test_nested_forwards_and_suspension_are_not_the_step():
    rec = StepRecorder(_plan(hidden_layers=(0,)), RecordConfig(hidden_layers=[0], cache=False))
    rec.configure(_gen_config(), [], input_len=2)
    rec.forward_start((), {"input_ids": torch.tensor([[1, 2]])})
    rec.layer_output(0, torch.ones(1, 2, D))
    rec.forward_end(None, {})
    assert not rec.live
    rec.scores(None, _logits(0)[:1])
    rec.forward_start((), {"input_ids": torch.tensor([[9]])})  # a processor calls the model
    rec.layer_output(0, torch.full((1, 1, D), 7.0))  # not the step's: nested
    rec.forward_end(None, {})
    rec.stop_check(torch.tensor([[1, 2, 5]]), torch.tensor([True]), [(MaxLengthCriteria(), torch.tensor([True]))])
    trace = rec.finish(torch.tensor([[1, 2, 5]]), None)
    assert trace.num_steps == 1 and trace.steps[0].inputs.input_ids.tolist() == [[1, 2]]
    assert trace.hidden(0, 0).tolist() == [[1.0] * D]


def test_unchanged_scores_reuse_the_previous_stage_under_inference_mode():
    rec = StepRecorder(_plan(), RecordConfig(cache=False))
    rec.configure(_gen_config(), [], input_len=2)
    with torch.inference_mode():
        scores = _logits(3)
        rec.forward_start((), {"input_ids": torch.tensor([[1, 2], [3, 4]])})
        rec.forward_end(None, {})
        rec.scores(None, scores)
        scores[:, 0] = -float("inf")  # in place: no version counter on inference tensors
        rec.scores(_Temp(), scores)
        rec.stop_check(torch.tensor([[1, 2, 1], [3, 4, 1]]), torch.tensor([True, True]), [])
    trace = rec.finish(None, None)
    assert rec.broken is None and trace.num_steps == 1
    assert trace.steps[0].processors[0].newly_masked.tolist() == [1, 1]


def test_refusals_raise_and_recording_errors_do_not():
    rec = StepRecorder(_plan(), RecordConfig())
    beam = _gen_config()
    from transformers.generation.configuration_utils import GenerationMode

    beam.get_generation_mode = lambda: GenerationMode.BEAM_SEARCH
    with pytest.raises(NotSupportedError, match="beam_search"):
        rec.configure(beam, [], input_len=3)
    compiled = StepRecorder(_plan(auto_compiles=lambda kw, gc: True), RecordConfig())
    with pytest.raises(NotSupportedError, match="disable_compile=True"):
        compiled.configure(_gen_config(), [], input_len=3, model_kwargs={})
    small = StepRecorder(_plan(), RecordConfig(full_logits=True, max_bytes=100))
    with pytest.raises(MemoryBudgetError, match="full_logits"):
        small.configure(_gen_config(max_length=50), [], input_len=3)
    rec = StepRecorder(_plan(), RecordConfig(cache=False))
    rec.configure(_gen_config(), [], input_len=2)
    rec.forward_start((), {"input_ids": torch.tensor([[1, 2]])})
    rec.forward_end(None, {})
    with pytest.warns(UserWarning, match="recording stopped at step 0"):
        rec.scores(None, "not a tensor")
    rec.stop_check(torch.tensor([[1, 2, 3]]), torch.tensor([True]), [])  # ignored once broken
    trace = rec.finish(None, None)
    assert trace.meta.status == "error" and trace.num_steps == 0


def test_estimate_counts_every_sequence_of_the_batch():
    plan = _plan(attention_layers=(0, 1), attention_heads=(0, 1, 2, 3), hidden_layers=(1,))
    config = RecordConfig(attention=True, full_logits=True, hidden_layers=[1])
    one = estimate_bytes(plan, config, batch=1, prompt_len=5, max_new_tokens=4, n_stages=2)
    three = estimate_bytes(plan, config, batch=3, prompt_len=5, max_new_tokens=4, n_stages=2)
    assert set(one) == set(three) == {"steps", "attention", "full_logits", "hidden"}
    for kind in one:
        assert three[kind] == 3 * one[kind], kind
    # attention: prompt matrix + one row per decode step, per head and layer, fp16
    assert one["attention"] == (25 + 6 + 7 + 8) * 4 * 2 * 2
    assert one["full_logits"] == 4 * V * 4 and one["hidden"] == 4 * D * 4


def test_recorder_batch_factor_reaches_the_budget_check():
    """num_return_sequences multiplies the batch the budget is checked for."""
    config = RecordConfig(full_logits=True, max_bytes=4 * 12 * 4 * 2 + 10_000)
    gc = _gen_config(max_length=7)
    StepRecorder(_plan(), config, input_ids=torch.zeros(2, 3, dtype=torch.long)).configure(gc, [], input_len=3)
    gc.num_return_sequences = 40
    with pytest.raises(MemoryBudgetError, match="batch 80"):
        StepRecorder(_plan(), config, input_ids=torch.zeros(2, 3, dtype=torch.long)).configure(gc, [], input_len=3)
