"""Ray sharding of a corpus (tracer.corpus.ray_engine): a local cluster with 2 model replicas
writes the same dataset as the single-process run (greedy: identical token ids and log-probs).

One local cluster for the module (2 CPUs, actors at 0.5 CPU each), shut down after."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pyarrow")
ray = pytest.importorskip("ray")

from tracer.corpus import open_dataset  # noqa: E402
from tracer.corpus.engine import trace_corpus  # noqa: E402
from tracer.corpus.ray_engine import trace_corpus_ray  # noqa: E402

PROMPTS = [("en-1", "What is the capital of France?"), ("zh-1", "用一句话介绍长城。"),
           ("en-2", "List three prime numbers."), ("zh-2", "你好！你是谁？"), ("en-3", "Write a haiku about rain.")]


@pytest.fixture(scope="module")
def local_cluster():
    from tracer.corpus.ray_engine import _local_env

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": _local_env()})
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_two_workers_equal_single_process(embedded, tmp_path, local_cluster):
    model, tok = embedded
    # Ray gives each 0.5-CPU actor OMP_NUM_THREADS=1; a CPU matmul's float sums depend on the thread
    # count, so the single-process reference runs with one thread too (same work, same bits).
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = trace_corpus(model, tok, PROMPTS, dataset=tmp_path / "one", batch_size=2, max_new_tokens=8)
    finally:
        torch.set_num_threads(before)
    seen = []
    sharded = trace_corpus_ray(PROMPTS, dataset=tmp_path / "ray", workers=2, batch_size=2, max_new_tokens=8,
                               on_batch=lambda n, _: seen.append(n))
    assert sorted(seen) == [1, 2, 2] and len(sharded.parts) == 3
    assert sharded.meta["runs"][0]["ray"]["workers"] == 2
    for key in ("engine", "model", "dtype", "settings", "schema"):
        assert sharded.meta[key] == single.meta[key], key
    a = single.sequences.set_index("prompt_id").sort_index()
    b = sharded.sequences.set_index("prompt_id").sort_index()
    assert list(a.index) == list(b.index) == sorted(p for p, _ in PROMPTS)
    assert [list(x) for x in a.token_ids] == [list(x) for x in b.token_ids]
    assert list(a.generated_text) == list(b.generated_text)
    sa = single.steps.sort_values(["prompt_id", "step"]).reset_index(drop=True)
    sb = sharded.steps.sort_values(["prompt_id", "step"]).reset_index(drop=True)
    assert sa.token_id.tolist() == sb.token_id.tolist()
    np.testing.assert_array_equal(sa.logprob.to_numpy(), sb.logprob.to_numpy())
    np.testing.assert_array_equal(np.stack(sa.topk_logprobs), np.stack(sb.topk_logprobs))
    # resume through Ray: everything present, nothing regenerated
    again = trace_corpus_ray(PROMPTS, dataset=tmp_path / "ray", workers=2, batch_size=2, max_new_tokens=8)
    assert len(again.parts) == 3
