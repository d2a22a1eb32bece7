"""What tracing costs: `tracer` against plain ``generate`` and against its peers.

    python benchmarks/overhead.py [--quick] [--device auto|cpu|cuda] [--out benchmarks/results]

Every configuration generates exactly the same work (greedy, ``min_new_tokens ==
max_new_tokens``) from one fixed chat prompt.  Configurations are timed in one process,
interleaved round by round (the starting configuration rotates each round) after one warm-up
each, so a slow patch of a shared machine hits them all alike; the reported time is the median
and the ratio is ``median(config) / median(plain)`` from the same run.  Every traced run's
output ids are asserted equal to plain ``generate``'s: a configuration that changed the result
is never reported.

Sections:

* overhead -- plain, tracer configurations (light, modules, attention, full_logits), HF's own
  outputs (``output_scores/output_logits``; eager ``output_attentions``) and nnsight when
  importable;
* growth -- light tracing at 64/256/1024 new tokens: time ratio, peak host (and GPU) memory,
  the trace's own size in memory and on disk, bytes per token, save and load times;
* budget -- ``RecordConfig(attention=True, max_bytes=<small>)`` must raise
  ``MemoryBudgetError`` before the model runs at all.

Subjects: the embedded SmolLM2-135M-Instruct (fp32, sdpa) on the chosen device, and on CUDA
also a Llama-3-8B-shaped model with random weights (bf16, sdpa; nothing downloaded).

Writes ``<out>/latest.json`` (machine info + every number) and ``<out>/latest.md`` (tables).
The functions are importable (``tests/test_benchmarks.py`` runs them on a tiny model).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (REPO_ROOT, REPO_ROOT / "benchmarks"):  # run from a checkout without installing
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
os.environ.setdefault("TRACER_CACHE_DIR", str(REPO_ROOT / ".cache" / "tracer"))

import tracer  # noqa: E402
from tracer import MemoryBudgetError, RecordConfig  # noqa: E402
from tracer._device import sync  # noqa: E402
from tracer.jsonio import write_json_atomic  # noqa: E402

from spread import STABLE_SPREAD, spread, stable  # noqa: E402  (benchmarks/spread.py: one rule for what may be published)

PROMPT = "Explain in a few sentences how a key-value cache makes text generation faster."
NEW_TOKENS = 128
GROWTH_SIZES = (64, 256, 1024)
QUICK_GROWTH_SIZES = (64, 256)
TARGET_LIGHT = 1.15  # light tracing on CPU, x plain
TARGET_ATTENTION = 1.5  # every layer's attention, x plain (and below HF eager output_attentions)

#: Configurations whose output ids must equal plain generate's (asserted on every run).
MUST_MATCH = ("light", "modules", "attention", "full_logits", "hf_scores")


# ----------------------------------------------------------------------------------------
# What is benchmarked
# ----------------------------------------------------------------------------------------


@dataclass
class Subject:
    """A model ready to generate from one fixed prompt."""

    name: str
    model: torch.nn.Module
    tokenizer: Any  # None: a model without a tokenizer (ids only)
    inputs: dict[str, torch.Tensor]  # input_ids / attention_mask `(1, P)` on the model's device
    eos_token_id: list[int]
    pad_token_id: int | None
    description: str = ""
    _peers: dict[str, Any] = field(default_factory=dict)  # wrapped models of peers, built once

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def gen_kwargs(self, new_tokens: int) -> dict[str, Any]:
        """Greedy, exactly ``new_tokens`` tokens (``min_new_tokens`` holds the terminators off)."""
        return dict(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )


def embedded_subject(device: torch.device) -> Subject:
    from tracer.hooks import default_terminators, encode_prompts

    model, tok = tracer.load_model(dtype="float32", device=str(device), attn_implementation="sdpa")
    _, enc = encode_prompts(tok, PROMPT, chat=True)
    return Subject(
        name="SmolLM2-135M-Instruct",
        model=model,
        tokenizer=tok,
        inputs={k: v.to(device) for k, v in enc.items()},
        eos_token_id=default_terminators(model, tok),
        pad_token_id=tok.pad_token_id,
        description=f"embedded model, fp32, sdpa, {device}",
    )


def random_llama(config: Any, device: torch.device, dtype: torch.dtype, attn_implementation: str = "sdpa") -> Any:
    """``LlamaForCausalLM(config)`` with seeded random weights, built directly on ``device`` in
    ``dtype`` (no fp32 copy of a large model, nothing downloaded), in eval mode."""
    from transformers import LlamaForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def llama3_8b_shaped_subject(device: torch.device) -> Subject:
    """Llama-3-8B shapes with random weights in bf16, built directly on ``device`` (no download)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        hidden_size=4096,
        intermediate_size=14336,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        bos_token_id=128000,
        eos_token_id=[128001, 128009],
    )
    model = random_llama(config, device, torch.bfloat16)  # never materialise 32 GB of fp32 weights

    tok = None
    try:  # the Llama 3.2 tokenizer wheel; the GPU machine may lack it
        from tracer.hooks import encode_prompts

        tok = tracer.load_tokenizer("llama-3")
        _, enc = encode_prompts(tok, PROMPT, chat=True)
    except Exception:  # noqa: BLE001 - any failure: fall back to fixed ids
        tok = None
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 120000, (1, 40), generator=gen)
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return Subject(
        name="Llama-3-8B-shaped (random weights)",
        model=model,
        tokenizer=tok,
        inputs={k: v.to(device) for k, v in enc.items()},
        eos_token_id=[128001, 128009],
        pad_token_id=128001,
        description=f"32 layers, 32 heads, 8 KV heads, hidden 4096, vocab 128256, bf16, sdpa, {device}"
        + ("" if tok is not None else "; fixed prompt ids (no tokenizer)"),
    )


