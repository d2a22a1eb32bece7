"""The step recorder on a tiny random Llama: identity, inputs, processors, stops, cleanup."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

import tracer
from tracer import MemoryBudgetError, NotSupportedError, RecordConfig

from conftest import make_inputs, make_tiny_llama

SAMPLING = dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.1)


def _generate(model, inputs, seed=None, **kw):
    kw.setdefault("max_new_tokens", 12)
    kw.setdefault("pad_token_id", 0)
    if seed is not None:
        torch.manual_seed(seed)
    return model.generate(**inputs, **kw)


def _traced(model, inputs, record=None, seed=None, **kw):
    with tracer.trace(model, record=record) as t:
        out = _generate(model, inputs, seed=seed, **kw)
    return out, t.trace


def _hook_counts(model):
    # Only to prove removal: count hooks on every submodule.
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("batch,left_pad", [(1, 0), (3, 2)])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_identical(batch, left_pad, attn):
    model = make_tiny_llama()
    model.set_attn_implementation(attn)
    inputs = make_inputs(batch=batch, seq=7, left_pad=left_pad)
    ref = _generate(model, inputs, do_sample=False)
    out, trace = _traced(model, inputs, record=RecordConfig.everything(), do_sample=False)
    assert torch.equal(ref, out)
    assert np.array_equal(trace.sequences, ref.numpy())
    assert model.config._attn_implementation == attn


@pytest.mark.parametrize("batch,left_pad", [(1, 0), (3, 3)])
def test_sampling_identical_same_seed(tiny_model, batch, left_pad):
    inputs = make_inputs(batch=batch, seq=6, left_pad=left_pad, seed=3)
    ref = _generate(tiny_model, inputs, seed=123, **SAMPLING)
    out, trace = _traced(tiny_model, inputs, record=RecordConfig(attention=True, modules=True), seed=123, **SAMPLING)
    assert torch.equal(ref, out)
    names = [p.name for p in trace.steps[1].processors]
    assert names == [
        "RepetitionPenaltyLogitsProcessor",
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
    ]
    assert all(s.sampled for s in trace.steps)


def test_inputs_per_step(tiny_model):
    inputs = make_inputs(batch=2, seq=5, left_pad=2)
    _, trace = _traced(tiny_model, inputs, do_sample=False, max_new_tokens=6)
    s0 = trace.steps[0]
    assert s0.kind == "prefill"
    assert np.array_equal(s0.inputs.input_ids, inputs["input_ids"].numpy())
    assert s0.inputs.cache_len_before == 0
    assert s0.inputs.cache_slots.tolist() == [0, 1, 2, 3, 4]
    assert s0.inputs.attention_mask_shape == (2, 5)
    # left padding: the padded row's real tokens start at position 0
    assert s0.inputs.position_ids[1, 2:].tolist() == [0, 1, 2]
    for i, step in enumerate(trace.steps[1:], start=1):
        assert step.inputs.input_ids.shape == (2, 1)
        assert step.inputs.input_ids[:, 0].tolist() == trace.steps[i - 1].chosen.tolist()
        assert step.inputs.cache_slots.tolist() == [5 + i - 1]
        assert step.inputs.cache_len_before == 5 + i - 1
        assert step.inputs.position_ids[:, 0].tolist() == [4 + i, 2 + i]


def test_topp_masks_and_replay_reproduces_final_probs(tiny_model):
    inputs = make_inputs(batch=1, seq=6, seed=5)
    record = RecordConfig(top_k=64)  # ≥ top_k=50: every surviving token is recorded
    _, trace = _traced(tiny_model, inputs, record=record, seed=7, **SAMPLING)
    for step in trace.steps:
        top_p = next(p for p in step.processors if p.name == "TopPLogitsWarper")
        assert top_p.newly_masked[0] > 0
        assert top_p.params["top_p"] == 0.9
        final = step.final
        # replay: softmax over the recorded final-stage scores = recorded final probabilities
        replay = torch.softmax(torch.from_numpy(final.values), dim=-1).numpy()
        np.testing.assert_allclose(replay, final.probs, atol=1e-6)
        # the chosen token's probability is consistent with the recorded top-k
        chosen = int(step.chosen[0])
        where = np.flatnonzero(final.ids[0] == chosen)
        assert where.size == 1
        np.testing.assert_allclose(final.probs[0, where[0]], step.chosen_prob[0], rtol=1e-5)
        assert step.stages[-1].chosen_rank[0] == where[0]


def test_processor_effects_consistent(tiny_model):
    inputs = make_inputs(batch=2, seq=6, seed=2)
    _, trace = _traced(tiny_model, inputs, seed=0, **SAMPLING)
    for step in trace.steps:
        effects = step.processors
        temp = next(p for p in effects if p.name == "TemperatureLogitsWarper")
        # temperature divides every score: the top values scale by 1/T, ranks are unchanged
        np.testing.assert_allclose(temp.after.values, temp.before.values / 0.7, rtol=1e-5)
        assert np.array_equal(temp.chosen_rank_after, temp.chosen_rank_before)
        top_k = next(p for p in effects if p.name == "TopKLogitsWarper")
        assert top_k.newly_masked.tolist() == [256 - 50] * 2
        assert (top_k.kl > 0).all()
        assert (step.stages[0].kl == 0).all()


def test_greedy_chosen_is_argmax_and_full_logits(tiny_model):
    inputs = make_inputs(batch=2, seq=4, seed=9)
    _, trace = _traced(tiny_model, inputs, record=RecordConfig(full_logits=True), do_sample=False)
    for step in trace.steps:
        assert not step.sampled
        full = trace.full_logits(step.index)
        assert full.shape == (2, 256)
        assert np.array_equal(step.chosen, full.argmax(-1))
        assert np.array_equal(step.logits.ids[:, 0], full.argmax(-1))
        np.testing.assert_allclose(step.logits.values[:, 0], full.max(-1))
        assert step.stages[0].chosen_rank.tolist() == [0, 0]


def test_stop_reasons_and_finished_rows(tiny_model):
    inputs = make_inputs(batch=3, seq=5, seed=1, left_pad=1)
    ref = _generate(tiny_model, inputs, do_sample=False, max_new_tokens=8)
    # use the first generated token of sequence 1 as a terminator: it stops at step 0
    stop_id = int(ref[1, 5])
    _, trace = _traced(tiny_model, inputs, do_sample=False, max_new_tokens=8, eos_token_id=stop_id)
    assert trace.stop_reasons[1] == f"eos:<{stop_id}>"
    assert trace.steps[0].finished[1] and trace.steps[0].stop_reasons[1] == f"eos:<{stop_id}>"
    for step in trace.steps[1:]:
        assert not step.active[1]  # marked, not silently padded
        assert step.chosen[1] == 0
    others = [r for b, r in enumerate(trace.stop_reasons) if b != 1]
    assert all(r in ("max_length", f"eos:<{stop_id}>") for r in others)
    assert trace.num_new_tokens[1] == 1


def test_exception_inside_with_restores_model(tiny_model):
    before_hooks = _hook_counts(tiny_model)
    before_gc = tiny_model.generation_config.to_dict()
    with pytest.raises(RuntimeError, match="boom"):
        with tracer.trace(tiny_model, record=RecordConfig.everything()):
            assert tiny_model.config._attn_implementation == "tracer_sdpa"
            raise RuntimeError("boom")
    assert _hook_counts(tiny_model) == before_hooks
    assert tiny_model.config._attn_implementation == "sdpa"
    assert tiny_model.generation_config.to_dict() == before_gc
    assert not {"generate", "_get_logits_processor", "_get_stopping_criteria"} & set(vars(tiny_model))


class _InterruptAt(LogitsProcessor):
    def __init__(self, step):
        self.step, self.calls = step, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls > self.step:
            raise KeyboardInterrupt
        return scores


def test_keyboard_interrupt_keeps_recorded_steps(tiny_model):
    before_hooks = _hook_counts(tiny_model)
    inputs = make_inputs(batch=1, seq=5)
    with pytest.raises(KeyboardInterrupt):
        with tracer.trace(tiny_model, record=RecordConfig(attention=True)) as t:
            _generate(tiny_model, inputs, do_sample=False, logits_processor=LogitsProcessorList([_InterruptAt(3)]))
    trace = t.trace
    assert trace.meta.status == "interrupted"
    assert trace.num_steps == 3
    assert trace.stop_reasons == ["interrupted"]
    assert trace.attention(2, 0).shape[-1] == 5 + 2
    assert _hook_counts(tiny_model) == before_hooks
    assert tiny_model.config._attn_implementation == "sdpa"


def test_key_value_snapshots_without_the_cache_are_refused_before_generating(tiny_model):
    """kv_layers snapshots the KV cache; with use_cache=False there is none: refused in one line
    before any forward (it recorded nothing and said nothing)."""
    calls = []
    handle = tiny_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with tracer.trace(tiny_model, record=RecordConfig(kv_layers="all")) as t:
            with pytest.raises(NotSupportedError, match="use_cache=False"):
                _generate(tiny_model, make_inputs(batch=1, seq=5), max_new_tokens=2, use_cache=False)
    finally:
        handle.remove()
    assert calls == [] and t.traces == []


def test_paged_in_a_generation_config_runs_the_ordinary_loop_and_is_recorded(tiny_model):
    """Only the keyword cache_implementation='paged' switches generate to generate_batch; set in
    a GenerationConfig, generate runs its ordinary loop: recorded, not refused."""
    from transformers import GenerationConfig

    inputs = make_inputs(batch=1, seq=5)
    gc = GenerationConfig(cache_implementation="paged", max_new_tokens=3, do_sample=False, pad_token_id=0)
    ref = tiny_model.generate(**inputs, generation_config=gc)
    with tracer.trace(tiny_model) as t:
        out = tiny_model.generate(**inputs, generation_config=gc)
    assert torch.equal(out, ref) and t.trace.num_steps == 3


def test_unsupported_modes_raise_before_generating(tiny_model):
    inputs = make_inputs(batch=1, seq=5)
    calls = []
    handle = tiny_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with tracer.trace(tiny_model) as t:
            with pytest.raises(NotSupportedError, match="assistant_early_exit"):  # beam search is recorded (test_beam)
                _generate(tiny_model, inputs, prompt_lookup_num_tokens=2, assistant_early_exit=1)
            with pytest.raises(NotSupportedError, match="assistant_model"):
                _generate(tiny_model, inputs, assistant_model=tiny_model)
            with pytest.raises(NotSupportedError, match="continuous batching"):  # generate_batch: no steps seen
                _generate(tiny_model, inputs, cache_implementation="paged")
    finally:
        handle.remove()
    assert calls == []
    assert t.traces == []
    with pytest.raises(NotSupportedError, match="encoder-decoder|decoder layers"):
        from transformers import T5Config, T5ForConditionalGeneration

        tracer.trace(T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=64)))


def test_memory_budget_checked_before_generating(tiny_model):
    inputs = make_inputs(batch=2, seq=8)
    record = RecordConfig(attention=True, max_bytes=10_000)
    with pytest.raises(MemoryBudgetError, match="attention"):
        with tracer.trace(tiny_model, record=record) as t:
            _generate(tiny_model, inputs, do_sample=False, max_new_tokens=64)
    assert t.traces == []
    assert tiny_model.config._attn_implementation == "sdpa"
    # stats only fit easily, and a large enough budget records every map
    _, trace = _traced(tiny_model, inputs, record=RecordConfig(attention=True, attention_maps=False, max_bytes=10_000),
                       do_sample=False, max_new_tokens=8)
    assert trace.steps[3].attention_stats.entropy.shape == (2, 2, 4)


def test_residual_norms_hidden_and_logit_lens(tiny_model):
    inputs = make_inputs(batch=2, seq=6, seed=4)
    record = RecordConfig(modules=True, hidden_layers=[1], logit_lens=True)
    _, trace = _traced(tiny_model, inputs, record=record, do_sample=False, max_new_tokens=5)
    assert trace.residual_points == ("embed", "layer.0", "layer.1", "norm")
    for step in trace.steps:
        assert step.residual_norms.shape == (4, 2)
        np.testing.assert_allclose(step.residual_norms[2], np.linalg.norm(trace.hidden(step.index, 1), axis=-1), rtol=1e-5)
        lens = step.logit_lens
        assert lens.layers == (0, 1)
        # the last layer seen through norm + lm_head *is* the model's output
        assert lens.chosen_rank[-1].tolist() == step.stages[0].chosen_rank.tolist() == [0, 0]
        assert np.array_equal(lens.top_id[-1], step.chosen)


def test_no_generate_no_trace_and_nesting(tiny_model):
    with tracer.trace(tiny_model) as t:
        tiny_model(**make_inputs())  # a plain forward is not a generation
        with pytest.raises(NotSupportedError, match="already being traced"):
            with tracer.trace(tiny_model):
                pass
    assert t.traces == []
    with pytest.raises(tracer.TracerError, match="nothing was traced"):
        t.trace


def test_two_generations_two_traces(tiny_model):
    with tracer.trace(tiny_model) as t:
        _generate(tiny_model, make_inputs(seq=4), do_sample=False, max_new_tokens=3)
        _generate(tiny_model, make_inputs(seq=6), do_sample=False, max_new_tokens=5)
    assert [tr.num_steps for tr in t.traces] == [3, 5]
    assert t.trace is t.traces[-1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_identical_and_recorded(dtype):
    model = make_tiny_llama().to(dtype)
    inputs = make_inputs(batch=2, seq=6, left_pad=2)
    ref = _generate(model, inputs, seed=5, **SAMPLING)
    out, trace = _traced(model, inputs, record=RecordConfig.everything(full_logits=True), seed=5, **SAMPLING)
    assert torch.equal(ref, out)
    assert trace.meta.dtype == str(dtype)
    step = trace.steps[2]
    assert step.logits.values.dtype == np.float32 and np.isfinite(step.logits.values).all()
    assert trace.attention(2, 1).dtype == np.float16  # maps stored fp16 whatever the model dtype
    rows = trace.head_map(1, 0, seq=0)
    np.testing.assert_allclose(rows.sum(-1), 1.0, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_identical_and_recorded():  # pragma: no cover - CI has no GPU
    model = make_tiny_llama().to("cuda", torch.bfloat16)
    inputs = {k: v.cuda() for k, v in make_inputs(batch=3, seq=7, left_pad=2).items()}
    for kw in (dict(do_sample=False), SAMPLING):
        ref = _generate(model, inputs, seed=11, **kw)
        out, trace = _traced(model, inputs, record=RecordConfig(attention=True, modules=True), seed=11, **kw)
        assert torch.equal(ref, out)
        assert trace.meta.device.startswith("cuda")
        assert trace.attention(0, 0).shape[:2] == (3, 4)


def test_runtime_budget_guard_warns_and_keeps_generating(tiny_model, monkeypatch):
    """If the estimate was too low, recording of large arrays stops; generation goes on unchanged."""
    import tracer.recorder

    monkeypatch.setattr(tracer.recorder, "estimate_bytes", lambda *a, **kw: {"steps": 0})
    inputs = make_inputs(batch=1, seq=6)
    ref = _generate(tiny_model, inputs, do_sample=False, max_new_tokens=10)
    record = RecordConfig(attention=True, attention_dtype="float32", max_bytes=2_000)
    with pytest.warns(tracer.TracerWarning, match="memory budget"):
        out, trace = _traced(tiny_model, inputs, record=record, do_sample=False, max_new_tokens=10)
    assert torch.equal(ref, out)
    assert trace.num_steps == 10
    recorded = [k for k in trace.blobs.keys()]
    assert 0 < len(recorded) < 10 * 2
    assert sum(trace.blobs.get(k).nbytes for k in recorded) <= 2_000
    assert any("memory budget" in n for n in trace.meta.notes)


def test_without_cache_every_step_feeds_the_whole_sequence(tiny_model):
    inputs = make_inputs(batch=1, seq=5)
    ref = _generate(tiny_model, inputs, do_sample=False, max_new_tokens=4, use_cache=False)
    out, trace = _traced(tiny_model, inputs, record=RecordConfig(attention=True), do_sample=False,
                         max_new_tokens=4, use_cache=False)
    assert torch.equal(ref, out)
    for i, step in enumerate(trace.steps):
        assert step.inputs.input_ids.shape == (1, 5 + i)
        assert step.inputs.cache_len_before == 0
        assert step.inputs.cache_slots.tolist() == list(range(5 + i))
        assert trace.attention(i, 0).shape == (1, 4, 5 + i, 5 + i)
    assert trace.cache is None
    cached = _traced(tiny_model, inputs, record=RecordConfig(attention=True), do_sample=False, max_new_tokens=4)[1]
    np.testing.assert_allclose(trace.head_map(1, 2), cached.head_map(1, 2), atol=2e-3)


def test_entropy_and_kl_match_direct_computation(tiny_model):
    inputs = make_inputs(batch=2, seq=5, seed=8)
    record = RecordConfig(full_logits=True)
    _, trace = _traced(tiny_model, inputs, record=record, seed=3, do_sample=True, temperature=0.5, top_k=0,
                       top_p=1.0, max_new_tokens=4)
    for step in trace.steps:
        assert [st.name for st in step.stages] == ["logits", "TemperatureLogitsWarper"]
        raw = trace.full_logits(step.index).astype(np.float64)
        logp = raw - np.log(np.exp(raw - raw.max(-1, keepdims=True)).sum(-1, keepdims=True)) - raw.max(-1, keepdims=True)
        hot = raw / 0.5
        logq = hot - np.log(np.exp(hot - hot.max(-1, keepdims=True)).sum(-1, keepdims=True)) - hot.max(-1, keepdims=True)
        np.testing.assert_allclose(step.stages[0].entropy, -(np.exp(logp) * logp).sum(-1), rtol=1e-4)
        np.testing.assert_allclose(step.stages[1].entropy, -(np.exp(logq) * logq).sum(-1), rtol=1e-4)
        np.testing.assert_allclose(step.stages[1].kl, (np.exp(logq) * (logq - logp)).sum(-1), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(step.stages[0].top.logsumexp, np.log(np.exp(raw).sum(-1)), rtol=1e-5)


class _InPlaceBan(LogitsProcessor):
    """Edits scores in place (a common user pattern) — must be recorded as a change."""

    def __call__(self, input_ids, scores):
        scores[:, 5] = -float("inf")
        return scores


def test_in_place_processor_is_recorded(tiny_model):
    inputs = make_inputs(batch=1, seq=5)
    _, trace = _traced(tiny_model, inputs, do_sample=False, max_new_tokens=3,
                       logits_processor=LogitsProcessorList([_InPlaceBan()]))
    for step in trace.steps:
        ban = next(p for p in step.processors if p.name == "_InPlaceBan")
        assert ban.newly_masked[0] == 1
        assert 5 not in ban.after.ids[0][np.isfinite(ban.after.values[0])]


class _WritesThenCopies(LogitsProcessor):
    """Writes the scores it is given in place, then returns a copy of them."""

    def __call__(self, input_ids, scores):
        scores[:, 5] = -float("inf")
        return scores.clone()


def test_a_processor_writing_its_input_then_returning_a_copy_is_recorded(tiny_model):
    """Its output equals its (written) input, yet it changed the scores: it must not be taken
    for a processor that changed nothing and share the previous stage's row (found by review:
    the logits row unmasked was recorded for it, n_masked 0)."""
    inputs = make_inputs(batch=1, seq=5)
    _, trace = _traced(tiny_model, inputs, do_sample=False, max_new_tokens=3,
                       logits_processor=LogitsProcessorList([_WritesThenCopies()]))
    for step in trace.steps:
        raw, ban = step.stages[0], next(s for s in step.stages if s.name == "_WritesThenCopies")
        assert int(raw.n_masked[0]) == 0 and int(ban.n_masked[0]) == 1
        assert ban.kl[0] > 0 and 5 not in ban.top.ids[0][np.isfinite(ban.top.values[0])]


def test_recording_failure_never_changes_generation(tiny_model, monkeypatch):
    from tracer.recorder import StepRecorder

    calls = {"n": 0}
    original = StepRecorder._stage

    def flaky(self, processor, scores):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("recorder bug")
        return original(self, processor, scores)

    monkeypatch.setattr(StepRecorder, "_stage", flaky)
    inputs = make_inputs(batch=2, seq=5, left_pad=1)
    ref = _generate(tiny_model, inputs, seed=2, **SAMPLING)
    with pytest.warns(tracer.TracerWarning, match="recording stopped at step 0: RuntimeError: recorder bug"):
        out, trace = _traced(tiny_model, inputs, record=RecordConfig(attention=True), seed=2, **SAMPLING)
    assert torch.equal(ref, out)
    assert trace.meta.status == "error" and "recorder bug" in trace.meta.error
    assert trace.num_steps == 0
    assert tiny_model.config._attn_implementation == "sdpa"


def test_model_calls_inside_a_processor_are_not_the_step(tiny_model):
    """Classifier-free guidance calls the model from a logits processor: the step keeps its own data."""
    inputs = make_inputs(batch=1, seq=5)
    kw = dict(do_sample=False, max_new_tokens=5, min_new_tokens=5, guidance_scale=1.5)
    ref = _generate(tiny_model, inputs, **kw)
    out, trace = _traced(tiny_model, inputs, record=RecordConfig(modules=True, logit_lens=True, attention=True), **kw)
    assert torch.equal(ref, out)
    assert "UnbatchedClassifierFreeGuidanceLogitsProcessor" in [p.name for p in trace.steps[0].processors]
    assert trace.cache.seq_len[:, 0].tolist() == [5, 6, 7, 8, 9]
    assert [trace.attention(s, 0).shape[-1] for s in range(5)] == [5, 6, 7, 8, 9]
    for step in trace.steps:
        # the logit lens of the last layer is the step's own (conditional) logits
        assert step.logit_lens.chosen_rank[-1, 0] == step.stages[0].chosen_rank[0]



def test_model_calls_between_steps_are_not_the_next_step(tiny_model):
    """A streamer that calls the model in put() (after each step's stopping criteria, before the
    next step's forward): the steps keep generate's own inputs, cache and attention."""
    from transformers.generation.streamers import BaseStreamer

    class CallsTheModel(BaseStreamer):
        def put(self, value):
            with torch.no_grad():
                tiny_model(torch.tensor([[3, 4, 5, 6, 7, 8, 9]]))

        def end(self):
            self.put(None)  # after the last step

    inputs = make_inputs(batch=1, seq=5)
    kw = dict(do_sample=False, max_new_tokens=5, min_new_tokens=5)
    ref = _generate(tiny_model, inputs, **kw)
    out, trace = _traced(tiny_model, inputs, record=RecordConfig(modules=True, attention=True),
                         streamer=CallsTheModel(), **kw)
    assert torch.equal(ref, out)
    assert len(trace.steps) == 5
    for i, step in enumerate(trace.steps[1:], start=1):
        assert step.inputs.input_ids.tolist() == [[int(trace.steps[i - 1].chosen[0])]]
        assert step.inputs.cache_len_before == 5 + i - 1
    assert [trace.attention(s, 0).shape[-1] for s in range(5)] == [5, 6, 7, 8, 9]
    # one after each step's stopping criteria and one in end(); the prompt's put() comes before
    # generate has set up its processors and is not counted
    assert any(n.startswith("6 model call(s) between or after generate's steps") for n in trace.meta.notes)


def test_a_streamer_preparing_inputs_like_generate_is_not_the_next_step(tiny_model):
    """A streamer that prepares inputs with the model's own prepare_inputs_for_generation (the
    method generate calls before each of its forwards) and then calls the model: that call is not
    generate's, so it does not open the next step."""
    from transformers.generation.streamers import BaseStreamer

    class PreparesAndCalls(BaseStreamer):
        def put(self, value):
            with torch.no_grad():
                ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])
                tiny_model(**tiny_model.prepare_inputs_for_generation(ids, attention_mask=torch.ones_like(ids)))

        def end(self):
            pass

    inputs = make_inputs(batch=1, seq=5)
    kw = dict(do_sample=False, max_new_tokens=4, min_new_tokens=4)
    ref = _generate(tiny_model, inputs, **kw)
    out, trace = _traced(tiny_model, inputs, record=RecordConfig(attention=True), streamer=PreparesAndCalls(), **kw)
    assert torch.equal(ref, out)
    assert trace.steps[0].inputs.input_ids.tolist() == inputs["input_ids"].tolist()
    _steps_are_generates_own(trace, 5, 4)
    assert [trace.attention(s, 0).shape[-1] for s in range(4)] == [5, 6, 7, 8]
    assert any("model call(s) between or after generate's steps" in n for n in trace.meta.notes)


