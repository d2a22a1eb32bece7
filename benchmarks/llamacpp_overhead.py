"""llama.cpp: traced vs untraced in the same process, and its speed beside ``generate``.

    make bench-llamacpp        # or: .venv/bin/python benchmarks/llamacpp_overhead.py [--rounds 5]

1. Overhead, on one ``Llama`` (the embedded Q4_1 GGUF, 1 thread): for each of ``--prompts`` chat
   prompts and ``--tokens`` new tokens, untraced ``create_completion`` (llama-cpp-python's own
   loop), ``tracer.llamacpp_complete`` (the tracer's loop, nothing recorded) and
   ``tracer.llamacpp_generate`` (``RecordConfig(top_k=10)``: the raw row and every sampler's
   array, the trace built).  Each run starts from an empty context (prefill included) and all
   three produce the same text (checked; create_completion's token count leaves out the end token).  Greedy (the chain: penalties, greedy) and sampled
   (create_completion's defaults: 7 samplers, seed fixed).  On a shared machine load comes and
   goes, so the variants run back to back per prompt (their order rotating), and the figure is the
   median over (round, prompt) of the paired ratio traced / untraced (a slow minute slows
   both sides of a pair), in wall time and in the process's CPU time (llama.cpp runs on the
   calling thread with ``n_threads=1``, so CPU time counts the work, not the waiting for a
   core); medians of the per-round totals are reported too.  A wall-time ratio is published
   only when both sides' per-round totals spread by at most 25% (benchmarks/spread.py).
   Target: <= 1.10x.
2. Speed: new tokens per second of llama.cpp (untraced, above) and of HF ``model.generate``
   (fp32, batch 1, greedy, 1 thread, the same prompts and the same number of new tokens, forced
   with ``min_new_tokens``), interleaved in the same rounds; vLLM's figure is read from
   ``benchmarks/results/vllm_overhead.json`` (its own venv; batched, so not the same setting).

Writes ``benchmarks/results/llamacpp_overhead.json``.
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

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from spread import STABLE_SPREAD, spread, stable  # noqa: E402  (one rule for what may be published)

QUESTIONS = ["What is the capital of France?", "Name three colors of the rainbow.",
             "Write one sentence about the sea.", "Why is the sky blue?", "How do plants make food?",
             "What is a prime number?", "Describe a cat.", "Give me a tip for learning to cook."]
SAMPLED = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, seed=1234)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "llamacpp_overhead.json")
    args = ap.parse_args()
    load_start = list(os.getloadavg())

    import torch
    from llama_cpp import Llama

    import tracer
    from tracer.backends.llamacpp import default_gguf, llamacpp_complete, llamacpp_generate
    from tracer.backends.llamacpp_cli import prompt_ids

    torch.set_num_threads(1)
    model, tok = tracer.load_model()
    llm = Llama(model_path=str(default_gguf()), n_ctx=2048, n_threads=1, verbose=False)
    prompts = [prompt_ids(tok, q, chat=True, system=None)[1] for q in QUESTIONS[: args.prompts]]
    n = args.tokens
    record = tracer.RecordConfig(top_k=10)

    def plain(ids, kw):
        llm.reset()
        out = llm.create_completion(ids, max_tokens=n, **kw)
        return out["choices"][0]["text"], out["usage"]["completion_tokens"]

    def lean(ids, kw):
        llm.reset()
        [c] = llamacpp_complete(llm, ids, max_tokens=n, **kw)
        return c.text, len(c.tokens)

    def traced(ids, kw):
        llm.reset()
        [t] = llamacpp_generate(llm, ids, record=record, max_tokens=n, **kw)
        return t.generated_text[0], t.num_steps

    def hf(ids, kw):
        ids_t = torch.tensor([ids])
        out = model.generate(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), do_sample=False,
                             max_new_tokens=n, min_new_tokens=n, pad_token_id=tok.pad_token_id)
        return None, int(out.shape[1] - ids_t.shape[1])

    variants = {"untraced": plain, "tracer_loop_unrecorded": lean, "traced": traced}
    modes = {"greedy": {"temperature": 0.0}, "sampled": SAMPLED}
    times = {m: {v: [] for v in variants} for m in modes}
    pairs = {m: {"traced": [], "tracer_loop_unrecorded": []} for m in modes}
    cpu_pairs = {m: {"traced": [], "tracer_loop_unrecorded": []} for m in modes}
    tokens = {m: {v: 0 for v in variants} for m in modes}
    hf_times: list[float] = []
    hf_tokens = 0
    for ids in prompts[:1]:  # warm-up
        for mode, kw in modes.items():
            for fn in variants.values():
                fn(ids, kw)
        hf(ids, {})
    names = list(variants)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        totals = {m: {v: 0.0 for v in variants} for m in modes}
        hf_total = 0.0
        for ids in prompts:
            for mode, kw in modes.items():
                texts, took, cpu = {}, {}, {}
                for v in order:
                    t0, c0 = time.perf_counter(), time.process_time()
                    texts[v], count = variants[v](ids, kw)
                    took[v] = time.perf_counter() - t0
                    cpu[v] = time.process_time() - c0
                    totals[mode][v] += took[v]
                    if r == 0:
                        tokens[mode][v] += count
                for v in pairs[mode]:
                    pairs[mode][v].append(round(took[v] / took["untraced"], 4))
                    cpu_pairs[mode][v].append(round(cpu[v] / cpu["untraced"], 4))
                assert len(set(texts.values())) == 1, f"the variants differ: {texts}"
            t0 = time.perf_counter()
            _, count = hf(ids, {})
            hf_total += time.perf_counter() - t0
            if r == 0:
                hf_tokens += count
        for mode in modes:
            for v in variants:
                times[mode][v].append(round(totals[mode][v], 3))
        hf_times.append(round(hf_total, 3))
        print(f"round {r}: " + "; ".join(f"{m} " + ", ".join(f"{v} {totals[m][v]:.2f}s" for v in variants)
                                         for m in modes) + f"; generate {hf_total:.2f}s", flush=True)

    med = {m: {v: statistics.median(times[m][v]) for v in variants} for m in modes}

    def guarded(mode: str, variant: str) -> float | str:
        if not (stable(times[mode][variant]) and stable(times[mode]["untraced"])):
            return f"unstable: rounds spread more than {STABLE_SPREAD:.0%}, not published"
        return round(statistics.median(pairs[mode][variant]), 3)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 thread each",
        "load_average_at_start": load_start, "load_average_at_end": list(os.getloadavg()),
        "versions": {"llama_cpp_python": __import__("llama_cpp").__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "gguf": default_gguf().name, "prompts": len(prompts), "max_tokens": n, "rounds": args.rounds,
        "record_top_k": record.top_k, "times_s": times, "median_s": med, "tokens": tokens,
        "paired_ratios": pairs,
        "paired_cpu_ratios": cpu_pairs,
        "traced_over_untraced_cpu": {m: round(statistics.median(cpu_pairs[m]["traced"]), 3) for m in modes},
        "tracer_loop_over_untraced_cpu": {m: round(statistics.median(cpu_pairs[m]["tracer_loop_unrecorded"]), 3)
                                          for m in modes},
        # a ratio is published only when both sides' per-round totals agree within STABLE_SPREAD
        "spread": {m: {v: round(spread(times[m][v]), 3) for v in variants} for m in modes},
        "traced_over_untraced": {m: guarded(m, "traced") for m in modes},
        "tracer_loop_over_untraced": {m: guarded(m, "tracer_loop_unrecorded") for m in modes},
        "traced_over_untraced_of_median_totals": {m: round(med[m]["traced"] / med[m]["untraced"], 3) for m in modes},
        "llamacpp_untraced_tok_per_s": round(tokens["greedy"]["untraced"] / med["greedy"]["untraced"], 1),
        "llamacpp_traced_tok_per_s": round(tokens["greedy"]["traced"] / med["greedy"]["traced"], 1),
        "generate_times_s": hf_times, "generate_tokens": hf_tokens,
        "generate_tok_per_s": round(hf_tokens / statistics.median(hf_times), 1),
    }
    result["generate_spread"] = round(spread(hf_times), 3)
    result["llamacpp_over_generate"] = (
        round(result["llamacpp_untraced_tok_per_s"] / result["generate_tok_per_s"], 2)
        if stable(hf_times) and stable(times["greedy"]["untraced"])
        else f"unstable: rounds spread more than {STABLE_SPREAD:.0%}, not published")
    vllm = Path(__file__).parent / "results" / "vllm_overhead.json"
    if vllm.exists():
        v = json.loads(vllm.read_text())
        result["vllm_from_results"] = {
            "untraced_tok_per_s": v.get("vllm_untraced_tok_per_s"), "traced_over_untraced": v.get("traced_over_untraced"),
            "generate_batched_tok_per_s": v.get("hf_generate_tok_per_s"),
            "setting": f"{v.get('prompts')} prompts batched, {v.get('new_tokens_each')} tokens each, fp32"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("traced_over_untraced", "tracer_loop_over_untraced",
                                             "traced_over_untraced_cpu", "tracer_loop_over_untraced_cpu",
                                             "llamacpp_untraced_tok_per_s", "llamacpp_traced_tok_per_s",
                                             "generate_tok_per_s", "llamacpp_over_generate")}, indent=1))


if __name__ == "__main__":
    main()