# ----------------------------------------------------------------------------------------
# Runners: one generate call each, returning (output ids `(1, P + N)`, trace or None)
# ----------------------------------------------------------------------------------------

Runner = Callable[[Subject, int], tuple[torch.Tensor, Any]]


def run_plain(s: Subject, n: int) -> tuple[torch.Tensor, Any]:
    return s.model.generate(**s.inputs, **s.gen_kwargs(n)), None


def traced(record: RecordConfig) -> Runner:
    def run(s: Subject, n: int) -> tuple[torch.Tensor, Any]:
        with tracer.trace(s.model, s.tokenizer, record=record) as session:
            out = s.model.generate(**s.inputs, **s.gen_kwargs(n))
        return out, session.trace

    return run


def run_hf_scores(s: Subject, n: int) -> tuple[torch.Tensor, Any]:
    out = s.model.generate(
        **s.inputs, **s.gen_kwargs(n), output_scores=True, output_logits=True, return_dict_in_generate=True
    )
    return out.sequences, None


def run_hf_eager_attn(s: Subject, n: int) -> tuple[torch.Tensor, Any]:
    """HF's only way to see attention: switch the whole model to eager (sdpa restored after)."""
    previous = s.model.config._attn_implementation
    s.model.set_attn_implementation("eager")
    try:
        out = s.model.generate(**s.inputs, **s.gen_kwargs(n), output_attentions=True, return_dict_in_generate=True)
    finally:
        s.model.set_attn_implementation(previous)
    return out.sequences, None


def nnsight_available() -> str | None:
    """None when ``import nnsight`` works, else why not."""
    try:
        import nnsight  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"not installed ({type(exc).__name__}: {exc})"
    return None


def run_nnsight(s: Subject, n: int) -> tuple[torch.Tensor, Any]:
    """nnsight 0.8 running HF generate and saving every step's ``lm_head`` output.

    DESIGN.md's ``with lm.all():`` block form is deprecated in nnsight 0.8.1 in favour of
    ``for step in tracer.iter[...]``; the loop is bounded to ``n`` steps so that the statement
    after it (reading the output ids) runs."""
    import warnings

    from nnsight import LanguageModel

    lm = s._peers.get("nnsight")
    if lm is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LanguageModel's own deprecation notice
            lm = s._peers["nnsight"] = LanguageModel(s.model, tokenizer=s.tokenizer)
    with lm.generate(dict(s.inputs), **s.gen_kwargs(n)) as tr:
        logits = list().save()
        for _ in tr.iter[:n]:
            logits.append(lm.lm_head.output)
        ids = tr.result.save()
    if len(logits) != n:
        raise RuntimeError(f"nnsight saved {len(logits)} lm_head outputs for {n} steps")
    return ids, None


def configurations(*, include_nnsight: bool = True) -> dict[str, Runner]:
    configs: dict[str, Runner] = {
        "plain": run_plain,
        "light": traced(RecordConfig()),
        "modules": traced(RecordConfig(modules=True)),
        "attention": traced(RecordConfig(attention=True, attention_dtype="float16")),
        "full_logits": traced(RecordConfig(full_logits=True)),
        "hf_scores": run_hf_scores,
        "hf_eager_attn": run_hf_eager_attn,
    }
    if include_nnsight and nnsight_available() is None:
        configs["nnsight"] = run_nnsight
    return configs