def _steps_are_generates_own(trace, prompt_len, n):
    assert len(trace.steps) == n
    for i, step in enumerate(trace.steps[1:], start=1):
        assert step.inputs.input_ids.tolist() == [[int(trace.steps[i - 1].chosen[0])]]
        assert step.inputs.cache_len_before == prompt_len + i - 1


def test_prepare_inputs_swapped_during_generate_still_records_every_step(tiny_model):
    """PEFT's generate swaps the model's prepare_inputs_for_generation for its own, which calls the
    original it kept from before tracing: tracer's marker is never called, and every step is still
    recorded (as without the marker)."""
    kept = tiny_model.prepare_inputs_for_generation
    inputs = make_inputs(batch=1, seq=5)
    kw = dict(do_sample=False, max_new_tokens=4, min_new_tokens=4)
    ref = _generate(tiny_model, inputs, **kw)

    def prepare(*args, **kwargs):
        return kept(*args, **kwargs)

    prepare.__wrapped__ = kept  # (generate reads its parameters)

    def generate_swapped(**kwargs):
        tiny_model.prepare_inputs_for_generation = prepare
        try:
            return _generate(tiny_model, inputs, **kwargs)
        finally:
            del tiny_model.__dict__["prepare_inputs_for_generation"]

    with tracer.trace(tiny_model) as t:
        out = generate_swapped(**kw)
    assert torch.equal(ref, out)
    _steps_are_generates_own(t.trace, 5, 4)
    assert not t.trace.meta.notes


