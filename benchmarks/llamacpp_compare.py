"""llama.cpp (Q4_1 GGUF) against ``generate`` (the same weights dequantized to fp32), greedy.

    .venv/bin/python benchmarks/llamacpp_compare.py [--tokens 128]

For the seed's two prompts and "What is the capital of France?" (chat template, the same prompt
ids on both engines — checked), both engines decode greedily with full logit rows recorded:

1. free-running: ``tracer.compare(generate, llama.cpp)``: first divergence, and at the steps up
   to it |Δ log-prob| of the shared token and the exact KL(generate ‖ llama.cpp) on the raw rows;
2. teacher-forced: ``tracer.replay`` of the llama.cpp trace on the transformers model, then
   ``tracer.compare`` over every step (the same context all along): max / mean |Δ log-prob| of
   llama.cpp's token, mean / max KL, and how often the fp32 model's argmax is llama.cpp's token.

Writes ``benchmarks/results/llamacpp_compare.json`` (and prints a table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

PROMPTS = ["为什么要减少污染，保护环境？", "你有什么建议？", "What is the capital of France?"]


def figures(model, tokenizer, llm, prompt: str, tokens: int) -> dict:
    import numpy as np

    import tracer
    from tracer.backends.llamacpp_cli import prompt_ids

    record = tracer.RecordConfig(top_k=50, full_logits=True)
    text, ids = prompt_ids(tokenizer, prompt, chat=True, system=None)
    llm.reset()
    [lc] = tracer.llamacpp_generate(llm, [ids], record=record, prompt_texts=[text], max_tokens=tokens,
                                    temperature=0.0)
    hf = tracer.trace_generate(model, tokenizer, prompt, chat=True, record=record, max_new_tokens=tokens,
                               do_sample=False)
    assert hf.prompt_ids[0].tolist() == ids, "the two engines got different prompt ids"
    free = tracer.compare(hf, lc, names=("generate", "llama.cpp")).summary()["sequences"][0]
    rp = tracer.replay(model, tokenizer, lc)
    forced = tracer.compare(lc, rp, names=("llama.cpp", "generate (replay)"))
    rows = forced.table()
    argmax_same = float(np.mean([int(rp.steps[s].stages[0].top.ids[0, 0]) == int(lc.steps[s].chosen[0])
                                 for s in range(lc.num_steps)]))
    fs = forced.summary()["sequences"][0]
    return {
        "prompt": prompt, "prompt_tokens": len(ids),
        "generate_text": hf.generated_text[0], "llamacpp_text": lc.generated_text[0],
        "free": {"first_divergence": free["first_divergence"], "steps_generate": free["steps_a"],
                 "steps_llamacpp": free["steps_b"], "max_abs_dlogprob": free["max_abs_dlogprob"],
                 "mean_kl": free["mean_kl"], "max_kl": free["max_kl"], "kl_exact": free["kl_exact"],
                 "divergence": free.get("divergence")},
        "replay": {"steps": lc.num_steps, "max_abs_dlogprob": fs["max_abs_dlogprob"],
                   "mean_abs_dlogprob": fs["mean_abs_dlogprob"], "p95_abs_dlogprob":
                   float(np.nanpercentile(rows["abs_dlogprob"], 95)), "mean_kl": fs["mean_kl"],
                   "max_kl": fs["max_kl"], "kl_exact": fs["kl_exact"], "argmax_agreement": argmax_same},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "llamacpp_compare.json")
    args = ap.parse_args()
    import torch
    from llama_cpp import Llama

    import tracer
    from tracer.backends.llamacpp import default_gguf

    torch.set_num_threads(1)
    model, tokenizer = tracer.load_model()
    llm = Llama(model_path=str(default_gguf()), n_ctx=2048, n_threads=1, verbose=False)
    results = [figures(model, tokenizer, llm, p, args.tokens) for p in PROMPTS]
    out = {"tokens": args.tokens, "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 thread each",
           "gguf": str(default_gguf().name), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, ensure_ascii=False, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"{'prompt':<34} {'diverge':>7} {'free max|Δlp|':>13} {'replay max|Δlp|':>15} {'mean|Δlp|':>9} "
          f"{'mean KL':>8} {'max KL':>7} {'argmax=':>7}")
    for r in results:
        f, p = r["free"], r["replay"]
        print(f"{r['prompt'][:34]:<34} {str(f['first_divergence']):>7} {f['max_abs_dlogprob']:>13.3f} "
              f"{p['max_abs_dlogprob']:>15.3f} {p['mean_abs_dlogprob']:>9.3f} {p['mean_kl']:>8.4f} "
              f"{p['max_kl']:>7.3f} {p['argmax_agreement']:>7.0%}")
        print(f"    generate:  {r['generate_text'][:90]!r}\n    llama.cpp: {r['llamacpp_text'][:90]!r}")


if __name__ == "__main__":
    main()
