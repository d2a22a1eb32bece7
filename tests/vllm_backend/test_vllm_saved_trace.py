"""A saved vLLM trace (tests/data/vllm_embedded.trace, made by tests/vllm_backend/make_fixture.py) loads,
renders and inspects without vLLM: these tests run in the main environment too."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tracer import load_trace
from tracer.backends.vllm import backend_info, prompt_logprobs

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "vllm_embedded.trace"


@pytest.fixture(scope="module")
def trace():
    return load_trace(FIXTURE, verify_blobs=True)


def test_fixture_is_a_greedy_vllm_trace_of_the_embedded_model(trace):
    info = backend_info(trace)
    assert info["engine"] == "vllm" and info["version"] == "0.32.0" and info["logprobs_mode"] == "raw_logprobs"
    assert getattr(trace.meta, "backend", "vllm") == "vllm"
    assert trace.meta.model_class == "LlamaForCausalLM" and trace.meta.vocab_size == 49152
    assert "Paris" in trace.generated_text[0]
    assert str(trace.stop_reasons[0]) == "eos:<|im_end|>"
    assert trace.generated_ids(0)[-1] == 2 and trace.token_text[2] == "<|im_end|>"
    for step in trace.steps:  # greedy: the chosen token is the raw distribution's best
        st = step.stages[0]
        assert st.name == "raw_logprobs" and int(st.chosen_rank[0]) == 0 and int(st.top.ids[0, 0]) == int(step.chosen[0])
        assert float(st.chosen_logprob[0]) == pytest.approx(float(st.top.values[0, 0]))
        assert 0.0 < float(st.top.probs[0].sum()) <= 1.0 + 1e-6  # exact probabilities of a full softmax
    # the chosen log-probs add up to vLLM's own cumulative log-prob
    total = sum(float(s.stages[0].chosen_logprob[0]) for s in trace.steps)
    assert total == pytest.approx(info["cumulative_logprob"], abs=1e-3)
    lp = prompt_logprobs(trace)
    assert lp["logprobs"].shape == (trace.prompt_len,) and math.isnan(lp["logprobs"][0])
    assert np.all(lp["logprobs"][1:] <= 0)


def test_fixture_renders_escaped_html_and_inspects(trace):
    html = trace.to_html()
    assert "not recorded by the vLLM backend" in html and "raw_logprobs" in html
    assert "<b>&</b>" not in html and "&lt;b&gt;&amp;&lt;/b&gt;" in html  # the prompt's markup is escaped
    from tracer.export import inspect_trace

    text = inspect_trace(FIXTURE)
    assert "eos:<|im_end|>" in text and "SmolLM2-135M-Instruct" in text


def test_fixture_views_step_text_and_token_strip(trace):
    from tracer import viz

    text = viz.step_text(trace, 0)
    assert "raw_logprobs" in text and "Paris" not in text.split("text:")[0]
    last = viz.step_text(trace, trace.num_steps - 1)
    assert "stop: eos:<|im_end|>" in last
    strip = viz.token_strip_html(trace)
    assert "Paris" in strip


def test_fixture_widgets_build(trace):
    pytest.importorskip("ipywidgets")
    from tracer import viz

    assert viz.step_explorer(trace) is not None
    tab = viz.show(trace)  # steps and tokens, and a "not recorded by this backend" note for the rest
    titles = [tab.get_title(i) for i in range(len(tab.children))]
    assert titles == ["steps", "tokens", "attention", "cache"]
    for note in tab.children[2:]:
        assert "not recorded by this backend" in note.value