def test_a_model_call_inside_prepare_inputs_is_not_the_step():
    from transformers import LlamaForCausalLM

    class Probing(LlamaForCausalLM):
        def prepare_inputs_for_generation(self, input_ids, **kwargs):
            with torch.no_grad():
                self(torch.tensor([[3, 4, 5]]))  # a side call before generate's inputs are made
            return super().prepare_inputs_for_generation(input_ids, **kwargs)

    base = make_tiny_llama()
    model = Probing(base.config).eval()
    model.load_state_dict(base.state_dict())
    inputs = make_inputs(batch=1, seq=5)
    kw = dict(do_sample=False, max_new_tokens=4, min_new_tokens=4)
    ref = _generate(model, inputs, **kw)
    out, trace = _traced(model, inputs, record=RecordConfig(attention=True), **kw)
    assert torch.equal(ref, out)
    assert trace.steps[0].inputs.input_ids.tolist() == inputs["input_ids"].tolist()
    _steps_are_generates_own(trace, 5, 4)
    assert [trace.attention(s, 0).shape[-1] for s in range(4)] == [5, 6, 7, 8]


def test_a_model_call_that_raises_between_steps_leaves_the_next_step_whole(tiny_model):
    """A call whose forward raises (caught by its caller) gets no forward end: it must not swallow
    the next step's own (whose cache reading and key/value snapshot would be lost)."""
    from transformers.generation.streamers import BaseStreamer

    class Flaky(BaseStreamer):
        def put(self, value):
            try:
                with torch.no_grad():
                    tiny_model(torch.tensor([[10_000]]))  # out of the vocabulary: the embedding raises
            except IndexError:
                pass

        def end(self):
            pass

    inputs = make_inputs(batch=1, seq=5)
    kw = dict(do_sample=False, max_new_tokens=4, min_new_tokens=4)
    ref = _generate(tiny_model, inputs, **kw)
    out, trace = _traced(tiny_model, inputs, record=RecordConfig(kv_layers="all"), streamer=Flaky(), **kw)
    assert torch.equal(ref, out)
    _steps_are_generates_own(trace, 5, 4)
    assert trace.cache.seq_len[:, 0].tolist() == [5, 6, 7, 8]
    assert [trace.kv_snapshot(s, 0)[0].shape[-2] for s in range(4)] == [5, 6, 7, 8]

