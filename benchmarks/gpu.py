"""What tracing adds per decode step on a GPU: Llama-3-8B- and 1B-shaped bf16 models.

    python benchmarks/gpu.py [--device cuda] [--quick] [--budget-s 450] [--out benchmarks/results]
    python benchmarks/gpu.py --device cpu --quick     # tiny shapes: the script's own test

Random weights built from configs on the device (nothing downloaded), bf16, 256 new tokens
(greedy, ``min_new_tokens == max_new_tokens``), sdpa; the configurations of
``benchmarks/step_cost.py`` (plain, light, modules, attention, full logits, HF ``output_scores`` +
``output_logits``, HF eager ``output_attentions``, bare per-layer hooks, nnsight when importable),
interleaved round by round.  Every run's ids are kept and grouped into distinct outputs; on a GPU
a traced run whose ids differ from plain's is recorded (the step, and the gap between the two best
scores the trace holds there), not raised: plain generate itself flips at a near tie from run to
run there (docs/step_cost.md, "On a GPU").
Where ``flash-attn`` imports, the 8B shape runs again with ``flash_attention_2`` (plain, light,
attention, HF scores).  Sized to finish in <= 8 minutes on one H100-class GPU: a section that would
start after ``--budget-s`` seconds is skipped and recorded as such.

Writes ``<out>/gpu.json`` (machine and GPU name, every time, ms added per step, ratios).
"""

from __future__ import annotations

import argparse
import os
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import overhead as ov  # noqa: E402
import step_cost as sc  # noqa: E402

#: name -> LlamaConfig shape (Llama 3 family: GQA 8 KV heads, vocab 128,256)
SHAPES = {
    "Llama-3.2-1B-shaped": dict(layers=16, hidden=2048, heads=32, kv_heads=8, intermediate=8192, vocab=128256),
    "Llama-3-8B-shaped": dict(layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336, vocab=128256),
}
#: --device cpu --quick: the same code on shapes a CPU test runs in seconds
TINY_SHAPES = {
    "tiny-1B-like": dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=1024),
    "tiny-8B-like": dict(layers=4, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=1024),
}
FLASH_CONFIGS = ("plain", "light", "attention", "hf_scores")


def flash_available() -> str | None:
    """None when ``flash_attn`` imports (and CUDA is there), else why not."""
    if not torch.cuda.is_available():
        return "no CUDA"
    try:
        import flash_attn  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"flash-attn not installed ({type(exc).__name__})"
    return None


def llama3_tokenizer() -> Any:
    """The Llama 3.2 tokenizer (vocab 128,256) when its wheel is installed, else None (fixed ids;
    nnsight then reports that it needs one)."""
    try:
        import tracer

        return tracer.load_tokenizer("llama-3")
    except Exception:  # noqa: BLE001
        return None


def subject(name: str, shape: dict[str, int], device: torch.device, attn: str) -> ov.Subject:
    tok = llama3_tokenizer() if shape["vocab"] == 128256 else None
    return sc.llama_subject(shape["layers"], device, hidden=shape["hidden"], heads=shape["heads"],
                            kv_heads=shape["kv_heads"], intermediate=shape["intermediate"], vocab=shape["vocab"],
                            dtype=torch.bfloat16, attn_implementation=attn, tokenizer=tok,
                            name=f"{name} ({attn})", rope_theta=500000.0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny shapes on CPU / fewer tokens on a GPU")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--shapes", default=None, help="comma-separated shape names, in the order to run them")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip sections that would start after this")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu.py: --device cuda but torch sees no CUDA device (run with --device cpu --quick)")
    if device.type == "cuda":
        # plain generate is not bit-reproducible run to run on a GPU by default (an 8B-shaped bf16
        # run on an H200 differed from itself at step 235 of 256); with deterministic algorithms
        # plain's own runs agreed there, though a flip at an exact or one-step tie remained, in HF's
        # own output_scores and bare no-op hooks as in traced runs (docs/step_cost.md, "On a GPU")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # an op without one warns, not fails
    tiny = device.type == "cpu"
    shapes = TINY_SHAPES if tiny else SHAPES
    if args.shapes:
        unknown = [n for n in args.shapes.split(",") if n not in shapes]
        if unknown:
            raise SystemExit(f"gpu.py: unknown shape {unknown[0]!r}; known: {', '.join(shapes)}")
        shapes = {n: shapes[n] for n in args.shapes.split(",")}
    tokens = args.tokens or (8 if tiny else 64 if args.quick else 256)
    repeats = args.repeats or (1 if tiny else 3)
    if tiny:
        torch.set_num_threads(1)
    all_configs = sc.configurations(include_nnsight=True)
    sections: list[tuple[str, str, dict[str, int], dict[str, ov.Runner]]] = [
        (f"{name} sdpa", name, shape, all_configs) for name, shape in shapes.items()]
    why_no_flash = flash_available()
    if why_no_flash is None:
        name = max(shapes, key=lambda n: shapes[n]["layers"])  # the 8B shape, whatever the order
        sections.append((f"{name} flash_attention_2", name, shapes[name],
                         {k: v for k, v in all_configs.items() if k in FLASH_CONFIGS}))
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write() -> dict[str, Any]:
        """gpu.json as it stands: written after every section, so a run stopped by a time limit
        keeps the sections it finished"""
        report = {
            "machine": ov.machine_info(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (tiny shapes: a test)",
            "new_tokens": tokens,
            "repeats": repeats,
            "sections": results,
            "skipped": skipped,
            "not_reached": [label for label, *_ in sections if label not in results and label not in skipped],
            "flash_attention_2": why_no_flash or "run",
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "nnsight": ov.nnsight_available() or "installed",
            "wall_s": time.perf_counter() - t_start,
        }
        (out / "gpu.json").write_text(json.dumps(report, indent=1))
        return report

    for label, name, shape, configs in sections:
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            skipped[label] = f"time budget: {elapsed:.0f} s elapsed of {args.budget_s:.0f}"
            continue
        attn = "flash_attention_2" if label.endswith("flash_attention_2") else "sdpa"
        print(f"{label}: building", flush=True)
        subj = subject(name, shape, device, attn)
        print(f"{label}: {tokens} tokens, {repeats} rounds, {list(configs)}", flush=True)
        measured = sc.measure({label: subj}, configs, new_tokens=tokens, repeats=repeats,
                              log=lambda m: print(m, flush=True))
        results[label] = {**measured[label], "shape": shape, "attn_implementation": attn}
        got = results[label]
        print(f"  outputs: {got['distinct_outputs']} distinct (first differing step of each: "
              f"{got['first_differing_step_of_each_output']}); the untimed first run: "
              f"{got.get('first_run_first_differing_step', '-')}", flush=True)
        for c, row in results[label]["configs"].items():
            if row["added_ms_per_step"] is not None:
                print(f"  {c:14s} {row['ms_per_step']:8.2f} ms/step  {row['added_ms_per_step']:+7.3f} added  "
                      f"{row['ratio']:.3f}x  paired {row['added_ms_per_step_paired_median']:+7.3f}  "
                      f"outputs {row['output_groups']}  {row['divergence'] or ''}", flush=True)
        del subj
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write()
    report = write()
    print(f"wrote {out / 'gpu.json'} in {report['wall_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
