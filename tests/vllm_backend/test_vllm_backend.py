"""The vLLM backend on the embedded model (runs in .venv-vllm; skipped where vLLM is missing)."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402

import tracer  # noqa: E402
from tracer import RecordConfig, load_trace  # noqa: E402
from tracer.backends.vllm import backend_info, prompt_logprobs  # noqa: E402
from tracer.records import NotSupportedError  # noqa: E402

K = 5


def _check_against_outputs(traces, outputs, k=K):
    """Every trace's chosen tokens / log-probs / ranks / top-k are vLLM's own."""
    flat = [(o, c) for o in outputs for c in o.outputs]
    assert len(traces) == len(flat)
    for trace, (out, comp) in zip(traces, flat):
        assert trace.batch_size == 1
        assert trace.prompt_ids[0].tolist() == list(out.prompt_token_ids)
        assert trace.generated_ids(0).tolist() == list(comp.token_ids)
        assert trace.sequences[0].tolist() == list(out.prompt_token_ids) + list(comp.token_ids)
        assert trace.generated_text == [comp.text]
        for step, tok, row in zip(trace.steps, comp.token_ids, comp.logprobs):
            stage = step.stages[0]
            assert stage.name == "raw_logprobs"
            assert float(stage.chosen_logprob[0]) == pytest.approx(row[tok].logprob, abs=0, rel=1e-6)
            assert int(stage.chosen_rank[0]) == row[tok].rank - 1
            best = sorted((lp.rank, tid) for tid, lp in row.items() if lp.rank <= k)
            assert stage.top.ids[0].tolist() == [tid for _, tid in best]
            np.testing.assert_allclose(stage.top.probs[0], [math.exp(row[t].logprob) for _, t in best], rtol=1e-5)
        # the chosen log-probs add up to vLLM's own cumulative log-prob
        total = sum(float(s.stages[0].chosen_logprob[0]) for s in trace.steps)
        assert total == pytest.approx(comp.cumulative_logprob, abs=1e-3)


def test_greedy_trace_is_vllms_output_and_changes_nothing(llm, chat_prompts):
    sp = SamplingParams(temperature=0.0, max_tokens=24)
    plain = llm.generate(chat_prompts, sp, use_tqdm=False)
    traces, outputs = tracer.vllm_generate(llm, chat_prompts, sp, record=RecordConfig(top_k=K), return_outputs=True)
    _check_against_outputs(traces, outputs)
    assert [list(o.outputs[0].token_ids) for o in plain] == [t.generated_ids(0).tolist() for t in traces]
    assert [o.outputs[0].text for o in plain] == [t.generated_text[0] for t in traces]
    t = traces[0]
    assert not t.steps[0].sampled
    assert t.meta.generation_config["temperature"] == 0.0
    info = backend_info(t)
    assert info["engine"] == "vllm" and info["logprobs_mode"] == "raw_logprobs" and info["exact_probs"]
    assert info["version"] == __import__("vllm").__version__
    assert getattr(t.meta, "backend", "vllm") == "vllm"
    assert t.meta.model_class == "LlamaForCausalLM" and t.meta.num_layers == 30 and t.meta.vocab_size == 49152
    assert any("not recorded by the vLLM backend" in n for n in t.meta.notes)
    # timing comes from vLLM's request stats (the fixture builds the LLM with disable_log_stats=False)
    assert t.steps[0].time_s > 0 and all(s.time_s >= 0 for s in t.steps)


def test_seeded_sampling_n2_traced_equals_untraced(llm, chat_prompts):
    sp = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=1234, max_tokens=20, n=2)
    plain = llm.generate(chat_prompts[:2], sp, use_tqdm=False)
    traces, outputs = tracer.vllm_generate(llm, chat_prompts[:2], sp, record=RecordConfig(top_k=K), return_outputs=True)
    assert len(traces) == 4
    _check_against_outputs(traces, outputs)
    assert [list(c.token_ids) for o in plain for c in o.outputs] == [t.generated_ids(0).tolist() for t in traces]
    assert all(s.sampled for s in traces[0].steps)
    assert [backend_info(t)["sample_index"] for t in traces] == [0, 1, 0, 1]
    # raw_logprobs: the recorded distribution is the model's, before top-k/top-p: ranks can exceed top_k=40
    assert traces[0].meta.generation_config["top_k"] == 40


def test_stop_reasons(llm, chat_prompts):
    tok = llm.get_tokenizer()
    paris = tok.encode(" Paris", add_special_tokens=False)
    assert len(paris) == 1
    cases = [
        (SamplingParams(temperature=0, max_tokens=64), "eos:<|im_end|>"),
        (SamplingParams(temperature=0, max_tokens=64, stop=["capital of"]), "stop_string:capital of"),
        (SamplingParams(temperature=0, max_tokens=64, stop_token_ids=paris), "stop_token: Paris"),
        (SamplingParams(temperature=0, max_tokens=3), "max_length"),
    ]
    for sp, expected in cases:
        (trace,) = tracer.vllm_generate(llm, chat_prompts[0], sp, record=RecordConfig(top_k=K))
        assert str(trace.stop_reasons[0]) == expected, (sp, trace.generated_text)
        assert trace.steps[-1].finished[0] and not any(s.finished[0] for s in trace.steps[:-1])
    # the eos case ends on the terminator, and the text leaves it (and stop strings) out
    (trace,) = tracer.vllm_generate(llm, chat_prompts[0], cases[0][0], record=RecordConfig(top_k=K))
    assert trace.generated_ids(0)[-1] == tok.eos_token_id
    assert trace.meta.terminators == {tok.eos_token_id: "<|im_end|>"}
    (trace,) = tracer.vllm_generate(llm, chat_prompts[0], cases[1][0], record=RecordConfig(top_k=K))
    assert "capital of" not in trace.generated_text[0]
    (trace,) = tracer.vllm_generate(llm, chat_prompts[0], cases[3][0], record=RecordConfig(top_k=K))
    assert trace.num_new_tokens == [3]


def test_prompt_logprobs_and_prefix_cache(llm, chat_prompts):
    sp = SamplingParams(temperature=0, max_tokens=4)
    tok = llm.get_tokenizer()
    story = "The sea is wide and the waves are blue. " * 60  # > 256 tokens: vLLM caches whole blocks
    long_prompt = tok.apply_chat_template([{"role": "user", "content": story + "Summarize."}], tokenize=False,
                                          add_generation_prompt=True)
    (trace,), (out,) = tracer.vllm_generate(llm, long_prompt, sp, prompt_logprobs=3, return_outputs=True)
    got = prompt_logprobs(trace)
    ids = list(out.prompt_token_ids)
    assert out.prompt_logprobs[0] is None and math.isnan(got["logprobs"][0])
    for p in range(1, len(ids)):
        assert got["logprobs"][p] == pytest.approx(out.prompt_logprobs[p][ids[p]].logprob, rel=1e-6)
        best = sorted((lp.rank, t) for t, lp in out.prompt_logprobs[p].items() if lp.rank <= 3)
        assert got["top_ids"][p].tolist() == [t for _, t in best]
    # prefix caching: the cached prompt tokens are what step 0 did not compute
    cached = backend_info(trace)["num_cached_tokens"]
    assert cached == out.num_cached_tokens
    step0 = trace.steps[0].inputs
    assert step0.cache_len_before == cached
    assert step0.input_ids.shape[1] == len(ids) - cached
    (again,) = tracer.vllm_generate(llm, long_prompt, sp)  # no prompt log-probs: no blobs
    assert backend_info(again)["num_cached_tokens"] > 0  # the second run hits the cache
    with pytest.raises(KeyError):
        prompt_logprobs(again)


def test_save_load_round_trip_and_views(llm, chat_prompts, tmp_path):
    sp = SamplingParams(temperature=0, max_tokens=12)
    (trace,) = tracer.vllm_generate(llm, chat_prompts[2], sp, record=RecordConfig(top_k=K), prompt_logprobs=2)
    back = load_trace(trace.save(tmp_path / "t.trace"))
    assert back.generated_ids(0).tolist() == trace.generated_ids(0).tolist()
    assert [str(r) for r in back.stop_reasons] == [str(r) for r in trace.stop_reasons]
    assert back.generated_text == trace.generated_text
    assert backend_info(back) == backend_info(trace)
    assert back.meta.notes == trace.meta.notes
    for a, b in zip(trace.steps, back.steps):
        assert a.stages[0].name == b.stages[0].name
        np.testing.assert_array_equal(a.stages[0].top.ids, b.stages[0].top.ids)
        np.testing.assert_array_equal(a.stages[0].top.values, b.stages[0].top.values)
        np.testing.assert_array_equal(a.stages[0].chosen_logprob, b.stages[0].chosen_logprob)
        np.testing.assert_array_equal(a.inputs.input_ids, b.inputs.input_ids)
    np.testing.assert_array_equal(prompt_logprobs(back)["logprobs"], prompt_logprobs(trace)["logprobs"])
    html = back.to_html()
    assert "not recorded by the vLLM backend" in html and "raw_logprobs" in html
    from tracer.export import inspect_trace

    text = inspect_trace(tmp_path / "t.trace")
    assert "eos:<|im_end|>" in text or "max_length" in text


def test_unsupported_record_options_raise_before_generating(llm):
    for cfg in (RecordConfig(attention=True), RecordConfig(modules=True), RecordConfig(logit_lens=True),
                RecordConfig(full_logits=True), RecordConfig(hidden_layers=[1])):
        with pytest.raises(NotSupportedError, match="vLLM backend cannot record"):
            tracer.vllm_generate(llm, "Hi", SamplingParams(max_tokens=2), record=cfg)
    with pytest.raises(NotSupportedError, match="max_logprobs"):
        tracer.vllm_generate(llm, "Hi", SamplingParams(max_tokens=2), record=RecordConfig(top_k=50))
