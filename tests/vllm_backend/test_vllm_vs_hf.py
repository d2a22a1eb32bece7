"""HF ``generate`` vs vLLM on the embedded model (fp32, greedy): the same tokens, log-probs close.

Computed straight from the two traces (numpy): first divergence, max |Δ log-prob| on the shared
tokens, and at a divergence whether each side's token is in the other's top-k (vLLM's own
``check_logprobs_close`` rule).  Figures measured here are in docs/notes/vllm.md.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402

import tracer  # noqa: E402
from tracer import RecordConfig  # noqa: E402

K = 10
TOKENS = 32


def greedy_agreement(hf: tracer.Trace, vl: tracer.Trace) -> dict:
    a, b = hf.generated_ids(0), vl.generated_ids(0)
    n = min(len(a), len(b))
    first = next((i for i in range(n) if a[i] != b[i]), None)
    shared = n if first is None else first
    lp_hf = np.array([hf.steps[i].stages[0].chosen_logprob[0] for i in range(shared)], np.float64)
    lp_vl = np.array([vl.steps[i].stages[0].chosen_logprob[0] for i in range(shared)], np.float64)
    out = {"first_divergence": first, "shared": shared, "hf_len": len(a), "vllm_len": len(b),
           "max_abs_dlogprob": float(np.max(np.abs(lp_hf - lp_vl))) if shared else 0.0}
    if first is not None:
        out["hf_token_in_vllm_topk"] = int(a[first]) in vl.steps[first].stages[0].top.ids[0].tolist()
        out["vllm_token_in_hf_topk"] = int(b[first]) in hf.steps[first].stages[0].top.ids[0].tolist()
    return out


@pytest.fixture(scope="module")
def hf_model():
    from tracer.models import load_model

    model, tok = load_model(dtype="float32")
    return model, tok


def test_hf_and_vllm_agree_greedily_on_the_embedded_model(llm, hf_model, questions):
    model, tok = hf_model
    report = []
    for q in questions:
        hf = tracer.trace_generate(model, tok, q, chat=True, record=RecordConfig(top_k=K),
                                   do_sample=False, max_new_tokens=TOKENS)
        ids = hf.prompt_tokens(0).tolist()
        (vl,) = tracer.vllm_generate(llm, {"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=TOKENS),
                                     record=RecordConfig(top_k=K))
        assert vl.prompt_ids[0].tolist() == ids
        assert hf.steps[0].stages[0].name == "logits"  # HF stage 0: the raw distribution, like raw_logprobs
        report.append(greedy_agreement(hf, vl))
    print("HF vs vLLM:", report)
    for r in report:
        if r["first_divergence"] is not None:  # vLLM's rule: a divergence must be a near-tie
            assert r["hf_token_in_vllm_topk"] and r["vllm_token_in_hf_topk"], r
        assert r["max_abs_dlogprob"] < 1e-2, r
    assert sum(r["shared"] for r in report) >= 3 * 8  # most tokens are compared, not just the first few