def test_trace_generate_leaves_the_tokenizer_alone(llama3_tokenizer, tiny_model):
    tok = llama3_tokenizer
    pad, side = tok.pad_token, tok.padding_side
    from tracer.hooks import encode_prompts

    _, enc = encode_prompts(tok, ["a", "a longer prompt"], chat=False)
    assert enc["attention_mask"][0, 0] == 0  # left padded
    assert (tok.pad_token, tok.padding_side) == (pad, side)


def test_hidden_layers_alone_hook_only_those_layers():
    model = make_tiny_llama()
    before = [len(layer._forward_hooks) for layer in model.model.layers]
    with tracer.trace(model, record=RecordConfig(hidden_layers=[1])) as t:
        assert [len(layer._forward_hooks) for layer in model.model.layers] == [before[0], before[1] + 1]
        _generate(model, make_inputs(seq=4), do_sample=False, max_new_tokens=3)
    assert t.trace.hidden(2, 1).shape == (1, 64)
    with pytest.raises(KeyError):
        t.trace.hidden(2, 0)


class _BansTopThroughData(LogitsProcessor):
    """Bans the best token by writing through ``.data`` (the version counter does not move) and
    returns the very tensor it was given."""

    def __call__(self, input_ids, scores):
        scores.data[torch.arange(scores.shape[0]), scores.argmax(-1)] = -float("inf")
        return scores


