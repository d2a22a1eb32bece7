"""Overhead of tracing beam search and assisted decoding on the embedded model (CPU).

Interleaved rounds of untraced and traced runs in one process; prints the median wall time of
each and the ratio traced / untraced.  ``python benchmarks/modes_overhead.py [rounds]``."""

from __future__ import annotations

import statistics
import sys
import time

import torch

import tracer


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(rounds: int = 5) -> None:
    torch.manual_seed(0)
    model, tok = tracer.load_model()
    _, beam_in, beam_kw = tracer.prepare_generate(model, tok, ["Why is the sky blue?", "Name three fruits."],
                                                  max_new_tokens=32, min_new_tokens=32)
    beam_kw.update(num_beams=4, num_return_sequences=2, do_sample=False)
    text = "Repeat exactly: the quick brown fox jumps over the lazy dog. the quick brown fox jumps over the lazy dog."
    _, pl_in, pl_kw = tracer.prepare_generate(model, tok, text, max_new_tokens=32, do_sample=False)
    pl_kw["prompt_lookup_num_tokens"] = 4
    cases = {"beam search (2 prompts x 4 beams, 32 tokens)": (beam_in, beam_kw),
             "prompt lookup (32 tokens)": (pl_in, pl_kw)}
    print(f"torch threads: {torch.get_num_threads()}, rounds: {rounds} (interleaved), medians")
    for name, (inputs, kw) in cases.items():
        plain, traced = [], []

        def run_traced(inputs=inputs, kw=kw) -> None:
            with tracer.trace(model, tok):
                model.generate(**inputs, **kw)

        model.generate(**inputs, **kw)  # warm up
        run_traced()
        for _ in range(rounds):
            plain.append(_time(lambda: model.generate(**inputs, **kw)))
            traced.append(_time(run_traced))
        a, b = statistics.median(plain), statistics.median(traced)
        print(f"{name}: untraced {a:.3f}s, traced {b:.3f}s, ratio {b / a:.2f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
