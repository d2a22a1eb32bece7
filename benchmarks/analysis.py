"""What the analysis functions cost: replay (incremental and forward) as a ratio to the original
generation, and ``tracer.compare`` on a 1,024-token pair.

    python benchmarks/analysis.py [--tokens 64] [--repeats 3] [--out benchmarks/results]

Replay: one fixed chat prompt, greedy, ``min_new_tokens == max_new_tokens`` so every run does
the same work.  Plain ``generate``, the traced generation (the "original"), the incremental
replay and the forward replay are timed interleaved round by round after one warm-up, so a slow
patch of a shared machine hits them all alike; a ratio is the median of the per-round ratios.  The
incremental replay is asserted to reproduce the original's raw logits exactly (|Δ log-prob| = 0)
and the forward replay to stay within 1e-4.

Compare: two synthetic 1,024-step traces (``tracer.testing.make_trace``, top-10 per stage) that
part at step 512; ``compare`` + ``summary`` + ``table``, median of ``--repeats`` runs.

Writes ``<out>/analysis.md``.  The functions are importable (a tiny model works too).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("TRACER_CACHE_DIR", str(REPO_ROOT / ".cache" / "tracer"))

import tracer  # noqa: E402
from tracer.records import replace  # noqa: E402
from tracer.testing import make_trace  # noqa: E402

PROMPT = "Explain in a few sentences how a key-value cache makes text generation faster."


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_replay(model: Any, tok: Any, inputs: dict[str, torch.Tensor], tokens: int, repeats: int) -> dict[str, Any]:
    """Median seconds of plain generate, traced generate, replay incremental, replay forward."""
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                  pad_token_id=tok.pad_token_id if tok is not None else 0)

    def traced():
        with tracer.trace(model, tok) as t:
            model.generate(**inputs, **kwargs)
        return t.trace

    original = traced()
    configs: dict[str, Callable[[], Any]] = {
        "plain": lambda: model.generate(**inputs, **kwargs),
        "traced": traced,
        "replay_incremental": lambda: tracer.replay(model, tok, original, mode="incremental"),
        "replay_forward": lambda: tracer.replay(model, tok, original, mode="forward"),
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    for fn in configs.values():  # warm-up
        fn()
    names = list(configs)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            seconds, out = _timed(configs[name])
            times[name].append(seconds)
            if name.startswith("replay"):
                d = tracer.compare(original, out)
                worst = float(np.nanmax(d.table()["abs_dlogprob"]))
                assert d.first_divergence == [None] * original.batch_size
                assert worst == 0 if name == "replay_incremental" else worst < 1e-4, (name, worst)
    med = {name: statistics.median(v) for name, v in times.items()}
    # ratios paired within a round (the four runs of a round are back to back), then the median:
    # robust to the load of a shared machine changing between rounds
    paired = {ref: {n: statistics.median(a / b for a, b in zip(times[n], times[ref])) for n in times}
              for ref in ("traced", "plain")}
    return {"tokens": tokens, "repeats": repeats, "median_s": med, "x_traced": paired["traced"],
            "x_plain": paired["plain"]}


def bench_compare(steps: int = 1024, repeats: int = 3, top_k: int = 10) -> dict[str, Any]:
    """Median seconds of compare + summary + table on a ``steps``-token pair parting halfway."""
    a = make_trace(batch=1, steps=steps, vocab=4096, top_k=top_k, attention=False, seed=0)
    half = steps // 2
    rec = a.steps[half]
    other = rec.chosen.copy()
    other[0] = int(rec.stages[0].top.ids[0, 1])
    b = dataclasses.replace(a, steps=[*a.steps[:half], replace(rec, chosen=other), *a.steps[half + 1:]])
    times = []
    for _ in range(repeats):
        seconds, d = _timed(lambda: (lambda c: (c.summary(), c.table(), c))(tracer.compare(a, b))[2])
        times.append(seconds)
    assert d.first_divergence == [half]
    return {"steps": steps, "top_k": top_k, "median_s": statistics.median(times), "runs": times}


def report(replay: dict[str, Any], comp: dict[str, Any], subject: str) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# tracer analysis benchmark", "",
        f"{_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} · {platform.processor() or platform.machine()} "
        f"({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads) · torch {torch.__version__} · "
        f"load average {load:.1f} at the end", "",
        f"## Replay vs the original generation ({subject})", "",
        f"{replay['tokens']} new tokens, greedy, one chat prompt; {replay['repeats']} interleaved runs after one warm-up; "
        "median seconds; ratios are medians of the ratios paired within each round; the original is the "
        "traced generation (`RecordConfig()`).", "",
        "| run | median s | × original (traced) | × plain generate |", "|---|---:|---:|---:|",
    ]
    what = {"plain": "plain `generate`", "traced": "original: traced `generate`",
            "replay_incremental": "`replay(mode=\"incremental\")` (\\|Δ log-prob\\| = 0 asserted)",
            "replay_forward": "`replay(mode=\"forward\")` (\\|Δ log-prob\\| < 1e-4 asserted)"}
    for name, label in what.items():
        lines.append(f"| {label} | {replay['median_s'][name]:.3f} | **{replay['x_traced'][name]:.2f}×** | "
                     f"{replay['x_plain'][name]:.2f}× |")
    lines += ["", "## compare on a 1,024-token pair", "",
              f"`tracer.compare(a, b)` + `.summary()` + `.table()` on two synthetic {comp['steps']}-step traces "
              f"(top-{comp['top_k']} per stage, parting at step {comp['steps'] // 2}): "
              f"**{comp['median_s'] * 1000:.0f} ms** (median of {len(comp['runs'])}).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    model, tok = tracer.load_model(device="cpu")
    enc = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    rep = bench_replay(model, tok, inputs, args.tokens, args.repeats)
    comp = bench_compare(repeats=args.repeats)
    text = report(rep, comp, "embedded SmolLM2-135M-Instruct, fp32, sdpa, cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "analysis.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
