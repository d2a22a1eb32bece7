"""vLLM as a corpus engine: the dataset it writes, resume, the engine check, and the corpus
compare of ``generate`` (batch 1, fp32, greedy) against vLLM on the same prompt tokens."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytest.importorskip("pyarrow")

import tracer  # noqa: E402
from tracer.corpus import compare_datasets, open_dataset  # noqa: E402
from tracer.corpus.data import CorpusError  # noqa: E402
from tracer.corpus.vllm_engine import trace_corpus_vllm  # noqa: E402

TOKENS = 16


def test_vllm_corpus_matches_generate(llm, questions, tmp_path):
    from vllm import SamplingParams

    from tracer.models import terminators

    prompts = [(f"q{i}", q) for i, q in enumerate(questions)]
    sp = SamplingParams(max_tokens=TOKENS, temperature=0.0, stop_token_ids=terminators(llm.get_tokenizer()))
    ds = trace_corpus_vllm(llm, prompts, sp, dataset=tmp_path / "vllm", batch_size=2, chat=True)
    assert ds.meta["engine"] == "vllm" and len(ds.parts) == 2
    seqs = ds.sequences.set_index("prompt_id")
    assert sorted(seqs.index) == ["q0", "q1", "q2"]
    assert len(ds.steps) == int(seqs.num_tokens.sum())
    assert (ds.steps["rank"] >= 0).all() and ds.steps.topk_ids.map(len).eq(10).all()
    # resume: nothing regenerated
    again = trace_corpus_vllm(llm, prompts, sp, dataset=tmp_path / "vllm", batch_size=2, chat=True)
    assert len(again.parts) == 2
    # the same prompts through generate (batch 1: no padding) into a second dataset
    from tracer.models import load_model

    model, tok = load_model(dtype="float32")
    hf = tracer.trace_corpus(model, tok, prompts, dataset=tmp_path / "hf", batch_size=1, chat=True,
                             max_new_tokens=TOKENS)
    a, b = hf.sequences.set_index("prompt_id"), seqs
    assert list(a.prompt_tokens.sort_index()) == list(b.prompt_tokens.sort_index())  # the same prompt tokens
    cmp = compare_datasets(hf, ds)
    assert cmp.summary["prompts"] == 3
    assert cmp.summary["max_abs_dlogprob"] < 1e-2, cmp.summary  # fp32 on both sides
    assert cmp.summary["identical_fraction"] >= 2 / 3, cmp.text()
    # a transformers run into the vLLM dataset is refused (mixed engines)
    with pytest.raises(CorpusError, match="different engine"):
        tracer.trace_corpus(model, tok, prompts, dataset=tmp_path / "vllm", chat=True, max_new_tokens=TOKENS)
    assert len(open_dataset(tmp_path / "vllm")) == 3
