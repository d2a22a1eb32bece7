"""The corpus through vLLM (tracer.corpus.vllm_engine): vLLM traces become the same tables;
the traced corpus run generates what the untraced engine generates."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytest.importorskip("pyarrow")

from tracer.corpus import open_dataset  # noqa: E402
from tracer.corpus.rows import table_schemas  # noqa: E402
from tracer.corpus.vllm_engine import trace_corpus_vllm  # noqa: E402

PROMPTS = [("en", "What is the capital of France?"), ("zh", "用一句话介绍长城。"), ("en2", "Name three colors.")]


def test_vllm_corpus_tables_equal_untraced(llm, tmp_path):
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=8, temperature=0.0, seed=0)
    ds = trace_corpus_vllm(llm, PROMPTS, sp, dataset=tmp_path / "v", batch_size=2, chat=True)
    assert ds.meta["engine"] == "vllm" and ds.meta["schema"] == "vllm-1" and len(ds.parts) == 2
    tok = llm.get_tokenizer()
    from tracer.corpus.data import as_items
    from tracer.corpus.vllm_engine import token_prompts

    plain = llm.generate(token_prompts(tok, as_items(PROMPTS), True, None), sp, use_tqdm=False)
    seqs = ds.sequences.set_index("prompt_id")
    for (pid, _), out in zip(PROMPTS, plain):
        assert list(seqs.token_ids[pid]) == list(out.outputs[0].token_ids)
    steps = ds.steps
    assert ds.arrow("steps").schema.equals(table_schemas()[0])
    assert len(steps) == int(seqs.num_tokens.sum())
    assert (steps.logprob <= 0).all() and steps.topk_ids.map(len).min() > 1
    zh = steps[steps.prompt_id == "zh"].sort_values("step")
    assert "".join(zh.decoded) == tok.decode(list(seqs.token_ids["zh"]), skip_special_tokens=True) or \
        "".join(zh.decoded).startswith(tok.decode(list(seqs.token_ids["zh"])[:-1], skip_special_tokens=True))
    assert open_dataset(tmp_path / "v").duckdb().execute("select count(*) from steps").fetchone()[0] == len(steps)