def test_a_write_the_version_counter_misses_is_still_recorded_on_a_cpu(tiny_model):
    """The same tensor back with its version counter unmoved is not proof of a no-op: on a CPU
    the stage is compared with the previous row as recorded (found by an attack: the banned token
    was recorded as the stage's best, n_masked 0, KL 0, the chosen token's rank 1)."""
    inputs = make_inputs(batch=1, seq=5)
    out, trace = _traced(tiny_model, inputs, do_sample=False, max_new_tokens=3,
                         logits_processor=LogitsProcessorList([_BansTopThroughData()]))
    for step in trace.steps:
        raw, ban = step.stages[0], step.stages[-1]
        assert ban.name == "_BansTopThroughData"
        assert int(raw.n_masked[0]) == 0 and int(ban.n_masked[0]) == 1 and ban.kl[0] > 0
        assert int(ban.top.ids[0][0]) == int(raw.top.ids[0][1]) == int(step.chosen[0])
        assert int(ban.chosen_rank[0]) == 0


class _Counts(StoppingCriteria):
    """Returns an integer tensor: 2 at the second step (truthy, yet ``1 & ~2`` keeps generating),
    3 at the fourth (odd: stops)."""

    eos_token_id = None  # an attribute of that name, not an end-of-sequence check

    def __init__(self):
        self.calls = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        return torch.full((input_ids.shape[0],), {2: 2, 4: 3}.get(self.calls, 0))


