"""What corpus tracing costs: prompts through batched ``generate`` traced into a dataset vs
untraced, dataset bytes per generated token, a DuckDB aggregate over 1 million synthesized step
rows, and (``--ray``) a local Ray cluster with 2 replicas vs one process.

    python benchmarks/corpus.py [--prompts 64] [--tokens 32] [--batch-size 16] [--rounds 3] [--ray]
                                [--out benchmarks/results]

Generation: the same batches, greedy, ``min_new_tokens == max_new_tokens`` so every run does the
same work; untraced ``generate`` and ``tracer.trace_corpus`` (into a fresh dataset folder, Parquet
writes included) are timed interleaved round by round after one warm-up, and the ratio is the
median of the per-round ratios.  The traced tokens are asserted equal to the untraced ones.
The vLLM figure (traced into a dataset vs untraced) is measured by ``--vllm`` in ``.venv-vllm``.
Writes ``<out>/corpus.md`` and prints it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

QUESTIONS = ["What is the capital of France?", "用一句话介绍长城。", "Write a haiku about rain.",
             "List three prime numbers.", "你好！你是谁？", "Why is the sky blue?", "三加五等于几？",
             "Name a famous painter."]


def prompts(n: int) -> list[tuple[str, str]]:
    return [(f"p{i:05d}", f"{QUESTIONS[i % len(QUESTIONS)]} ({i})") for i in range(n)]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.parquet"))


def bench_generate(model: Any, tok: Any, items: list, tokens: int, batch_size: int, rounds: int) -> dict:
    import torch

    import tracer
    from tracer.corpus.engine import chunks, prepare_batch

    gen = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    batches = list(chunks([p for _, p in items], batch_size))

    def untraced() -> list[list[int]]:
        out = []
        for b in batches:
            _, inputs, kwargs = prepare_batch(model, tok, b, chat=True, system=None, **gen)
            with torch.inference_mode():
                seq = model.generate(**inputs, **kwargs)
            out += seq[:, inputs["input_ids"].shape[1]:].tolist()
        return out

    tmp = Path(tempfile.mkdtemp(prefix="tracer-corpus-bench-"))
    try:
        def traced(n: int):
            d = tmp / f"ds{n}"
            return tracer.trace_corpus(model, tok, items, dataset=d, batch_size=batch_size, chat=True, **gen), d

        ref = untraced()  # warm-up
        ds, d = traced(-1)
        got = [list(x) for x in ds.sequences.sort_values("prompt_id").token_ids]
        assert got == ref, "traced tokens differ from untraced"
        plain_t, traced_t, ratios = [], [], []
        for r in range(rounds):
            t0 = time.perf_counter(); untraced(); t1 = time.perf_counter()
            traced(r); t2 = time.perf_counter()
            plain_t.append(t1 - t0); traced_t.append(t2 - t1); ratios.append((t2 - t1) / (t1 - t0))
        ntok = len(items) * tokens
        return {"prompts": len(items), "tokens": tokens, "batch_size": batch_size, "rounds": rounds,
                "untraced_s": statistics.median(plain_t), "traced_s": statistics.median(traced_t),
                "ratio": statistics.median(ratios), "ratios": ratios,
                "bytes_per_token": dir_bytes(d) / ntok, "dataset_bytes": dir_bytes(d),
                "steps_bytes_per_token": dir_bytes(d / "steps") / ntok}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_duckdb(rows: int = 1_000_000, repeats: int = 3) -> dict:
    import duckdb
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    n_prompts = rows // 32
    table = pa.table({
        "prompt_id": pa.array([f"p{i:06d}" for i in np.repeat(np.arange(n_prompts), 32)][:rows]),
        "step": pa.array(np.tile(np.arange(32, dtype=np.int32), n_prompts + 1)[:rows]),
        "token_id": pa.array(rng.integers(0, 49152, rows)),
        "logprob": pa.array(-rng.exponential(1.0, rows).astype(np.float32)),
        "entropy": pa.array(rng.gamma(2.0, 1.0, rows).astype(np.float32)),
        "rank": pa.array(rng.geometric(0.7, rows) - 1),
    })
    tmp = Path(tempfile.mkdtemp(prefix="tracer-duckdb-bench-"))
    try:
        for i, part in enumerate(range(0, rows, 100_000)):  # parts as a corpus run writes them
            pq.write_table(table.slice(part, 100_000), tmp / f"part-{i:05d}.parquet", compression="zstd")
        con = duckdb.connect()
        con.execute(f"CREATE VIEW steps AS SELECT * FROM read_parquet('{tmp}/part-*.parquet')")
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = con.execute("SELECT step, avg(entropy), avg(exp(logprob)), count(*) FILTER (WHERE rank > 0) "
                              "FROM steps GROUP BY step ORDER BY step").fetchall()
            times.append(time.perf_counter() - t0)
        assert len(out) == 32
        n, = con.execute("SELECT count(*) FROM steps").fetchone()
        assert n == rows
        return {"rows": rows, "median_s": statistics.median(times), "times": times}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_ray(items: list, tokens: int, batch_size: int) -> dict:
    import ray

    import tracer
    from tracer.corpus.ray_engine import trace_corpus_ray

    gen = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    tmp = Path(tempfile.mkdtemp(prefix="tracer-ray-bench-"))
    try:
        t0 = time.perf_counter()
        model, tok = tracer.load_model()
        one = tracer.trace_corpus(model, tok, items, dataset=tmp / "one", batch_size=batch_size, chat=True, **gen)
        t1 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        t2 = time.perf_counter()
        two = trace_corpus_ray(items, dataset=tmp / "ray", workers=2, batch_size=batch_size, chat=True, **gen)
        t3 = time.perf_counter()
        ray.shutdown()
        same = (one.steps.sort_values(["prompt_id", "step"]).token_id.tolist()
                == two.steps.sort_values(["prompt_id", "step"]).token_id.tolist())
        return {"one_process_s": t1 - t0, "ray_init_s": t2 - t1, "ray_2_workers_s": t3 - t2, "identical": same}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_vllm(items: list, tokens: int, batch_size: int, rounds: int) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM, SamplingParams

    from tracer.corpus.vllm_engine import _token_prompts, trace_corpus_vllm
    from tracer.models import embedded_model_path

    llm = LLM(model=str(embedded_model_path()), dtype="float32", max_model_len=1024, enforce_eager=True, seed=0)
    tok = llm.get_tokenizer()
    token_prompts, _ = _token_prompts(tok, [p for _, p in items], True, None)
    sp = SamplingParams(temperature=0, max_tokens=tokens, min_tokens=tokens)
    tmp = Path(tempfile.mkdtemp(prefix="tracer-vllm-bench-"))
    try:
        llm.generate(token_prompts, sp, use_tqdm=False)  # warm-up
        plain_t, traced_t, ratios = [], [], []
        for r in range(rounds):
            t0 = time.perf_counter(); llm.generate(token_prompts, sp, use_tqdm=False); t1 = time.perf_counter()
            trace_corpus_vllm(llm, items, dataset=tmp / f"d{r}", sampling={"max_tokens": tokens, "min_tokens": tokens},
                              batch_size=batch_size, chat=True)
            t2 = time.perf_counter()
            plain_t.append(t1 - t0); traced_t.append(t2 - t1); ratios.append((t2 - t1) / (t1 - t0))
        return {"untraced_s": statistics.median(plain_t), "traced_s": statistics.median(traced_t),
                "ratio": statistics.median(ratios), "ratios": ratios,
                "bytes_per_token": dir_bytes(tmp / "d0") / (len(items) * tokens)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duckdb-rows", type=int, default=1_000_000)
    ap.add_argument("--ray", action="store_true", help="also Ray with 2 workers vs 1 process")
    ap.add_argument("--vllm", action="store_true", help="only the vLLM figure (run in .venv-vllm)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    items = prompts(args.prompts)
    cond = (f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    lines = ["# Corpus tracing benchmark", "", f"Conditions: {cond}.", ""]
    if args.vllm:
        v = bench_vllm(items, args.tokens, 1_000_000, args.rounds)
        lines += [f"vLLM-CPU, {args.prompts} prompts x {args.tokens} tokens, one batch: untraced {v['untraced_s']:.2f} s, "
                  f"traced into a dataset {v['traced_s']:.2f} s: **{v['ratio']:.2f}x** (rounds {[round(x, 2) for x in v['ratios']]}); "
                  f"{v['bytes_per_token']:.0f} bytes per generated token"]
        name = "corpus_vllm.md"
    else:
        import tracer

        model, tok = tracer.load_model()
        g = bench_generate(model, tok, items, args.tokens, args.batch_size, args.rounds)
        print(g, flush=True)
        lines += [f"generate, {g['prompts']} prompts x {g['tokens']} tokens, batch {g['batch_size']}, fp32: untraced "
                  f"{g['untraced_s']:.2f} s, traced into a dataset {g['traced_s']:.2f} s: **{g['ratio']:.2f}x** "
                  f"(rounds {[round(x, 2) for x in g['ratios']]})",
                  f"dataset: {g['bytes_per_token']:.0f} bytes per generated token ({g['steps_bytes_per_token']:.0f} in "
                  f"`steps`; zstd Parquet, top-10 ids + log-probs per token)"]
        d = bench_duckdb(args.duckdb_rows)
        lines += [f"DuckDB `GROUP BY step` aggregate over {d['rows']:,} synthesized step rows (10 Parquet parts): "
                  f"**{d['median_s'] * 1000:.0f} ms** median of {len(d['times'])}"]
        print("\n".join(lines), flush=True)
        if args.ray:
            try:
                r = bench_ray(items, args.tokens, args.batch_size)
            except Exception as exc:  # noqa: BLE001 - a cluster that does not start under load: say so
                r = None
                lines += [f"Ray: not measured ({type(exc).__name__}: {str(exc)[:200]})"]
        if args.ray and r is not None:
            lines += [f"Ray: one process (model load + run) {r['one_process_s']:.1f} s; local cluster start "
                      f"{r['ray_init_s']:.1f} s; 2 replicas (actors load their models + run) {r['ray_2_workers_s']:.1f} s; "
                      f"identical tokens: {r['identical']}"]
        name = "corpus.md"
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / name).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
