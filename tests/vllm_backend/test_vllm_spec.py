"""vLLM's n-gram speculative decoding on CPU: the tokens are the engine's own, and each trace
carries the engine's draft/acceptance counts for the call (vLLM exposes no per-step drafts)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import tracer  # noqa: E402

PROMPT = ("Repeat exactly: the quick brown fox jumps over the lazy dog. "
          "the quick brown fox jumps over the lazy dog. the quick")
K = 4


@pytest.fixture(scope="module")
def spec_llm():
    from vllm import LLM

    from tracer.models import embedded_model_path

    engine = LLM(model=str(embedded_model_path()), dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
                 disable_log_stats=False,
                 speculative_config={"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 4,
                                     "prompt_lookup_min": 2})
    yield engine
    core = getattr(engine.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def test_ngram_speculative_counts(spec_llm, llm, tmp_path):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=24)
    plain = list(spec_llm.generate([PROMPT], sp, use_tqdm=False)[0].outputs[0].token_ids)
    (trace,) = tracer.vllm_generate(spec_llm, [PROMPT], sp)
    assert trace.generated_ids(0).tolist() == plain
    # speculative greedy decoding yields the target model's own greedy tokens (no speculation)
    assert plain == list(llm.generate([PROMPT], sp, use_tqdm=False)[0].outputs[0].token_ids)
    spec = trace.meta.backend_info["speculative"]
    assert spec["method"] == "ngram" and spec["num_speculative_tokens"] == K
    assert spec["drafts"] > 0 and spec["draft_tokens"] == spec["drafts"] * K
    assert 0 < spec["accepted_tokens"] <= spec["draft_tokens"]
    assert sum(spec["accepted_per_position"]) == spec["accepted_tokens"] and len(spec["accepted_per_position"]) == K
    assert spec["accepted_per_position"] == sorted(spec["accepted_per_position"], reverse=True)  # a prefix is kept
    assert spec["acceptance_rate"] == spec["accepted_tokens"] / spec["draft_tokens"]
    assert any("speculative decoding (ngram)" in note for note in trace.meta.notes)
    loaded = tracer.load_trace(tracer.save_trace(trace, tmp_path / "spec"))
    assert loaded.meta.backend_info["speculative"] == spec


def test_no_speculation_no_counts(llm):
    from vllm import SamplingParams

    (trace,) = tracer.vllm_generate(llm, [PROMPT], SamplingParams(temperature=0, max_tokens=4))
    assert "speculative" not in trace.meta.backend_info