def test_a_criterion_returning_integers_is_read_as_generate_reads_it(tiny_model):
    """generate keeps a sequence while ``unfinished & ~is_done`` is 1: an even integer does not
    stop it, an odd one does (found by an attack: a 2 was recorded as a stop at step 1, with the
    generated ids cut there); and a criterion is an end-of-sequence stop only if it holds the
    chosen token, not because it has an ``eos_token_id`` attribute."""
    inputs = make_inputs(batch=1, seq=5)
    plain = _generate(tiny_model, inputs, max_new_tokens=6, min_new_tokens=0,
                      stopping_criteria=StoppingCriteriaList([_Counts()]))
    out, trace = _traced(tiny_model, inputs, max_new_tokens=6, min_new_tokens=0,
                         stopping_criteria=StoppingCriteriaList([_Counts()]))
    assert torch.equal(out, plain) and out.shape[1] == 5 + 4  # stopped at the fourth step
    assert [bool(s.finished[0]) for s in trace.steps] == [False, False, False, True]
    assert [bool(s.active[0]) for s in trace.steps] == [True] * 4
    assert trace.generated_ids(0).tolist() == out[0, 5:].tolist()
    assert trace.stop_reasons[0].kind == "criteria" and trace.stop_reasons[0].text == "_Counts"


