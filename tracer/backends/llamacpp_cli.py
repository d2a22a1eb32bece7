"""``tracer run --engine llama.cpp [--gguf PATH]``: the same command on llama.cpp, traced.

Prompt ids are built by the project's one prompt rule (:func:`prompt_ids`, the function the
``generate`` path uses, on the tokenizer converted from the same GGUF) and fed to llama.cpp as
token ids, so both engines see the same ids.  The flags mean what they mean on ``generate``:
greedy unless ``--do-sample``; sampling takes transformers' defaults for what is not given
(temperature 1, top-k 50, top-p 1) and runs llama.cpp's samplers in ``generate``'s order
(penalty, temperature, top-k, top-p); ``--repetition-penalty`` covers the prompt and every
generated token, as in transformers.  Flags llama.cpp cannot honour are refused before
anything loads.  ``--multi-turn`` keeps one llama.cpp context: each turn evaluates only the
tokens after the longest prefix already in the KV cache (checked token by token), recorded per
turn (``backend_info["reused_tokens"]``, ``trace.cache.reused_len``).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from ..cli.common import CliError, Interrupted, Result, hold_interrupts, shown
from .llamacpp import INSTALL_HINT

#: transformers' global defaults for what a sampling run does not set (the embedded model's
#: generation_config.json sets none of them).
HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
N_CTX = 4096
#: llama.cpp's "no seed" value (``LLAMA_DEFAULT_SEED``): its dist sampler then draws one at random.
LLAMA_DEFAULT_SEED = 0xFFFFFFFF
INT32_MAX = 2**31 - 1  # llama.cpp's top-k is an int32_t


def check_args(args: Any) -> Path | None:
    """The flags llama.cpp cannot honour and the GGUF file given (None: the embedded one)."""
    refuse = [
        (args.use_vllm, "--use-vllm"),
        (args.load_in_4bit or args.load_in_8bit, "--load-in-4bit/--load-in-8bit (bitsandbytes, transformers only)"),
        (args.attn_implementation is not None, "--attn-implementation (a transformers option)"),
        (str(args.dtype).lower() not in ("auto",), "--dtype (the GGUF file fixes the weights' types)"),
        (str(args.device).lower() not in ("auto", "cpu"), "--device other than cpu (this build of llama.cpp is CPU-only)"),
        (args.gpus is not None, "--gpus (this build of llama.cpp is CPU-only)"),
        (args.record_attention, "--record-attention (llama.cpp does not expose attention)"),
        (args.model is not None, "--model (give the GGUF file with --gguf)"),
        (args.tokenizer is not None, "--tokenizer (the prompt ids come from the GGUF's own tokenizer)"),
    ]
    bad = [name for cond, name in refuse if cond]
    if bad:
        raise CliError(f"--engine llama.cpp cannot honour {bad[0]}; leave it out")
    if getattr(args, "presence_penalty", None) is not None:
        raise CliError("--engine llama.cpp cannot honour --presence-penalty (it runs generate's sampling chain: "
                       "use --repetition-penalty, or the vLLM engine, --use-vllm, without --engine llama.cpp)")
    gguf = Path(args.gguf) if args.gguf is not None else None
    if gguf is not None and (not gguf.is_file() or gguf.suffix.lower() != ".gguf"):
        raise CliError(f"--gguf {shown(gguf)}: not a .gguf file")
    return gguf


def check_installed(gguf: Path | None) -> Path:
    """The bindings are installed (after every check of the flags); the GGUF path."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise CliError(f"--engine llama.cpp needs llama-cpp-python, which is not installed: {INSTALL_HINT}")
    if gguf is None:
        from .llamacpp import default_gguf

        gguf = Path(default_gguf())
    return gguf


def check_sampling(args: Any) -> None:
    """After the preset is applied (``--preset seed`` turns sampling on): what llama.cpp's
    sampler cannot take as given."""
    if args.do_sample and int(args.seed) == LLAMA_DEFAULT_SEED:
        raise CliError(f"--engine llama.cpp cannot honour --seed {LLAMA_DEFAULT_SEED}: it is llama.cpp's "
                       "LLAMA_DEFAULT_SEED, for which llama.cpp samples with a random seed of its own; "
                       "give another seed")
    if args.do_sample and args.top_k is not None and args.top_k > INT32_MAX:
        raise CliError(f"--engine llama.cpp cannot honour --top-k {args.top_k}: llama.cpp's top-k is a 32-bit "
                       f"integer (at most {INT32_MAX}); any value from the vocabulary's size up keeps every token")


