"""vLLM: traced vs untraced, and vLLM vs HF ``generate`` throughput (run in .venv-vllm).

    make bench-vllm      # or: .venv-vllm/bin/python benchmarks/vllm_overhead.py [--prompts 16 ...]

1. Overhead: the same engine, the same batch (``--prompts`` chat prompts, ``--tokens`` new tokens
   each, greedy, ``ignore_eos`` so every sequence is full length), untraced ``llm.generate`` vs
   ``tracer.vllm_generate`` with ``RecordConfig(top_k=--top-k)`` (vLLM computes the top-k
   log-probs; the tracer converts them to traces).  Runs alternate; medians; the ratio is
   traced / untraced.  Target: <= 1.10x with top-20.
2. Throughput: the same prompts through HF ``model.generate`` (left-padded batch, fp32,
   ``min_new_tokens`` = ``max_new_tokens``), new tokens per second against vLLM's untraced run.
3. HF vs vLLM greedy agreement (``--compare N`` prompts): first divergence and max |Δ log-prob| on
   the shared tokens, from the two traces.

Guards (``benchmarks/spread.py``): threads are pinned (``--threads``, default: the cores this
process may use; torch for HF, ``VLLM_CPU_OMP_THREADS_BIND`` for vLLM), each side runs
``--repeats`` rounds, and a side whose rounds spread more than 25% is re-run once; if it still
spreads, its ratio is published as ``"unstable"`` (``null`` with the spreads), never as a number.

Writes ``benchmarks/results/vllm_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from spread import available_cores, guarded_ratio, pin_threads, spread, stable  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

QUESTIONS = [
    "What is the capital of France?", "Name three colors of the rainbow.", "Write one sentence about the sea.",
    "Why is the sky blue?", "How do plants make food?", "What is a prime number?", "Describe a cat.",
    "Give me a tip for learning to cook.", "What does a compiler do?", "Why do we sleep?",
    "Explain gravity to a child.", "What is the largest ocean?", "How do bees make honey?",
    "Name a famous painter.", "What is photosynthesis?", "How far is the Moon?", "What is rain?",
    "Suggest a name for a dog.", "What is an atom?", "Why is exercise healthy?",
]


def greedy_agreement(hf, vl) -> dict:
    """First divergence and max |Δ log-prob| (raw distribution) on the shared greedy tokens."""
    import numpy as np

    a, b = hf.generated_ids(0), vl.generated_ids(0)
    n = min(len(a), len(b))
    first = next((i for i in range(n) if a[i] != b[i]), None)
    shared = n if first is None else first
    d = [abs(float(hf.steps[i].stages[0].chosen_logprob[0]) - float(vl.steps[i].stages[0].chosen_logprob[0]))
         for i in range(shared)]
    out = {"first_divergence": first, "shared_tokens": shared, "hf_tokens": len(a), "vllm_tokens": len(b),
           "max_abs_dlogprob": max(d) if d else 0.0, "mean_abs_dlogprob": float(np.mean(d)) if d else 0.0}
    if first is not None:
        out["hf_token_in_vllm_topk"] = int(a[first]) in vl.steps[first].stages[0].top.ids[0].tolist()
        out["vllm_token_in_hf_topk"] = int(b[first]) in hf.steps[first].stages[0].top.ids[0].tolist()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compare", type=int, default=3, help="prompts for the HF-vs-vLLM agreement (0: skip)")
    ap.add_argument("--compare-tokens", type=int, default=48)
    ap.add_argument("--no-hf", action="store_true", help="skip the HF generate throughput run")
    ap.add_argument("--threads", type=int, default=None, help="threads for both engines (default: the cores available)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "vllm_overhead.json")
    args = ap.parse_args()

    cores = available_cores()
    threads = pin_threads(args.threads or len(cores))
    bind = cores[:threads]
    if bind == list(range(bind[0], bind[0] + len(bind))):  # vLLM's CPU worker: the same cores
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{bind[0]}-{bind[-1]}")

    import torch
    import vllm
    from vllm import LLM, SamplingParams

    import tracer
    from tracer import RecordConfig
    from tracer.backends.vllm import engine_facts, traces_from_outputs, with_logprobs
    from tracer.hooks import encode_prompts
    from tracer.models import embedded_model_path, load_model

    # HF first: an idle vLLM engine's worker keeps polling (~20% of a core here), which would slow HF
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    questions = (QUESTIONS * (args.prompts // len(QUESTIONS) + 1))[: args.prompts]
    new_tokens = args.tokens * len(questions)
    result: dict = {}
    model = None
    if not args.no_hf or args.compare:
        model, hf_tok = load_model(dtype="float32")
    if not args.no_hf:
        _, enc = encode_prompts(hf_tok, questions, chat=True)  # the same chat text, left-padded
        pad = hf_tok.pad_token_id or hf_tok.eos_token_id

        def hf_round() -> float:
            s = time.perf_counter()
            out = model.generate(**enc, do_sample=False, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                 pad_token_id=pad)
            assert out.shape[1] - enc["input_ids"].shape[1] == args.tokens
            return time.perf_counter() - s

        with torch.inference_mode():
            model.generate(**enc, do_sample=False, max_new_tokens=4, pad_token_id=pad)
            hf_t = [hf_round() for _ in range(args.repeats)]
            if not stable(hf_t):  # once more: a busy patch of the shared machine
                print(f"HF generate rounds spread {spread(hf_t):.0%}: re-running", flush=True)
                hf_t = [hf_round() for _ in range(args.repeats)]
        hf_s = statistics.median(hf_t)
        result["hf_generate_s"] = [round(x, 3) for x in hf_t]
        result["hf_generate_spread"] = round(spread(hf_t), 3)
        result["hf_generate_tok_per_s"] = round(new_tokens / hf_s, 1)
        print("HF generate:", result, flush=True)

    t0 = time.perf_counter()
    llm = LLM(model=str(embedded_model_path()), dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
              disable_log_stats=False)
    startup = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in questions]
    sp = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    record = RecordConfig(top_k=args.top_k)

    def untraced() -> float:
        s = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        return time.perf_counter() - s

    def traced() -> float:
        s = time.perf_counter()
        traces = tracer.vllm_generate(llm, prompts, sp, record=record)
        total = time.perf_counter() - s
        assert sum(t.num_new_tokens[0] for t in traces) == args.tokens * len(prompts)
        return total

    untraced(), traced()  # warm-up (the first calls are slower)

    def rounds() -> tuple[list[float], list[float]]:
        plain_t, traced_t = [], []
        for _ in range(args.repeats):  # alternate, so drift on the shared machine hits both
            plain_t.append(untraced())
            traced_t.append(traced())
        return plain_t, traced_t

    plain_t, traced_t = rounds()
    if not (stable(plain_t) and stable(traced_t)):
        print(f"vLLM rounds spread {spread(plain_t):.0%} / {spread(traced_t):.0%}: re-running", flush=True)
        plain_t, traced_t = rounds()
    facts = engine_facts(llm)  # the conversion alone, on one batch of outputs
    outs = llm.generate(prompts, with_logprobs(sp, args.top_k), use_tqdm=False)
    s = time.perf_counter()
    traces_from_outputs(outs, sp, facts=facts, tokenizer=tok, record=record)
    convert_s = time.perf_counter() - s
    lp_t = []
    for _ in range(args.repeats):  # vLLM computing the log-probs, without the conversion
        s = time.perf_counter()
        llm.generate(prompts, with_logprobs(sp, args.top_k), use_tqdm=False)
        lp_t.append(time.perf_counter() - s)

    med_plain, med_traced = statistics.median(plain_t), statistics.median(traced_t)
    overhead = guarded_ratio(traced_t, plain_t)
    result = {**result,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
        "threads": threads, "vllm_cpu_omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
        "load_average_at_start": load_at_start,
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "prompts": len(prompts), "new_tokens_each": args.tokens, "top_k": args.top_k, "repeats": args.repeats,
        "engine_startup_s": round(startup, 1),
        "vllm_untraced_s": [round(x, 3) for x in plain_t],
        "vllm_traced_s": [round(x, 3) for x in traced_t],
        "vllm_logprobs_only_s": [round(x, 3) for x in lp_t],
        "trace_conversion_s": round(convert_s, 3),
        "traced_over_untraced": round(overhead["ratio"], 3) if overhead["ratio"] else "unstable",
        "traced_over_untraced_spreads": [overhead["spread_num"], overhead["spread_den"]],
        "traced_over_logprobs_only": (round(med_traced / statistics.median(lp_t), 3)
                                      if stable(traced_t) and stable(lp_t) else "unstable"),
        "vllm_untraced_tok_per_s": round(new_tokens / med_plain, 1),
        "vllm_traced_tok_per_s": round(new_tokens / med_traced, 1),
    }
    print(json.dumps(result, indent=1))

    if "hf_generate_s" in result:  # throughput ratio = HF time / vLLM time (the same new tokens)
        tp = guarded_ratio(hf_t, plain_t)
        result["vllm_over_hf_throughput"] = round(tp["ratio"], 2) if tp["ratio"] else "unstable"
    if args.compare:
        rows = []
        for q in questions[: args.compare]:
            hf = tracer.trace_generate(model, hf_tok, q, chat=True, record=RecordConfig(top_k=10), do_sample=False,
                                       max_new_tokens=args.compare_tokens)
            (vl,) = tracer.vllm_generate(llm, {"prompt_token_ids": hf.prompt_tokens(0).tolist()},
                                         SamplingParams(temperature=0, max_tokens=args.compare_tokens),
                                         record=RecordConfig(top_k=10))
            rows.append({"question": q, **greedy_agreement(hf, vl)})
        result["hf_vs_vllm_greedy"] = rows
    print(json.dumps({k: result[k] for k in result if k.startswith(("hf", "vllm_over"))}, indent=1))
    if hasattr(os, "getloadavg"):
        result["load_average_at_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print("wrote", args.out)


if __name__ == "__main__":  # vLLM spawns its worker: the guard is required
    main()