DESCRIPTIONS = {
    "plain": "`generate` untraced",
    "light": "`RecordConfig()`: top-k per stage, chosen token, stop reasons, cache sizes",
    "modules": "`RecordConfig(modules=True)`: + residual norms per layer",
    "attention": "`RecordConfig(attention=True)`: every layer's attention maps (fp16), sdpa kept",
    "full_logits": "`RecordConfig(full_logits=True)`: + full-vocabulary logits row per step",
    "hf_scores": "HF `output_scores` + `output_logits`",
    "hf_eager_attn": "HF `output_attentions`, model switched to eager",
    "nnsight": "nnsight 0.8: save `lm_head` output every step",
}


# ----------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


class PeakRSS:
    """Samples the resident set size every ``interval`` s on a thread; ``peak - start`` is the
    host memory a run needed on top of what was resident before it."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = _rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def delta(self) -> int:
        return self.peak - self.start


def trace_nbytes(obj: Any) -> int:
    """Bytes of every numpy array a :class:`tracer.Trace` holds (records, cache timeline, blobs)."""
    seen: set[int] = set()

    def walk(x: Any) -> int:
        if isinstance(x, np.ndarray):
            if id(x) in seen:
                return 0
            seen.add(id(x))
            return int(x.nbytes)
        if isinstance(x, (str, bytes, int, float, bool)) or x is None:
            return 0
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(walk(v) for v in x)
        if hasattr(x, "__dataclass_fields__"):
            return sum(walk(getattr(x, name)) for name in x.__dataclass_fields__ if name != "blobs")
        return 0

    total = walk(obj)
    blobs = getattr(obj, "blobs", None)
    if blobs is not None:
        total += sum(int(np.asarray(blobs.get(k)).nbytes) for k in blobs.keys())
    return total


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _median(xs: list[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


@dataclass
class _Timed:
    seconds: float
    ids: torch.Tensor
    trace: Any
    gpu_peak: int | None
    rss: PeakRSS | None


def _timed(run: Runner, s: Subject, n: int, *, track_rss: bool = False) -> _Timed:
    device = s.device
    gc.collect(1)  # young generations only (cheap); a full collection runs once per round
    gpu_base = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        gpu_base = torch.cuda.memory_allocated(device)
    rss = PeakRSS() if track_rss else None
    if rss is not None:
        rss.__enter__()
    sync(device)
    t0 = time.perf_counter()
    try:
        ids, trace = run(s, n)
        sync(device)
        seconds = time.perf_counter() - t0
    finally:
        if rss is not None:
            rss.__exit__(None, None, None)
    gpu_peak = torch.cuda.max_memory_allocated(device) - gpu_base if gpu_base is not None else None
    return _Timed(seconds, ids.detach().cpu(), trace, gpu_peak, rss)


def _check_identical(name: str, ids: torch.Tensor, reference: torch.Tensor, trace: Any, n: int, *,
                     strict: bool = True) -> bool:
    """Whether ``ids`` equal plain's ``reference``.  ``strict`` (off on a GPU, where plain generate
    itself is not bit-reproducible run to run at a near tie: docs/step_cost.md, "On a GPU"): a
    configuration that must not change the result raises where they differ; else the caller
    records it.  A trace must hold its own run's output either way."""
    same = ids.shape == reference.shape and torch.equal(ids, reference)
    if name in MUST_MATCH and strict:
        assert same, f"{name}: output ids differ from plain generate: the configuration changed the result"
    if trace is not None:
        assert trace.num_steps == n, f"{name}: the trace holds {trace.num_steps} steps for {n} new tokens"
        assert np.array_equal(trace.sequences, ids.numpy()), f"{name}: trace.sequences differ from the output"
    return same


def _strict(s: Subject, strict: bool | None) -> bool:
    """``strict`` as given, else on unless ``s`` is on a GPU (see :func:`_check_identical`)."""
    return s.device.type != "cuda" if strict is None else strict


def first_difference(ids: torch.Tensor, reference: torch.Tensor) -> int | None:
    """Index of the first differing column (position in the sequence), None where equal."""
    n = min(ids.shape[-1], reference.shape[-1])
    diff = (ids[..., :n] != reference[..., :n]).reshape(-1, n).any(0).nonzero()
    if len(diff):
        return int(diff[0])
    return None if ids.shape == reference.shape else n


