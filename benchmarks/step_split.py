"""Where light tracing's per-step cost goes: during generate, or at the end (issue 19).

    python benchmarks/step_split.py [--device cpu|cuda] [--rounds 5] [--tokens 256]
                                    [--vocab 256,49152] [--layers 2,16] [--profile] [--out DIR]

For each vocabulary and layer count (random-weight Llama, hidden 64, as in ``step_cost.py``):
plain ``generate``, light tracing, light without the KV-cache readings, HF
``output_scores``+``output_logits`` and bare no-op hooks on every layer, interleaved, ``rounds``
rounds after one warm-up; then light with its statistics copied to the host unpinned (plain
``.to("cpu")``) instead of into pinned memory.  Reports ms added per step by the least disturbed
round of each (wall time: on a GPU the host's Python is what is measured), and how much of
light's is the end of the run (``StepRecorder.finish``: the last statistics flush, the host
transfers and building the records).  ``--profile`` prints a cProfile of one light run at the
first layer count (where the host time goes).  Writes ``<out>/step_split.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
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
from tracer import RecordConfig  # noqa: E402
from tracer import _device  # noqa: E402
from tracer import recorder as _recorder  # noqa: E402
from tracer import stage_stats as _stage_stats  # noqa: E402
from tracer.jsonio import write_json_atomic  # noqa: E402


def _unpinned(t: torch.Tensor) -> torch.Tensor:
    return t.clone() if t.device.type == "cpu" else t.to("cpu", non_blocking=False)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--vocab", default="256,49152")
    p.add_argument("--layers", default="2,16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev, n = torch.device(args.device), args.tokens
    target = Path(args.out)

    def write(out: dict[str, Any]) -> None:
        write_json_atomic(target / "step_split.json", out, indent=1)

    finishes: list[float] = []
    original_finish = _recorder.StepRecorder.finish

    def timed_finish(self, *a: Any, **k: Any) -> Any:
        ov.sync(dev)
        t0 = time.perf_counter()
        try:
            return original_finish(self, *a, **k)
        finally:
            ov.sync(dev)
            finishes.append(time.perf_counter() - t0)

    def timed(run: ov.Runner, s: ov.Subject) -> float:
        return ov._timed(run, s, n).seconds  # step_cost's timing: synchronised, young garbage collected first

    light = ov.traced(RecordConfig())
    configs = {"plain": ov.run_plain, "light": light, "light_no_cache": ov.traced(RecordConfig(cache=False)),
               "hf_scores": ov.run_hf_scores, "hooks": sc.run_hooks}
    out: dict[str, Any] = {"machine": ov.machine_info(dev), "tokens": n, "rounds": args.rounds, "results": {}}
    _recorder.StepRecorder.finish = timed_finish
    try:
        for vocab in (int(v) for v in args.vocab.split(",")):
            for i, layers in enumerate(int(x) for x in args.layers.split(",")):
                s = sc.llama_subject(layers, dev, vocab=vocab, tokenizer=None)
                for run in configs.values():
                    timed(run, s)
                times: dict[str, list[float]] = {c: [] for c in configs}
                light_finish: list[float] = []
                for _ in range(args.rounds):
                    for c, run in configs.items():
                        finishes.clear()
                        times[c].append(timed(run, s))
                        if c == "light":
                            light_finish.append(finishes[0])
                unpinned, unpinned_finish = [], []
                _stage_stats.to_host = _unpinned
                try:
                    for _ in range(args.rounds):
                        finishes.clear()
                        unpinned.append(timed(light, s))
                        unpinned_finish.append(finishes[0])
                finally:
                    _stage_stats.to_host = _device.to_host
                plain = min(times["plain"]) / n * 1e3
                row = {f"{c}_added_ms_per_step": round(min(v) / n * 1e3 - plain, 3) for c, v in times.items()}
                row.update(plain_ms_per_step=round(plain, 3),
                           light_end_ms_per_step=round(min(light_finish) / n * 1e3, 3),
                           light_unpinned_added_ms_per_step=round(min(unpinned) / n * 1e3 - plain, 3),
                           light_unpinned_end_ms_per_step=round(min(unpinned_finish) / n * 1e3, 3))
                key = f"vocab {vocab}, {layers} layers"
                out["results"][key] = row
                print(key, json.dumps(row), flush=True)
                write(out)  # after every vocabulary and layer count: a run cut short keeps what it measured
                if args.profile and i == 0:
                    prof = cProfile.Profile()
                    prof.enable()
                    light(s, n)
                    ov.sync(dev)
                    prof.disable()
                    text = io.StringIO()
                    pstats.Stats(prof, stream=text).sort_stats("cumtime").print_stats("tracer/", 30)
                    print(text.getvalue(), flush=True)
                del s
    finally:
        _recorder.StepRecorder.finish = original_finish
    write(out)
    return out


if __name__ == "__main__":
    main()