def sampling_settings(args: Any) -> dict[str, Any]:
    """``llamacpp_generate`` keyword arguments for the flags (after the preset)."""
    rep = float(args.repetition_penalty) if args.repetition_penalty is not None else 1.0
    kw: dict[str, Any] = {
        "max_tokens": int(args.max_new_tokens), "seed": int(args.seed), "order": "transformers",
        "repeat_penalty": rep, "frequency_penalty": 0.0, "presence_penalty": 0.0,
        "penalty_last_n": N_CTX, "penalize_prompt": rep != 1.0,
        "min_p": 0.0, "typical_p": 1.0,
    }
    if args.do_sample:
        for name, default in HF_SAMPLING_DEFAULTS.items():
            value = getattr(args, name)
            kw[name] = default if value is None else value
    else:  # greedy: llama.cpp's greedy sampler after the penalty, as generate's greedy search
        kw.update(temperature=0.0, top_k=0, top_p=1.0)
    return kw


def prompt_ids(tokenizer: Any, prompt: Any, *, chat: bool, system: str | None) -> tuple[str, list[int]]:
    """(prompt text, ids): the ``generate`` path's prompt rule (:func:`tracer.session.encode_prompts`)."""
    from tracer.session import encode_prompts

    texts, encoded = encode_prompts(tokenizer, prompt, chat=chat, system=system)
    return texts[0], [int(i) for i in encoded["input_ids"][0].tolist()]


def load(gguf: Path, seed: int) -> tuple[Any, Any]:
    """(``llama_cpp.Llama`` on ``gguf``, the HF tokenizer converted from the same file)."""
    from llama_cpp import Llama

    from tracer.models import embedded_model_path, load_tokenizer
    from .llamacpp import default_gguf

    same = Path(gguf).resolve() == Path(default_gguf()).resolve()
    tokenizer = load_tokenizer(str(embedded_model_path() if same else gguf))
    llm = Llama(model_path=str(gguf), n_ctx=N_CTX, seed=seed, verbose=False)
    return llm, tokenizer


def cmd_run_llamacpp(args: Any) -> int:
    """``tracer run --engine llama.cpp``: checks, then the prompts (or turns) one by one."""
    from ..cli.outputs import PredictionsWriter, partial_trace_said
    from ..cli.run import print_summary, saved_suffix, validate_run_args

    gguf = check_args(args)
    prompts = validate_run_args(args)
    check_sampling(args)
    gguf = check_installed(gguf)
    writer = PredictionsWriter(args.predictions_file)

    def emit(index: int, result: Result) -> None:
        writer.add(result)
        if args.interactive:
            print(result.output, flush=True)
        else:
            print(f"[{index}] {result.prompt}\n{result.output}\n", flush=True)
        for note in result.notes:
            print(f"tracer: note: {shown(note, 400)}", file=sys.stderr)

    where = [""]
    try:
        llm, tokenizer = load(gguf, int(args.seed))
        if args.with_prompt and not getattr(tokenizer, "chat_template", None):
            raise CliError("--with-prompt: this tokenizer has no chat template")
        settings = sampling_settings(args)
        writer.write_generation_config({"engine": "llama.cpp", "gguf": str(gguf), **settings})
        try:
            run_prompts(llm, tokenizer, args, prompts, settings, emit, where)
        finally:
            llm.close()
    except KeyboardInterrupt as stop:
        hold_interrupts()
        print_summary(writer)
        done = f"{len(writer.results)} answer(s) finished"
        if writer.path is not None and writer.results:
            done += f", saved in {shown(writer.path)}"
        partial = getattr(stop, "partial_trace", None)
        if partial is not None:
            done += "; " + partial_trace_said(where[0].rstrip(": "), partial)
        raise Interrupted(done) from None
    except CliError as exc:
        raise CliError(where[0] + str(exc) + saved_suffix(writer)) from exc
    except Exception as exc:  # noqa: BLE001 - every late failure is one line, and nothing is lost
        from tracer.records import TracerError

        kind = "" if isinstance(exc, TracerError) else f"{type(exc).__name__}: "
        raise CliError(f"{where[0]}{kind}{exc}{saved_suffix(writer)}") from exc
    print_summary(writer)
    return 0