def test_newly_masked_counts_what_a_processor_masked_not_the_net_change(tiny_model, tmp_path):
    """A processor that unmasks 3 tokens and masks 5 others masked 5 (the net change is 2)."""
    from tracer.analysis.processors import stage_records
    from tracer.storage import load_trace, save_trace

    class Ban(LogitsProcessor):
        def __call__(self, input_ids, scores):
            out = scores.clone()
            out[:, 10:20] = -float("inf")
            return out

    class Swap(LogitsProcessor):
        def __call__(self, input_ids, scores):
            out = scores.clone()
            out[:, 10:13] = 0.0
            out[:, 30:35] = -float("inf")
            return out

    inputs = make_inputs(batch=2, seq=5)
    procs = LogitsProcessorList([Ban(), Swap()])
    kw = dict(do_sample=False, max_new_tokens=4, min_new_tokens=4, logits_processor=procs)
    ref = _generate(tiny_model, inputs, **kw)
    out, trace = _traced(tiny_model, inputs, **kw)
    assert torch.equal(ref, out)
    for step in trace.steps:
        ban, swap = step.processors[-2:]
        assert ban.name == "Ban" and swap.name == "Swap"
        assert ban.newly_masked.tolist() == [10, 10]
        assert swap.newly_masked.tolist() == [5, 5]
        # (MinNewTokensLength masked the end token first: n_masked 11 after Ban, 13 after Swap, net 2)
        assert step.stages[-2].n_masked.tolist() == [11, 11] and step.stages[-1].n_masked.tolist() == [13, 13]
    loaded = load_trace(save_trace(trace, tmp_path / "t.trace"))
    assert loaded.steps[2].processors[-1].newly_masked.tolist() == [5, 5]
    # the reprocessing arithmetic counts the same way
    logits = torch.zeros(2, 256)
    rows = [("logits", {}, logits), ("Ban", {}, Ban()(None, logits)), ("Swap", {}, Swap()(None, Ban()(None, logits)))]
    stages = stage_records(rows, torch.tensor([40, 41]), top_k=5)
    assert [s.newly_masked.tolist() for s in stages] == [[0, 0], [10, 10], [5, 5]]


def test_newly_neginf_cpu_shortcut_counts_as_the_full_comparison():
    from tracer.stage_stats import count_neginf, newly_neginf

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 50, generator=gen)
    for r, b, lo, hi in [(1, 0, 0, 9), (2, 0, 5, 20), (2, 1, 0, 3), (4, 2, 10, 11), (5, 2, 0, 50), (6, 1, 1, 2)]:
        x[r, b, lo:hi] = -float("inf")
    got = newly_neginf(x, count_neginf(x))
    want = count_neginf(x).clone()
    want[1:] = (torch.isneginf(x[1:]) & ~torch.isneginf(x[:-1])).sum(-1)
    assert torch.equal(got[1:], want[1:]) and torch.equal(got[0], count_neginf(x)[0])
