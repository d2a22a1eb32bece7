"""Regenerate tests/data/vllm_embedded.trace (run in .venv-vllm):

    TRACER_CACHE_DIR=.cache/tracer .venv-vllm/bin/python tests/vllm_backend/make_fixture.py

A greedy vLLM trace of the embedded model that the main environment's tests load and render
without vLLM installed.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
OUT = Path(__file__).resolve().parents[1] / "data" / "vllm_embedded.trace"

if __name__ == "__main__":  # vLLM spawns its worker: the guard is required
    from vllm import LLM, SamplingParams

    import tracer
    from tracer.models import embedded_model_path

    llm = LLM(model=str(embedded_model_path()), dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
              disable_log_stats=False)
    tok = llm.get_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France? <b>&</b>"}],
                                     tokenize=False, add_generation_prompt=True)
    (trace,) = tracer.vllm_generate(llm, prompt, SamplingParams(temperature=0, max_tokens=24),
                                    record=tracer.RecordConfig(top_k=5), prompt_logprobs=2)
    print(trace, trace.generated_text)
    trace.save(OUT)
    print("saved", OUT, sum(f.stat().st_size for f in OUT.iterdir()), "bytes")
