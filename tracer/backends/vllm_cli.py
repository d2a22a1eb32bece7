"""``tracer run --use-vllm``: the seed script's vLLM path, traced.

The CLI calls :func:`run_vllm` with its parsed arguments and the prompts; it returns one dict
per prompt with the fields of the CLI's ``Result`` (``prompt, output, new_tokens, stop_reason,
time_s, notes``), and writes, as the seed does, the predictions JSON with
``generation_config.json`` beside it, plus one trace per prompt in ``--trace-dir``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from ..jsonio import write_json_atomic
from .vllm import INSTALL_HINT, VLLMNotInstalledError, stop_reason_text

#: The seed's stop strings; kept where the tokenizer's vocabulary has them.
SEED_STOP_STRINGS = ("<|eot_id|>", "<|end_of_text|>")


def _cli_error(message: str) -> Exception:
    try:
        from tracer.cli import CliError
    except ImportError:  # pragma: no cover - the CLI module always exists
        return RuntimeError(message)
    return CliError(message)


def llm_kwargs(args: Any) -> dict[str, Any]:
    """``LLM(...)`` arguments from the CLI flags (``--gpus 0,1`` → ``tensor_parallel_size=2``)."""
    from tracer.models import embedded_model_path, resolve_device, resolve_dtype

    model = str(args.model) if getattr(args, "model", None) else str(embedded_model_path())
    gpus = [g for g in str(getattr(args, "gpus", None) or "").split(",") if g.strip()]
    device = resolve_device("cuda" if gpus else getattr(args, "device", "auto"))
    # the transformers path's dtype rule ("auto": fp32 off CUDA), not vLLM's (it would pick bf16 on CPU)
    dtype = str(resolve_dtype(getattr(args, "dtype", "auto"), device)).removeprefix("torch.")
    kw: dict[str, Any] = {
        "model": model,
        "dtype": dtype,
        "tensor_parallel_size": max(len(gpus), 1),
        "seed": int(getattr(args, "seed", 0) or 0),
        "disable_log_stats": False,  # per-request timing for the traces and the summary
        # on CPU, vLLM's torch.compile warm-up costs ~100 s here before the first token
        "enforce_eager": device.type == "cpu",
    }
    tok = getattr(args, "tokenizer", None)
    if tok and Path(str(tok)).is_dir():
        kw["tokenizer"] = str(tok)
    elif tok:
        raise _cli_error(f"--use-vllm needs --tokenizer to be a tokenizer folder, not {tok!r}")
    if getattr(args, "load_in_4bit", False) or getattr(args, "load_in_8bit", False):
        raise _cli_error("--load-in-4bit/--load-in-8bit are bitsandbytes options of the transformers path, not --use-vllm")
    if getattr(args, "attn_implementation", None):
        raise _cli_error("--attn-implementation is a transformers option; vLLM picks its own attention backend")
    return kw


def stop_settings(tokenizer: Any) -> tuple[list[int], list[str]]:
    """(``stop_token_ids``: the terminators, ``stop``: the seed's stop strings the vocab has)."""
    from tracer.models import terminators

    vocab = tokenizer.get_vocab()
    return terminators(tokenizer), [s for s in SEED_STOP_STRINGS if s in vocab]


def generation_config(args: Any, tokenizer: Any) -> dict[str, Any]:
    """``SamplingParams(**generation_config)`` from the same flags as the transformers path.

    ``--repetition-penalty`` and ``--presence-penalty`` pass through as vLLM's own (both also
    apply when greedy); ``--preset seed`` set the seed's vLLM values before this
    (:data:`tracer.cli.common.VLLM_PRESETS`: presence penalty 1.0, no repetition penalty, its
    stop strings as it lists them)."""
    stop_ids, stops = stop_settings(tokenizer)
    preset_stops = getattr(args, "stop", None)
    if preset_stops is not None:
        stops = list(preset_stops)
    flags = {k: v for k, v in flag_config(args).items() if v is not None}
    config: dict[str, Any] = {k: flags[k] for k in ("max_tokens", "temperature", "seed")}
    config["stop_token_ids"] = stop_ids
    if stops:
        config["stop"] = stops
    config.update(flags)  # the rest, in the order the file always had
    return config


def flag_config(args: Any) -> dict[str, Any]:
    """The part of :func:`generation_config` the flags alone decide (no tokenizer: known before
    the engine starts); an option that adds nothing is ``None`` here (absent there)."""
    sampled = bool(args.do_sample)  # greedy ignores top-k/top-p in vLLM too; keep the file what was used
    return {
        "max_tokens": int(args.max_new_tokens),
        "temperature": (args.temperature if args.temperature is not None else 1.0) if sampled else 0.0,
        "seed": int(getattr(args, "seed", 0) or 0),
        **{flag: getattr(args, flag, None) if sampled else None for flag in ("top_k", "top_p")},
        **{flag: getattr(args, flag, None) for flag in ("repetition_penalty", "presence_penalty")},
    }


def prompt_requests(tokenizer: Any, prompts: Iterable[str], args: Any) -> list[dict[str, Any]]:
    """What ``llm.generate`` receives for ``prompts``: one ``TokensPrompt`` each, whose ids are
    :func:`tracer.prompts.build_prompt`'s, the very ids the transformers path feeds ``generate``
    (``--with-prompt`` and ``--system`` applied alike)."""
    from tracer.prompts import build_prompts

    chat = bool(getattr(args, "with_prompt", False))
    return [b.vllm() for b in build_prompts(tokenizer, prompts, chat=chat, system=getattr(args, "system", None))]


#: GiB of KV cache vLLM gets on CPU when ``VLLM_CPU_KVCACHE_SPACE`` is not set: vLLM's own
#: default asks for 92% of the node's memory and refuses to start on a machine that has less free.
CPU_KV_CACHE_GIB = (1, 4)  # at least 1, at most 4, a quarter of the memory available


def _available_gib() -> float:
    """``MemAvailable`` of /proc/meminfo in GiB (4.0 where there is none)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**20
    except (OSError, StopIteration, ValueError, IndexError):
        return 4.0


def cpu_kv_cache_gib() -> int:
    """``VLLM_CPU_KVCACHE_SPACE`` for a CPU engine when the user set none: a quarter of the
    memory available now, within :data:`CPU_KV_CACHE_GIB` (1 GiB holds ~22k tokens of the
    embedded model)."""
    low, high = CPU_KV_CACHE_GIB
    return max(low, min(high, int(_available_gib() // 4)))


def start_engine(args: Any) -> Any:
    """``vllm.LLM`` from the CLI flags (:func:`llm_kwargs`); on CPU the KV cache is sized by
    :func:`cpu_kv_cache_gib` unless ``VLLM_CPU_KVCACHE_SPACE`` is set.  A failed start is one
    CLI error naming the likely fix."""
    from vllm import LLM

    kw = llm_kwargs(args)
    gpus = str(getattr(args, "gpus", None) or "")
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus
    sized = kw["enforce_eager"] and not os.environ.get("VLLM_CPU_KVCACHE_SPACE")  # CPU (see llm_kwargs)
    if sized:  # for this engine only (its workers start inside LLM()): a later engine sizes its own
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_kv_cache_gib())
    space = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    try:
        return LLM(**kw)
    except Exception as exc:  # noqa: BLE001 - vLLM raises RuntimeError/ValueError/... from its engine core
        text = f"{type(exc).__name__}: {str(exc)[:300]}"
        hint = ""
        if kw["enforce_eager"] and ("memory" in str(exc).lower() or "initialization failed" in str(exc).lower()):
            hint = (f"; on CPU its KV cache takes VLLM_CPU_KVCACHE_SPACE={space} GiB"
                    f"{' (set by tracer: a quarter of the free memory)' if sized else ''}: set a smaller or larger value")
        raise _cli_error(f"vLLM's engine did not start ({text}){hint}") from exc
    finally:
        if sized:
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)


def run_vllm(
    args: Any,
    prompts: Iterable[str],
    tokenizer: Any = None,
    *,
    llm: Any = None,
    on_result: Callable[[int, dict[str, Any]], None] | None = None,
    on_config: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Generate with vLLM; return one ``Result``-like dict per prompt (see the module doc).

    A list of prompts goes to vLLM as one batch; any other iterable (``--interactive``) is run
    one prompt at a time.  ``llm``: an engine to reuse (tests); default: built from the flags.
    ``tokenizer`` defaults to the engine's own.  ``on_result(index, result)`` is called as
    results arrive.  ``on_config(config)``: when given, it receives the ``SamplingParams``
    arguments and the caller writes the predictions and ``generation_config.json`` itself (the
    ``tracer run`` command does, after every answer); else they are written at the end."""
    if getattr(args, "record_attention", False):
        raise _cli_error("--record-attention is not available with --use-vllm (vLLM does not expose attention)")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO lines would bury the CLI's output
    try:
        import vllm  # noqa: F401
        from vllm import SamplingParams
    except ImportError as exc:
        raise _cli_error(f"--use-vllm needs vLLM, which is not installed ({exc}); install the extra: {INSTALL_HINT}") from exc
    from tracer import RecordConfig
    from tracer.backends.vllm import engine_facts, traces_from_outputs, with_logprobs

    if llm is None:
        llm = start_engine(args)
    tok = tokenizer if tokenizer is not None else llm.get_tokenizer()
    config = generation_config(args, tok)
    if on_config is not None:
        on_config(config)
    sampling = SamplingParams(**config)
    trace = not getattr(args, "no_trace", False)
    record = RecordConfig()
    facts = engine_facts(llm) if trace else None
    trace_dir = getattr(args, "trace_dir", None)
    if trace_dir is not None:
        Path(trace_dir).mkdir(parents=True, exist_ok=True)

    batches: Iterable[list[str]] = [list(prompts)] if isinstance(prompts, (list, tuple)) else ([p] for p in prompts)
    results: list[dict[str, Any]] = []
    for batch in batches:
        if not batch:
            continue
        requests = prompt_requests(tok, batch, args)
        asked = with_logprobs(sampling, record.top_k) if trace else sampling
        start = time.perf_counter()
        outputs = llm.generate(requests, asked, use_tqdm=False)
        wall = time.perf_counter() - start
        traces = (traces_from_outputs(outputs, sampling, facts=facts, tokenizer=tok, record=record, wall_time_s=wall)
                  if trace else [None] * len(outputs))
        for prompt, out, tr in zip(batch, outputs, traces):
            index = len(results)
            comp = out.outputs[0]
            result = {
                "prompt": prompt,
                # a max_tokens cut can split a multi-byte character: drop its replacement char
                "output": comp.text.strip().rstrip("\ufffd"),
                "new_tokens": len(comp.token_ids),
                "stop_reason": str(stop_reason_text(comp.finish_reason, comp.stop_reason, list(comp.token_ids),
                                                    getattr(tok, "eos_token_id", None), tok)),
                "time_s": _request_seconds(out, wall),
                "notes": [],
            }
            if tr is not None and trace_dir is not None:  # the files every engine writes
                from tracer.cli.outputs import save_trace_files

                result["notes"] += save_trace_files(tr, Path(trace_dir) / f"prompt_{index:03d}")
            results.append(result)
            if on_result is not None:
                on_result(index, result)

    predictions = getattr(args, "predictions_file", None)
    if on_config is not None:
        pass  # the caller writes them
    elif predictions is not None:
        write_predictions(Path(predictions), results, config)
    elif trace_dir is not None:
        write_json_atomic(Path(trace_dir) / "generation_config.json", config)
    return results


def _request_seconds(out: Any, wall: float) -> float:
    """Seconds from scheduling to the last token (vLLM's request stats), else the batch wall time."""
    m = getattr(out, "metrics", None)
    if m is not None and getattr(m, "last_token_ts", 0.0) and getattr(m, "scheduled_ts", 0.0):
        return float(m.last_token_ts - m.scheduled_ts)
    return float(wall)


def write_predictions(path: Path, results: list[dict[str, Any]], config: dict[str, Any]) -> None:
    """The predictions JSON (``[{"Input", "Output"}]``, the seed's keys) and
    ``generation_config.json`` beside it (the ``SamplingParams(**config)`` arguments, as the seed
    writes them)."""
    write_json_atomic(path, [{"Input": r["prompt"], "Output": r["output"]} for r in results])
    write_json_atomic(path.parent / "generation_config.json", config)


__all__ = ["run_vllm", "start_engine", "cpu_kv_cache_gib", "llm_kwargs", "generation_config", "prompt_requests", "stop_settings", "write_predictions",
           "VLLMNotInstalledError"]