def divergence(ids: torch.Tensor, reference: torch.Tensor, trace: Any) -> dict[str, Any]:
    """Where a traced run's ids part from the reference: the step, the first sequence that parts
    there, and the gap between the top two final scores the trace recorded for it (a near tie in
    bf16 flips on the last bit of a sum)."""
    col = first_difference(ids, reference)
    step = None if col is None else col - (reference.shape[-1] - trace.num_steps)
    out: dict[str, Any] = {"step": step}
    if step is not None and 0 <= step < trace.num_steps and ids.shape == reference.shape:
        a, b = ids.reshape(-1, ids.shape[-1]), reference.reshape(-1, reference.shape[-1])
        row = int((a[:, col] != b[:, col]).nonzero()[0])
        top = trace.steps[step].stages[-1].top
        vals = np.asarray(top.values, dtype=np.float64)[row]
        out["sequence"] = row
        out["top2_ids"] = [int(x) for x in np.asarray(top.ids)[row, :2]]
        out["top2_gap"] = float(vals[0] - vals[1]) if vals.shape[0] > 1 else None
        out["reference_token"] = int(b[row, col])
    return out


def measure_overhead(
    s: Subject,
    *,
    new_tokens: int = NEW_TOKENS,
    repeats: int = 5,
    warmup: int = 1,
    configs: dict[str, Runner] | None = None,
    reruns: int = 1,
    strict: bool | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Time every configuration ``repeats`` times, interleaved, after ``warmup`` runs each.

    ``strict`` (default: unless on a GPU, see :func:`_check_identical`): a configuration that
    must not change the result raises where its ids differ from plain's; else each such run is
    recorded in its row's ``partings`` (the step, the gap between the two best scores there).

    A configuration whose rounds spread more than ``STABLE_SPREAD`` (benchmarks/spread.py) is
    timed again, ``repeats`` fresh rounds interleaved with fresh rounds of ``plain`` (both sides
    of its ratio come from the same period), up to ``reruns`` times; the fresh rounds replace
    the old ones.  A ratio whose rounds still disagree is not published: ``ratio`` is None and
    the row says ``unstable`` (its median ratio is kept as ``unstable_ratio``)."""
    configs = configs if configs is not None else configurations()
    if "plain" not in configs:
        raise ValueError("the configurations must include 'plain'")
    names = list(configs)
    times: dict[str, list[float]] = {k: [] for k in names}
    gpu: dict[str, list[int]] = {k: [] for k in names}
    identical: dict[str, bool] = {k: True for k in names}
    recorded: dict[str, int | None] = {k: None for k in names}
    errors: dict[str, str] = {}

    reference = None  # plain generate's ids: every configuration must produce them
    strict = _strict(s, strict)
    partings: dict[str, list[dict[str, Any]]] = {}

    def check(name: str, t: _Timed) -> bool:
        same = _check_identical(name, t.ids, reference, t.trace, new_tokens, strict=strict)
        if not same and t.trace is not None:
            partings.setdefault(name, []).append(divergence(t.ids, reference, t.trace))
        return same

    for _ in range(max(warmup, 1)):
        for name in ["plain", *[k for k in names if k != "plain"]]:
            try:
                t = _timed(configs[name], s, new_tokens)
            except AssertionError:
                raise
            except Exception as exc:  # noqa: BLE001 - a peer failing is a result, not a crash
                errors[name] = f"{type(exc).__name__}: {exc}"[:500]
                log(f"  {name}: failed ({errors[name][:120]})")
                continue
            reference = t.ids if reference is None else reference
            identical[name] &= check(name, t)
            if t.trace is not None:
                recorded[name] = trace_nbytes(t.trace)
    live = [k for k in names if k not in errors]

    def rounds(group: list[str], label: str) -> dict[str, list[float]]:
        got: dict[str, list[float]] = {k: [] for k in group}
        for r in range(repeats):
            gc.collect()
            order = group[r % len(group):] + group[: r % len(group)]  # rotate who goes first
            for name in order:
                t = _timed(configs[name], s, new_tokens)
                identical[name] &= check(name, t)
                got[name].append(t.seconds)
                if t.gpu_peak is not None:
                    gpu[name].append(t.gpu_peak)
                del t
            log(f"  {label}round {r + 1}/{repeats}: " + ", ".join(f"{k} {got[k][-1]:.2f}s" for k in group))
        return got

    times.update(rounds(live, ""))
    # the base of every ratio: plain's rounds of the period each configuration was (last) timed in
    base_times: dict[str, list[float]] = {k: times["plain"] for k in names}
    rerun_count: dict[str, int] = {k: 0 for k in names}
    for attempt in range(reruns):
        shaky = [k for k in live if k != "plain" and not (stable(times[k]) and stable(base_times[k]))]
        if not shaky:
            break
        log(f"  unstable (rounds spread > {STABLE_SPREAD:.0%}): {', '.join(shaky)}; timing them again")
        fresh = rounds(["plain", *shaky], f"re-run {attempt + 1}: ")
        for k in shaky:
            times[k], base_times[k] = fresh[k], fresh["plain"]
            rerun_count[k] += 1

    rows = {}
    for name in names:
        med = _median(times[name])
        base = _median(base_times[name])
        paired = [a / b for a, b in zip(times[name], base_times[name])]
        steady = stable(times[name]) and stable(base_times[name])
        ratio = (1.0 if name == "plain" else med / base) if med is not None and base else None
        rows[name] = {
            "description": DESCRIPTIONS.get(name, name),
            "times_s": times[name],
            "plain_times_s": base_times[name],
            "median_s": med,
            # rounds that disagree by more than 25% make the ratio unpublishable (benchmarks/spread.py)
            "ratio": ratio if steady or name == "plain" else None,
            "unstable_ratio": None if steady or name == "plain" else ratio,
            "paired_ratio_min": min(paired) if paired else None,
            "paired_ratio_max": max(paired) if paired else None,
            "spread": spread(times[name]),
            "stable": steady,
            "reruns": rerun_count[name],
            "tokens_per_s": new_tokens / med if med else None,
            "identical_to_plain": identical[name] if name not in errors else None,
            "partings": partings.get(name, []),  # on a GPU: where a run's ids parted from plain's
            "recorded_bytes": recorded[name],
            "gpu_peak_bytes": max(gpu[name]) if gpu[name] else None,
            "error": errors.get(name),
        }
    extra = {}
    if "attention" in rows and "hf_eager_attn" in rows:
        # each against plain's rounds of its own period; no figure from rounds that disagreed
        a, e = rows["attention"]["ratio"], rows["hf_eager_attn"]["ratio"]
        if a is not None and e is not None:
            extra["attention_vs_hf_eager_attn"] = a / e
    if "nnsight" not in configs:
        why = nnsight_available()
        extra["nnsight"] = why or "not run"
    return {"new_tokens": new_tokens, "repeats": repeats, "warmup": warmup, "configs": rows, **extra}


def measure_growth(
    s: Subject,
    *,
    sizes: tuple[int, ...] = GROWTH_SIZES,
    repeats: int = 5,
    long_repeats: int = 2,
    record: RecordConfig | None = None,
    strict: bool | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Light tracing against plain generate at several lengths: time, memory, size, save/load
    (``strict`` as in :func:`measure_overhead`; a row records whether light's ids were plain's).

    Lengths over 256 tokens run ``min(repeats, long_repeats)`` pairs (one in each order)."""
    record = record or RecordConfig()
    light = traced(record)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tracer-bench-") as tmp:
        for n in sizes:
            times: dict[str, list[float]] = {"plain": [], "light": []}
            rss: dict[str, list[int]] = {"plain": [], "light": []}
            gpu: dict[str, list[int]] = {"plain": [], "light": []}
            reference = None
            last_trace = None
            runs = repeats if n <= 256 else min(repeats, long_repeats)
            for r in range(runs):
                gc.collect()
                order = ("plain", "light") if r % 2 == 0 else ("light", "plain")
                for name in order:
                    t = _timed(run_plain if name == "plain" else light, s, n, track_rss=True)
                    if reference is None and name == "plain":
                        reference = t.ids
                    times[name].append(t.seconds)
                    assert t.rss is not None
                    rss[name].append(t.rss.delta)
                    if t.gpu_peak is not None:
                        gpu[name].append(t.gpu_peak)
                    if name == "light":
                        last_trace = t.trace
                        last_ids = t.ids
                    del t
            assert reference is not None and last_trace is not None
            same = _check_identical("light", last_ids, reference, last_trace, n, strict=_strict(s, strict))
            in_memory = trace_nbytes(last_trace)
            save_s, load_s = [], []
            path = Path(tmp) / f"light-{n}.trace"
            for _ in range(max(repeats, 3)):
                t0 = time.perf_counter()
                last_trace.save(path)
                save_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                loaded = tracer.load_trace(path)
                load_s.append(time.perf_counter() - t0)
            assert loaded.num_steps == n and np.array_equal(loaded.sequences, last_trace.sequences)
            disk = _dir_bytes(path)
            row = {
                "new_tokens": n,
                "plain_median_s": _median(times["plain"]),
                "light_median_s": _median(times["light"]),
                "ratio": _median(times["light"]) / _median(times["plain"]),
                "plain_peak_rss_delta_bytes": int(statistics.median(rss["plain"])),
                "light_peak_rss_delta_bytes": int(statistics.median(rss["light"])),
                "gpu_peak_plain_bytes": max(gpu["plain"]) if gpu["plain"] else None,
                "gpu_peak_light_bytes": max(gpu["light"]) if gpu["light"] else None,
                "trace_bytes_in_memory": in_memory,
                "trace_bytes_on_disk": disk,
                "disk_bytes_per_token": disk / n,
                "memory_bytes_per_token": in_memory / n,
                "runs": runs,
                "save_median_s": _median(save_s),
                "load_median_s": _median(load_s),
                "times_s": times,
                "identical_to_plain": same,
                "parting": None if same else divergence(last_ids, reference, last_trace),
            }
            rows.append(row)
            log(f"  {n} tokens: ratio {row['ratio']:.3f}, trace {disk / 1024:.0f} KiB on disk")
            del last_trace, loaded
    # Linear growth: the bytes each extra token adds stay constant between sizes.
    increments = [
        (b["trace_bytes_on_disk"] - a["trace_bytes_on_disk"]) / (b["new_tokens"] - a["new_tokens"])
        for a, b in zip(rows, rows[1:])
    ]
    linear = bool(increments) and max(increments) <= 1.1 * min(increments) and min(increments) > 0
    return {
        "repeats": repeats,
        "record": record.to_dict(),
        "rows": rows,
        "incremental_disk_bytes_per_token": increments,
        "disk_size_linear_in_tokens": linear if len(rows) > 1 else None,
    }


def measure_budget(s: Subject, *, max_bytes: int = 64 * 1024, new_tokens: int = NEW_TOKENS, repeats: int = 3) -> dict[str, Any]:
    """A too-small attention budget must raise ``MemoryBudgetError`` before any forward pass."""
    forwards = 0

    def count(*_: Any) -> None:
        nonlocal forwards
        forwards += 1

    record = RecordConfig(attention=True, max_bytes=max_bytes)
    attn_before = s.model.config._attn_implementation
    handle = s.model.register_forward_pre_hook(count)
    times, message = [], ""
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            try:
                with tracer.trace(s.model, s.tokenizer, record=record):
                    s.model.generate(**s.inputs, **s.gen_kwargs(new_tokens))
            except MemoryBudgetError as exc:
                times.append(time.perf_counter() - t0)
                message = str(exc)
            else:
                raise AssertionError(f"RecordConfig(attention=True, max_bytes={max_bytes}) did not raise")
    finally:
        handle.remove()
    assert forwards == 0, f"the model ran {forwards} forward passes before MemoryBudgetError"
    assert s.model.config._attn_implementation == attn_before, "the attention implementation was not restored"
    return {
        "max_bytes": max_bytes,
        "new_tokens": new_tokens,
        "raised": True,
        "forward_passes_before_raise": forwards,
        "median_ms": 1000 * statistics.median(times),
        "message": message,
    }


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tracer": tracer.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import nnsight

        info["nnsight"] = nnsight.__version__
    except Exception:  # noqa: BLE001
        info["nnsight"] = None
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _mib(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**20:.2f} MiB"


def _f(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def render_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    out = [
        "# tracer overhead benchmark",
        "",
        f"{m['date']} · {m['device_name']} ({m['device']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads) · "
        f"torch {m['torch']} · transformers {m['transformers']} · {m['platform']}"
        + (f" · load average {m['load_average_at_start'][0]:.1f} at start" if m.get("load_average_at_start") else "")
        + (f", {m['load_average_at_end'][0]:.1f} at end" if m.get("load_average_at_end") else ""),
        "",
        "Median wall time of one whole `generate` call (traced: including the `with tracer.trace` block's "
        "finish), configurations interleaved in one process; ratio = median / median(plain) of the same run. "
        "Greedy, `min_new_tokens = max_new_tokens`, one fixed chat prompt. ✓ = output ids equal plain "
        "generate's (asserted for tracer's configurations and `hf_scores`).",
    ]
    for sub in results["subjects"]:
        out += ["", f"## {sub['name']}", "", sub.get("description", "")]
        if sub.get("error"):
            out += ["", f"Not run: {sub['error']}"]
            continue
        ov = sub.get("overhead")
        if ov:
            gpu = any(r["gpu_peak_bytes"] is not None for r in ov["configs"].values())
            out += [
                "",
                f"### Overhead ({ov['new_tokens']} new tokens, {ov['repeats']} interleaved runs after {ov['warmup']} warm-up)",
                "",
                "| configuration | what | median s | × plain | range of paired × | tokens/s | recorded | same ids |"
                + (" GPU peak |" if gpu else ""),
                "|---|---|---:|---:|---:|---:|---:|:---:|" + ("---:|" if gpu else ""),
            ]
            for name, r in ov["configs"].items():
                if r["error"]:
                    out.append(f"| {name} | {r['description']} | failed: {r['error'][:160]} | | | | | |" + (" |" if gpu else ""))
                    continue
                same = {True: "✓", False: "✗ (differs)", None: "–"}[r["identical_to_plain"]]
                rng = (
                    f"{r['paired_ratio_min']:.2f}–{r['paired_ratio_max']:.2f}"
                    if name != "plain" and r["paired_ratio_min"] is not None
                    else ""
                )
                out.append(
                    f"| {name} | {r['description']} | {_f(r['median_s'], '.3f')} | {_ratio_cell(r)} | {rng} | "
                    f"{_f(r['tokens_per_s'], '.1f')} | {_mib(r['recorded_bytes']) if r['recorded_bytes'] else '–'} | {same} |"
                    + (f" {_mib(r['gpu_peak_bytes'])} |" if gpu else "")
                )
            notes = []
            if "attention_vs_hf_eager_attn" in ov:
                notes.append(
                    f"tracer `attention` (all layers, sdpa kept) / HF eager `output_attentions`: "
                    f"**{ov['attention_vs_hf_eager_attn']:.2f}×**"
                )
            if "nnsight" in ov:
                notes.append(f"nnsight: {ov['nnsight']}")
            light = ov["configs"].get("light", {}).get("ratio")
            att = ov["configs"].get("attention", {}).get("ratio")
            if light is not None:
                notes.append(f"light target ≤ {TARGET_LIGHT:.2f}×: {'met' if light <= TARGET_LIGHT else 'NOT met'} ({light:.2f}×)")
            if att is not None:
                notes.append(f"attention target ≤ {TARGET_ATTENTION:.2f}×: {'met' if att <= TARGET_ATTENTION else 'NOT met'} ({att:.2f}×)")
            out += [""] + [f"- {n}" for n in notes]
        gr = sub.get("growth")
        if gr:
            gpu = any(r["gpu_peak_light_bytes"] is not None for r in gr["rows"])
            out += [
                "",
                "### Growth of light tracing (plain/light interleaved, runs per length: "
                + ", ".join(f"{r['new_tokens']}: {r.get('runs', gr['repeats'])}" for r in gr["rows"]) + ")",
                "",
                "| new tokens | plain s | light s | × plain | peak RSS Δ plain | peak RSS Δ light | trace in memory | "
                "on disk | disk B/token | save s | load s |" + (" GPU peak plain | GPU peak light |" if gpu else ""),
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if gpu else ""),
            ]
            for r in gr["rows"]:
                out.append(
                    f"| {r['new_tokens']} | {r['plain_median_s']:.2f} | {r['light_median_s']:.2f} | **{r['ratio']:.2f}×** | "
                    f"{_mib(r['plain_peak_rss_delta_bytes'])} | {_mib(r['light_peak_rss_delta_bytes'])} | "
                    f"{_mib(r['trace_bytes_in_memory'])} | {_mib(r['trace_bytes_on_disk'])} | "
                    f"{r['disk_bytes_per_token']:.0f} | {r['save_median_s']:.3f} | {r['load_median_s']:.3f} |"
                    + (f" {_mib(r['gpu_peak_plain_bytes'])} | {_mib(r['gpu_peak_light_bytes'])} |" if gpu else "")
                )
            inc = ", ".join(f"{x:.0f}" for x in gr["incremental_disk_bytes_per_token"])
            parted = [r for r in gr["rows"] if r.get("identical_to_plain") is False]
            out += [
                "",
                *[f"- {r['new_tokens']} tokens: light's ids parted from plain's (on a GPU: recorded, not raised) "
                  f"at {r['parting']}" for r in parted],
                f"- bytes each extra token adds on disk between lengths: {inc or '–'} → "
                f"linear: {gr['disk_size_linear_in_tokens']}",
                "- peak RSS Δ: resident memory sampled every 5 ms during the call, minus the RSS before it "
                "(median over runs).",
            ]
        bu = sub.get("budget")
        if bu:
            out += [
                "",
                "### Memory budget",
                "",
                f"`RecordConfig(attention=True, max_bytes={bu['max_bytes']})` with {bu['new_tokens']} new tokens raised "
                f"`MemoryBudgetError` after **{bu['median_ms']:.1f} ms** with "
                f"{bu['forward_passes_before_raise']} forward passes run: “{bu['message'][:200]}…”",
            ]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def _resolve_device(choice: str) -> torch.device:
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                "overhead.py: error: --device cuda was asked for but CUDA is not available "
                f"(torch {torch.__version__}, cuda build {torch.version.cuda}); use --device cpu or auto"
            )
        return torch.device("cuda")
    if choice == "cpu":
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _ratio_cell(r: dict[str, Any]) -> str:
    """The published ratio, or why there is none: rounds that still disagreed after re-running."""
    if r.get("ratio") is None and r.get("unstable_ratio") is not None:
        worst = max(r["spread"], spread(r.get("plain_times_s") or []))  # its own rounds or plain's
        return f"unstable (rounds spread {worst:.0%}, re-run {r.get('reruns', 0)}×): not published"
    return f"**{_f(r.get('ratio'), '.2f')}×**"


