"""``tracer run``: the seed's inference script, traced.

Order of work: parse → apply ``--preset`` → validate every option and every file/folder
(:mod:`tracer.cli.validation`) → load the model → generate prompt after prompt, writing each
answer to the predictions file as it finishes.  Heavy imports happen inside functions so that
``tracer --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from .common import (DEFAULT_PROMPTS, PRESETS, VLLM_PRESETS, CliError, Interrupted, Result, format_summary,
                     hold_interrupts, shown)
from .outputs import PredictionsWriter, partial_trace_said, save_partial_trace, save_trace_files
from .progress import progress_wanted, token_progress
from .validation import (
    check_device,
    check_generation,
    check_gpus,
    check_output_file,
    check_output_folder,
    check_text,
    read_prompt_file,
)

__all__ = ["Runner", "add_run_parser", "apply_preset", "cmd_run", "generation_settings", "stdin_prompts"]

#: Where ``--use-vllm`` looks for its backend: a module with ``run_vllm(args, prompts, emit)``.
VLLM_MODULE = "tracer.backends.vllm_cli"
VLLM_HINT = "pip install 'tracer[vllm]'"


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------


class _Explicit(argparse.Action):
    """Store the value and remember that the user gave this option (presets yield to it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.explicit = frozenset(getattr(namespace, "explicit", frozenset()) | {self.dest})


class _ExplicitBool(argparse.BooleanOptionalAction):
    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        namespace.explicit = frozenset(getattr(namespace, "explicit", frozenset()) | {self.dest})


def add_run_parser(sub: Any) -> argparse.ArgumentParser:
    run = sub.add_parser(
        "run",
        help="generate answers to prompts, recording a trace of each",
        description="Generate answers to prompts (the seed's inference script), recording a trace of each. "
        "Every option and file is checked before the model loads; errors print one 'tracer: error:' "
        "line and exit with status 2 (130 on Ctrl-C).",
    )
    src = run.add_argument_group("model")
    src.add_argument("--model", default=None, help="model folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    src.add_argument("--tokenizer", default=None, help="tokenizer: 'llama-3', 'smollm2' or a path (default: the model's)")
    src.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")
    src.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto: mps > cuda > cpu, as the seed)")
    src.add_argument("--gpus", default=None, metavar="IDS", help="visible GPUs, e.g. 0 or 0,1 (sets CUDA_VISIBLE_DEVICES)")
    src.add_argument("--attn-implementation", default=None, help="e.g. sdpa, eager (default: transformers' default)")
    src.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes 4-bit (nf4; runs on CPU and CUDA with bitsandbytes >= 0.49)")
    src.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes 8-bit (LLM.int8; runs on CPU and CUDA with bitsandbytes >= 0.49)")
    src.add_argument("--use-vllm", action="store_true", help=f"generate with vLLM (needs the vllm extra: {VLLM_HINT})")
    src.add_argument("--engine", choices=("transformers", "llama.cpp"), default="transformers",
                     help="llama.cpp: run the GGUF file on llama.cpp (needs: pip install 'tracer[llamacpp]')")
    src.add_argument("--gguf", type=Path, default=None, help="GGUF file for --engine llama.cpp (default: the embedded one)")

    io = run.add_argument_group("prompts and outputs")
    io.add_argument("--data-file", type=Path, default=None, help="UTF-8 file with one prompt per line")
    io.add_argument("--with-prompt", action="store_true", help="wrap each prompt in the chat template")
    io.add_argument("--system", action=_Explicit, default=None, metavar="TEXT",
                    help="system prompt for the chat template (needs --with-prompt; --preset seed: the seed's)")
    io.add_argument("--interactive", action="store_true", help="read prompts from stdin until an empty line or EOF")
    io.add_argument("--multi-turn", action="store_true",
                    help="one conversation: each prompt is a turn, answered with the whole history "
                    "(reusing the previous turn's cache); implies --with-prompt")
    io.add_argument("--predictions-file", type=Path, default=None,
                    help='JSON list of {"Input", "Output"} (the seed\'s keys), rewritten after every answer; '
                    "generation_config.json (what the engine got) is written beside it")

    gen = run.add_argument_group("generation")
    gen.add_argument("--preset", choices=sorted(PRESETS), default=None,
                     help="seed: the seed script's settings for each engine (sampling, temperature 0.2, top-k 40, "
                     "top-p 0.9, 400 new tokens, its system prompt; generate: repetition penalty 1.1; --use-vllm: "
                     "presence penalty 1.0 and its stop strings instead); explicit flags override")
    gen.add_argument("--max-new-tokens", type=int, action=_Explicit, default=128, help="at least 1 (default: 128)")
    gen.add_argument("--do-sample", action=_ExplicitBool, default=False, help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, action=_Explicit, default=None, help="> 0 when sampling")
    gen.add_argument("--top-k", type=int, action=_Explicit, default=None, help=">= 0 (0: off)")
    gen.add_argument("--top-p", type=float, action=_Explicit, default=None, help="in (0, 1]")
    gen.add_argument("--repetition-penalty", type=float, action=_Explicit, default=None,
                     help="> 0 (1: off); on both engines (vLLM's has the same definition)")
    gen.add_argument("--presence-penalty", type=float, action=_Explicit, default=None,
                     help="in [-2, 2] (0: off); --use-vllm only (transformers' generate has none)")
    gen.add_argument("--seed", type=int, default=0, help="transformers.set_seed before each prompt (default: 0)")

    tr = run.add_argument_group("tracing")
    tr.add_argument("--trace-dir", type=Path, default=None, help="save one trace per prompt (or turn) in this folder")
    tr.add_argument("--record-attention", action="store_true", help="record attention for all layers")
    tr.add_argument("--no-trace", action="store_true", help="plain model.generate, no recording")
    tr.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="per-token progress bar on stderr (default: when stderr is a terminal)")
    from tracer.corpus.cli import add_run_options  # the corpus options (--dataset, --batch-size, --ray)

    add_run_options(run)
    run.set_defaults(func=cmd_run, explicit=frozenset())
    return run


def apply_preset(args: argparse.Namespace) -> None:
    """Fill the preset's values for the chosen engine into every option the user did not give
    explicitly (``--use-vllm``: :data:`VLLM_PRESETS` over :data:`PRESETS`)."""
    if getattr(args, "preset", None) is None:
        return
    explicit = getattr(args, "explicit", frozenset())
    values = dict(PRESETS[args.preset])
    if getattr(args, "use_vllm", False):
        values.update(VLLM_PRESETS.get(args.preset, {}))
    for name, value in values.items():
        if name not in explicit:
            setattr(args, name, value)


def generation_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``generate`` keyword arguments the options ask for (after the preset)."""
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": bool(args.do_sample)}
    for name in ("temperature", "top_k", "top_p", "repetition_penalty"):
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = value
    return kwargs


def stdin_prompts() -> Iterator[str]:
    """Lines from stdin until an empty line or EOF (a ``prompt>`` marker on a terminal)."""
    tty = sys.stdin.isatty()
    number = 0
    while True:
        if tty:
            print("prompt> ", end="", file=sys.stderr, flush=True)
        number += 1
        try:
            line = sys.stdin.readline()
        except UnicodeDecodeError:  # (stdin decoding strictly: a UTF-8 locale)
            raise CliError(f"stdin is not valid UTF-8 text (at or after its line {number}); give it as UTF-8") from None
        if not line or not line.strip():
            return
        yield check_text(line.strip(), f"stdin line {number}")


# --------------------------------------------------------------------------------------------
# Validation (before the model loads)
# --------------------------------------------------------------------------------------------


def _validate(args: argparse.Namespace) -> Iterable[str]:
    """Check everything that can be checked without the model; return the prompts."""
    apply_preset(args)
    if args.no_trace and (args.trace_dir is not None or args.record_attention):
        raise CliError("--no-trace cannot be combined with --trace-dir or --record-attention")
    if args.interactive and args.data_file is not None:
        raise CliError("--interactive reads prompts from stdin; leave out --data-file (or --interactive)")
    if args.load_in_4bit and args.load_in_8bit:
        raise CliError("choose one of --load-in-4bit and --load-in-8bit")
    if args.multi_turn:
        args.with_prompt = True
        if args.use_vllm:
            raise CliError("--multi-turn is not supported with --use-vllm (it reuses the transformers cache)")
    if args.system is not None:
        check_text(args.system, "--system")
    if args.system is not None and not args.with_prompt:
        if "system" in args.explicit:
            raise CliError("--system applies to the chat template: add --with-prompt")
        args.system = None  # the preset's system prompt, as the seed, only with the template
    if getattr(args, "presence_penalty", None) is not None and not args.use_vllm:
        raise CliError("--presence-penalty is a vLLM option (add --use-vllm); transformers' generate has no "
                       "presence penalty: use --repetition-penalty")
    check_generation(args)
    args.gpu_ids = check_gpus(args.gpus)
    if args.gpu_ids is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, args.gpu_ids))  # before CUDA starts
    check_device(args.device)
    prompts: Iterable[str]
    if args.interactive:
        prompts = stdin_prompts()
    elif args.data_file is not None:
        prompts = read_prompt_file(args.data_file)
    else:
        prompts = list(DEFAULT_PROMPTS)
    if args.trace_dir is not None:
        check_output_folder(args.trace_dir, "--trace-dir")
    if args.predictions_file is not None:
        check_output_file(args.predictions_file, "--predictions-file")
    return prompts


def _vllm_backend() -> Any:
    """The vLLM backend module, or one clear error naming the ``vllm`` extra."""
    try:
        importlib.import_module("vllm")
        return importlib.import_module(VLLM_MODULE)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or exc
        raise CliError(f"--use-vllm needs the vLLM backend ({shown(missing)} is not installed): {VLLM_HINT}") from None


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    if getattr(args, "dataset", None) is not None and getattr(args, "engine", "transformers") == "llama.cpp":
        raise CliError("--dataset runs the transformers or vLLM engine; --engine llama.cpp traces one prompt at a time (no corpus yet)")
    if getattr(args, "dataset", None) is None:
        from tracer.corpus.cli import refuse_corpus_options

        refuse_corpus_options(args)
    if getattr(args, "engine", "transformers") == "llama.cpp":
        return importlib.import_module("tracer.backends.llamacpp_cli").cmd_run_llamacpp(args)
    if getattr(args, "gguf", None) is not None:
        raise CliError("--gguf is for --engine llama.cpp (the transformers path takes a .gguf file as --model)")
    if getattr(args, "dataset", None) is not None:  # a whole prompt set into one dataset
        from tracer.corpus.cli import cmd_run_corpus

        return cmd_run_corpus(args)
    prompts = _validate(args)
    writer = PredictionsWriter(args.predictions_file)
    interactive = args.interactive

    def emit(index: int, result: Result) -> None:
        writer.add(result)
        if interactive:
            print(result.output, flush=True)
        else:
            print(f"[{index}] {result.prompt}\n{result.output}\n", flush=True)
        for note in result.notes:
            print(f"tracer: note: {shown(note, 400)}", file=sys.stderr)

    runner: Runner | None = None
    try:
        if args.use_vllm:
            backend = _vllm_backend()
            backend.run_vllm(args, prompts, on_result=lambda i, r: emit(i, Result(**r)),
                             on_config=writer.write_generation_config)
        else:
            runner = Runner(args)
            writer.write_generation_config(runner.generation_config())
            if args.multi_turn:
                from .chat import run_conversation

                run_conversation(runner, prompts, emit)
            else:
                for index, prompt in enumerate(prompts):
                    emit(index, runner.run_prompt(prompt, index))
    except KeyboardInterrupt:
        hold_interrupts()
        _print_summary(writer)
        raise Interrupted(_saved(writer, runner)) from None
    except CliError as exc:
        raise CliError(_where(runner) + str(exc) + _saved_suffix(writer)) from exc
    except Exception as exc:  # noqa: BLE001 - every late failure is one line, and nothing is lost
        kind = "" if _is_tracer_error(exc) else f"{type(exc).__name__}: "
        raise CliError(f"{_where(runner)}{kind}{exc}{_saved_suffix(writer)}") from exc
    _print_summary(writer)
    return 0


def _is_tracer_error(exc: BaseException) -> bool:
    """Errors whose message already says what is wrong (no exception type needed)."""
    from tracer.models import ModelLoadError
    from tracer.records import TracerError

    return isinstance(exc, (ModelLoadError, TracerError))


def _print_summary(writer: PredictionsWriter) -> None:
    if writer.results:
        print(format_summary(writer.results), flush=True)


def _where(runner: "Runner | None") -> str:
    return f"{runner.current}: " if runner is not None and runner.current else ""


def _saved(writer: PredictionsWriter, runner: "Runner | None") -> str:
    parts = [f"{len(writer.results)} answer(s) finished"]
    if writer.path is not None and writer.results:
        parts[0] += f", saved in {shown(writer.path)}"
    if runner is not None and runner.partial_trace is not None:
        parts.append(partial_trace_said(runner.current, runner.partial_trace))
    return "; ".join(parts)


def _saved_suffix(writer: PredictionsWriter) -> str:
    if writer.path is not None and writer.results:
        return f" ({len(writer.results)} finished answer(s) saved in {shown(writer.path)})"
    return ""


# --------------------------------------------------------------------------------------------
# One generation (traced or plain)
# --------------------------------------------------------------------------------------------


class Runner:
    """The loaded model and everything one ``generate`` call needs; used by ``run`` and by the
    multi-turn conversation (:mod:`tracer.cli.chat`)."""

    def __init__(self, args: argparse.Namespace):
        from tracer.models import load_model

        self.args = args
        self.current = ""  # "prompt 3" / "turn 2": named in errors
        self.partial_trace: Path | None = None
        self.model, self.tokenizer = load_model(
            args.model, dtype=args.dtype, device=args.device, attn_implementation=args.attn_implementation,
            load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit, tokenizer=args.tokenizer,
        )
        if args.with_prompt and not getattr(self.tokenizer, "chat_template", None):
            raise CliError("--with-prompt: this tokenizer has no chat template")
        self.settings = generation_settings(args)
        self.traced = not args.no_trace
        self.progress = progress_wanted(args.progress)

    def generation_config(self) -> dict[str, Any]:
        """What ``generation_config.json`` holds: the settings passed to ``generate``
        (terminators and pad included), as ``GenerationConfig.to_diff_dict()`` writes them."""
        from transformers import GenerationConfig

        from tracer.session import default_terminators

        kwargs = dict(self.settings)
        stops = default_terminators(self.model, self.tokenizer)
        if stops:
            kwargs["eos_token_id"] = stops
        if self.tokenizer.pad_token_id is not None:
            kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        return GenerationConfig(**kwargs).to_diff_dict()

    def prepare(self, prompt: Any, *, chat: bool, system: str | None = None):
        from tracer.session import prepare_generate

        return prepare_generate(self.model, self.tokenizer, prompt, chat=chat, system=system, **self.settings)

    def run_prompt(self, prompt: str, index: int) -> Result:
        self.current = f"prompt {index}"
        texts, inputs, kwargs = self.prepare(prompt, chat=self.args.with_prompt, system=self.args.system)
        result, _ = self.generate(prompt, texts, inputs, kwargs, name=f"prompt_{index:03d}",
                                  desc=f"prompt {index}")
        return result

    def generate(self, prompt: str, texts: list[str], inputs: dict, kwargs: dict, *, name: str, desc: str,
                 extra: dict[str, Any] | None = None) -> tuple[Result, Any]:
        """One ``generate`` call; returns the result and generate's output (with the cache)."""
        import torch
        import transformers

        args = self.args
        transformers.set_seed(args.seed)
        kwargs = {**kwargs, **(extra or {}), "return_dict_in_generate": True}
        streamer = token_progress(kwargs["max_new_tokens"], desc) if self.progress else None
        if streamer is not None:
            kwargs["streamer"] = streamer
        trace = None
        start = time.perf_counter()
        try:
            if self.traced:
                trace, output = self._traced(texts, inputs, kwargs, name)
            else:
                with torch.inference_mode():
                    output = self.model.generate(**inputs, **kwargs)
        finally:
            if streamer is not None:
                streamer.bar.close()
        elapsed = time.perf_counter() - start
        new = output.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        # A max_length cut can split a multi-byte character: drop its replacement char.
        text = self.tokenizer.decode(new, skip_special_tokens=True).strip().rstrip("\ufffd")
        if trace is not None:
            stop = str(trace.stop_reasons[0])
            total = getattr(trace, "total_time_s", None)
            elapsed = float(total) if total is not None else elapsed
        else:
            stop = self._stop_reason(new, kwargs.get("eos_token_id"))
        result = Result(prompt, text, len(new), stop, elapsed, token_ids=tuple(new))
        if trace is not None and args.trace_dir is not None:
            result.notes += save_trace_files(trace, args.trace_dir / name)
        return result, output

    def _traced(self, texts: list[str], inputs: dict, kwargs: dict, name: str):
        from tracer import RecordConfig, trace

        session = trace(self.model, self.tokenizer, record=RecordConfig(attention=self.args.record_attention))
        try:
            with session:
                session.pending_prompts = texts
                output = self.model.generate(**inputs, **kwargs)
        except KeyboardInterrupt:
            # the session kept the steps so far (meta.status "interrupted"): save them
            if session.traces and self.args.trace_dir is not None:
                self.partial_trace = save_partial_trace(session.traces[-1], self.args.trace_dir / name)
            raise
        return session.trace, output

    def _stop_reason(self, new: list[int], stops: Any) -> str:
        from tracer.records import StopReason

        stops = [stops] if isinstance(stops, int) else list(stops or [])
        terminators = {int(i): self.tokenizer.convert_ids_to_tokens(int(i)) for i in stops}
        return str(StopReason.from_last_token(new[-1] if new else None, terminators))


# Public names for the other engines' command lines (llama.cpp): one validation, one summary.
validate_run_args = _validate
print_summary = _print_summary
saved_suffix = _saved_suffix
