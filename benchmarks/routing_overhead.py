"""Overhead of recording MoE routing (``RecordConfig(routing=True)``) on a random Qwen3-MoE (CPU).

The embedded model is dense, so this uses a random mid-size Qwen3-MoE (8 layers, hidden 512,
32 experts, 4 per token).  Interleaved rounds of untraced, traced (light) and traced with routing
in one process; prints median wall times and the ratios to the untraced run.
``python benchmarks/routing_overhead.py [rounds]``."""

from __future__ import annotations

import statistics
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import tracer
from tracer import RecordConfig


def main(rounds: int = 5) -> None:
    config = AutoConfig.for_model("qwen3_moe", hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                                  num_key_value_heads=4, head_dim=64, intermediate_size=1024, moe_intermediate_size=256,
                                  num_experts=32, num_experts_per_tok=4, vocab_size=32000, pad_token_id=0,
                                  eos_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 32000, (2, 64), generator=torch.Generator().manual_seed(0))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False, pad_token_id=0)

    def plain():
        return model.generate(**kw)

    def traced(record):
        def run():
            with tracer.trace(model, record=record):
                return model.generate(**kw)
        return run

    runs = {"untraced": plain, "traced (light)": traced(RecordConfig()),
            "traced (routing=True)": traced(RecordConfig(routing=True))}
    ref = plain()
    for name, fn in runs.items():  # warm-up, and the output check
        assert torch.equal(fn(), ref), name
    times: dict[str, list[float]] = {n: [] for n in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["untraced"])
    print(f"random Qwen3-MoE 8 layers x 32 experts (top-4), batch 2, prompt 64, 32 new tokens, {rounds} rounds")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:24s} median {med:.3f} s  ratio {med / base:.2f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