def run_subject(
    s: Subject, *, repeats: int, new_tokens: int, sizes: tuple[int, ...], growth_repeats: int, log: Callable[[str], None],
    result: dict[str, Any] | None = None, on_section: Callable[[], Any] = lambda: None,
) -> dict[str, Any]:
    """Overhead, growth and budget of one subject, into ``result``; ``on_section()`` after each
    (main saves the report there: a run cut short keeps the sections it finished)."""
    result = {} if result is None else result
    result.update(name=s.name, description=s.description)
    log(f"{s.name}: overhead ({new_tokens} tokens × {repeats} rounds)")
    result["overhead"] = measure_overhead(s, new_tokens=new_tokens, repeats=repeats, log=log)
    on_section()
    log(f"{s.name}: growth {sizes}")
    result["growth"] = measure_growth(s, sizes=sizes, repeats=growth_repeats, log=log)
    on_section()
    log(f"{s.name}: memory budget")
    result["budget"] = measure_budget(s, new_tokens=new_tokens)
    on_section()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats and no 1024-token growth run")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved runs per configuration (default 5, quick 3)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's own). On a CPU shared with other busy processes, "
        "--threads 1 avoids OpenMP threads spinning against them (10x slower runs were seen here)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = _resolve_device(args.device)
    repeats = args.repeats or (3 if args.quick else 5)
    sizes = QUICK_GROWTH_SIZES if args.quick else GROWTH_SIZES
    growth_repeats = 3  # plain and light alternate; 1024 tokens is ~40 s a run on a 2-core CPU

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results: dict[str, Any] = {
        "machine": machine_info(device),
        "settings": {
            "prompt": PROMPT,
            "new_tokens": NEW_TOKENS,
            "repeats": repeats,
            "growth_sizes": list(sizes),
            "growth_repeats": growth_repeats,
            "quick": args.quick,
        },
        "subjects": [],
    }
    builders: list[tuple[str, Callable[[torch.device], Subject]]] = [("SmolLM2-135M-Instruct", embedded_subject)]
    if device.type == "cuda":
        builders.append(("Llama-3-8B-shaped (random weights)", llama3_8b_shaped_subject))
    def save() -> str:
        """latest.json and latest.md as they stand: written after every section, so a run cut
        short (a lent GPU's time limit, a late failure) keeps the sections it finished"""
        md = render_markdown(results)
        args.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out / "latest.json", results, indent=1)
        (args.out / "latest.md").write_text(md, encoding="utf-8")
        return md

    for name, build in builders:
        try:
            s = build(device)
        except Exception as exc:  # noqa: BLE001 - e.g. the embedded model's wheel missing on a GPU box
            if device.type != "cuda":
                raise
            log(f"{name}: cannot build: {exc}")
            results["subjects"].append({"name": name, "error": f"{type(exc).__name__}: {exc}"[:500]})
            continue
        entry: dict[str, Any] = {"name": name}
        results["subjects"].append(entry)
        run_subject(s, repeats=repeats, new_tokens=NEW_TOKENS, sizes=sizes, growth_repeats=growth_repeats, log=log,
                    result=entry, on_section=save)
        del s
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_at_end"] = list(os.getloadavg())
    md = save()
    print(md)
    print(f"wrote {args.out / 'latest.json'} and {args.out / 'latest.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