def run_prompts(llm: Any, tokenizer: Any, args: Any, prompts: Iterable[str], settings: dict[str, Any],
                emit: Callable[[int, Result], None], where: list[str]) -> None:
    """Each prompt alone, or (``--multi-turn``) each prompt a turn of one conversation."""
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] \
        if args.multi_turn and args.system is not None else []
    for index, text in enumerate(prompts):
        where[0] = f"{'turn' if args.multi_turn else 'prompt'} {index}: "
        notes: list[str] = []
        if args.multi_turn:
            messages.append({"role": "user", "content": text})
            shown_text, ids = prompt_ids(tokenizer, list(messages), chat=True, system=None)
            cached = [int(t) for t in llm._input_ids.tolist()]
            same = next((i for i, (a, b) in enumerate(zip(cached, ids)) if a != b), min(len(cached), len(ids)))
            if index and same < len(cached):
                notes.append(f"turn {index}: the re-rendered history differs from the evaluated tokens at token "
                             f"{same} of {len(cached)}; llama.cpp keeps the {same} tokens before it and evaluates "
                             "the rest")
        else:
            shown_text, ids = prompt_ids(tokenizer, text, chat=args.with_prompt, system=args.system)
        name = f"{'turn' if args.multi_turn else 'prompt'}_{index:03d}"
        result, trace = run_one(llm, args, text, shown_text, ids, settings, name)
        result.notes[:0] = notes
        if args.multi_turn:
            # the answer as generated (not stripped), so that re-rendering it gives the same tokens
            new = list(result.token_ids)
            messages.append({"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True)})
        emit(index, result)


def run_one(llm: Any, args: Any, prompt: str, shown_text: str, ids: list[int], settings: dict[str, Any],
            name: str) -> tuple[Result, Any]:
    start = time.perf_counter()
    kind, index = name.rsplit("_", 1)
    bar = _progress_bar(args, settings, f"{kind} {int(index)}")
    try:
        return _run_one(llm, args, prompt, shown_text, ids, settings, name, start,
                        None if bar is None else (lambda step, token: bar.update(1)))
    finally:
        if bar is not None:
            bar.close()


def _progress_bar(args: Any, settings: dict[str, Any], desc: str) -> Any:
    """``--progress`` (default: when stderr is a terminal): a bar of new tokens, as on the
    transformers engine; llama.cpp calls it after each step (no effect on what is chosen)."""
    from tracer.cli.progress import progress_wanted

    if not progress_wanted(getattr(args, "progress", None)):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=int(settings["max_tokens"]), desc=desc, unit="tok", file=sys.stderr, leave=False,
                dynamic_ncols=True, mininterval=0.1)


def _run_one(llm: Any, args: Any, prompt: str, shown_text: str, ids: list[int], settings: dict[str, Any],
             name: str, start: float, on_token: Any) -> tuple[Result, Any]:
    from tracer import RecordConfig
    from tracer.cli.outputs import save_partial_trace, save_trace_files

    from .llamacpp import CONTEXT_CUT, InterruptedRun, llamacpp_complete, llamacpp_generate

    if args.no_trace:  # the same loop, nothing recorded
        [done] = llamacpp_complete(llm, [ids], on_token=on_token, **settings)
        text = done.text.strip().rstrip("\ufffd")
        notes = list(done.notes)  # (a max_tokens cut)
        if args.multi_turn:
            notes.append(f"llama.cpp KV cache: {done.reused} of {len(ids)} prompt tokens reused")
        return Result(prompt, text, len(done.tokens), str(done.stop_reason), done.time_s, notes=notes,
                      token_ids=tuple(done.tokens)), done
    try:
        [trace] = llamacpp_generate(llm, [ids], record=RecordConfig(), prompt_texts=[shown_text], on_token=on_token,
                                    **settings)
    except InterruptedRun as exc:
        stop = KeyboardInterrupt()
        if args.trace_dir is not None:
            stop.partial_trace = save_partial_trace(exc.trace, Path(args.trace_dir) / name)  # type: ignore[attr-defined]
        raise stop from None
    elapsed = time.perf_counter() - start
    new = [int(t) for t in trace.generated_ids()]
    info = trace.meta.backend_info
    text = trace.generated_text[0].strip().rstrip("\ufffd")
    notes = [n for n in trace.meta.notes if n.startswith(CONTEXT_CUT)]  # a max_tokens cut
    if args.multi_turn:
        notes.append(f"llama.cpp KV cache: {info['reused_tokens']} of {len(ids)} prompt tokens reused, "
                     f"{info['evaluated_prompt_tokens']} evaluated")
    result = Result(prompt, text, len(new), str(trace.stop_reasons[0]), trace.total_time_s or elapsed, notes=notes,
                    token_ids=tuple(new))
    if args.trace_dir is not None:
        result.notes += save_trace_files(trace, Path(args.trace_dir) / name)
    return result, trace
