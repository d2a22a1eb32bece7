"""Command line: ``tracer run`` (generate, traced or not) and ``tracer inspect FILE``.

Heavy imports (torch, transformers, the recorder) happen inside the commands so that
``tracer --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

DEFAULT_PROMPTS = ("为什么要减少污染，保护环境？", "你有什么建议？")


class CliError(Exception):
    """An error reported as one line on stderr with exit code 2."""


@dataclass
class Result:
    """One prompt's outcome, for the summary table and the predictions file."""

    prompt: str
    output: str
    new_tokens: int
    stop_reason: str
    time_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.time_s if self.time_s > 0 else 0.0


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tracer", description="Trace what a causal LM does while it generates."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="generate answers to prompts, recording a trace of each")
    src = run.add_argument_group("model")
    src.add_argument("--model", default=None, help="model folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    src.add_argument("--tokenizer", default=None, help="tokenizer: 'llama-3', 'smollm2' or a path (default: the model's)")
    src.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")
    src.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    src.add_argument("--attn-implementation", default=None, help="e.g. sdpa, eager (default: transformers' default)")
    src.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes 4-bit (CUDA only)")
    src.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes 8-bit (CUDA only)")

    io = run.add_argument_group("prompts and outputs")
    io.add_argument("--data-file", type=Path, default=None, help="UTF-8 file with one prompt per line")
    io.add_argument("--with-prompt", action="store_true", help="wrap each prompt in the chat template")
    io.add_argument("--interactive", action="store_true", help="read prompts from stdin until an empty line or EOF")
    io.add_argument("--predictions-file", type=Path, default=None, help='write a JSON list of {"input", "output"}')

    gen = run.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="default: 128")
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--repetition-penalty", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0, help="transformers.set_seed before each prompt (default: 0)")

    tr = run.add_argument_group("tracing")
    tr.add_argument("--trace-dir", type=Path, default=None, help="save one trace per prompt in this folder")
    tr.add_argument("--record-attention", action="store_true", help="record attention for all layers")
    tr.add_argument("--no-trace", action="store_true", help="plain model.generate, no recording")
    run.set_defaults(func=cmd_run)

    insp = sub.add_parser("inspect", help="print a summary of a saved trace")
    insp.add_argument("file", type=Path, help="a trace file or folder")
    insp.set_defaults(func=cmd_inspect)
    return parser


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    if not args.file.exists():
        raise FileNotFoundError(f"no such trace: {args.file}")
    try:
        from tracer.export import inspect_trace
    except ImportError as exc:
        raise CliError(f"trace inspection is not available: {exc}") from exc
    print(inspect_trace(args.file))
    return 0


def _generate_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    for name in ("temperature", "top_k", "top_p", "repetition_penalty"):
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = value
    return kwargs


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.data_file is None:
        return list(DEFAULT_PROMPTS)
    if not args.data_file.is_file():
        raise FileNotFoundError(f"data file not found: {args.data_file}")
    lines = args.data_file.read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise CliError(f"data file has no prompts: {args.data_file}")
    return prompts


def _stdin_prompts() -> Iterator[str]:
    tty = sys.stdin.isatty()
    while True:
        if tty:
            print("prompt> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():  # EOF or empty line
            return
        yield line.strip()


def cmd_run(args: argparse.Namespace) -> int:
    if args.no_trace and (args.trace_dir is not None or args.record_attention):
        raise CliError("--no-trace cannot be combined with --trace-dir or --record-attention")
    prompts: Iterable[str] = _stdin_prompts() if args.interactive else _read_prompts(args)
    trace_api = None if args.no_trace else _trace_api()

    from tqdm.auto import tqdm

    from tracer.models import load_model

    model, tokenizer = load_model(
        args.model,
        dtype=args.dtype,
        device=args.device,
        attn_implementation=args.attn_implementation,
        load_in_4bit=args.load_in_4bit,
        load_in_8bit=args.load_in_8bit,
        tokenizer=args.tokenizer,
    )
    gen_kwargs = _generate_kwargs(args)
    if args.trace_dir is not None:
        args.trace_dir.mkdir(parents=True, exist_ok=True)

    results: list[Result] = []
    bar = tqdm(prompts, desc="prompts", unit="prompt", file=sys.stderr, disable=args.interactive, leave=False)
    for index, prompt in enumerate(bar):
        import transformers

        transformers.set_seed(args.seed)
        if trace_api is None:
            result = _run_plain(model, tokenizer, prompt, args.with_prompt, gen_kwargs)
        else:
            result = _run_traced(trace_api, model, tokenizer, prompt, index, args, gen_kwargs)
        results.append(result)
        if args.interactive:
            print(result.output, flush=True)
        else:
            tqdm.write(f"[{index}] {prompt}\n{result.output}\n", file=sys.stdout)
        for note in result.notes:
            print(f"tracer: note: {note}", file=sys.stderr)
    bar.close()

    if args.predictions_file is not None:
        _write_predictions(args.predictions_file, results)
    if results:
        print(format_summary(results))
    return 0


def _trace_api():
    try:
        from tracer import RecordConfig, trace_generate
    except ImportError as exc:
        raise CliError(f"tracing is not available in this installation ({exc}); use --no-trace") from exc
    return trace_generate, RecordConfig


def _run_plain(model, tokenizer, prompt: str, chat: bool, gen_kwargs: dict[str, Any]) -> Result:
    """Plain ``generate`` with the very inputs and defaults ``trace_generate`` would use."""
    import torch

    from tracer.hooks import prepare_generate

    _, inputs, kwargs = prepare_generate(model, tokenizer, prompt, chat=chat, **gen_kwargs)
    stops = kwargs.get("eos_token_id") or []
    stops = [stops] if isinstance(stops, int) else list(stops)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, **kwargs)
    elapsed = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    stop_reason = "max_length"
    if new and new[-1] in stops:
        stop_reason = f"eos:{tokenizer.convert_ids_to_tokens(new[-1])}"
    # A max_length cut can split a multi-byte character: drop its replacement char.
    text = tokenizer.decode(new, skip_special_tokens=True).strip().rstrip("\ufffd")
    return Result(prompt, text, len(new), stop_reason, elapsed)


def _run_traced(trace_api, model, tokenizer, prompt, index, args, gen_kwargs) -> Result:
    trace_generate, RecordConfig = trace_api
    start = time.perf_counter()
    trace = trace_generate(
        model,
        tokenizer,
        prompt,
        chat=args.with_prompt,
        record=RecordConfig(attention=args.record_attention),
        **gen_kwargs,
    )
    elapsed = time.perf_counter() - start
    total = getattr(trace, "total_time_s", None)
    result = Result(
        prompt=prompt,
        # a max_length cut can split a multi-byte character: drop its replacement char
        output=trace.generated_text[0].strip().rstrip("\ufffd"),
        new_tokens=int(trace.num_new_tokens[0]),
        stop_reason=str(trace.stop_reasons[0]),
        time_s=float(total) if total is not None else elapsed,
    )
    if args.trace_dir is not None:
        base = args.trace_dir / f"prompt_{index:03d}"
        trace.save(base.with_suffix(".trace"))
        for method, suffix in (("to_html", ".html"), ("to_perfetto", ".perfetto.json")):
            try:
                getattr(trace, method)(base.with_suffix(suffix))
            except (AttributeError, NotImplementedError) as exc:
                result.notes.append(f"skipped {method} for prompt {index}: {exc or 'not implemented'}")
    return result


def _write_predictions(path: Path, results: Sequence[Result]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = [{"input": r.prompt, "output": r.output} for r in results]
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _truncate(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_summary(results: Sequence[Result], width: int = 32) -> str:
    """A plain-text table: prompt, new tokens, stop reason, time, tokens/s."""
    header = ("#", "prompt", "new tokens", "stop reason", "time s", "tokens/s")
    rows = [
        (str(i), _truncate(r.prompt, width), str(r.new_tokens), r.stop_reason, f"{r.time_s:.2f}", f"{r.tokens_per_s:.1f}")
        for i, r in enumerate(results)
    ]
    widths = [max(len(h), *(_display_width(row[c]) for row in rows)) for c, h in enumerate(header)]
    right = {0, 2, 4, 5}

    def fmt(row: Sequence[str]) -> str:
        cells = []
        for c, cell in enumerate(row):
            pad = " " * (widths[c] - _display_width(cell))
            cells.append(pad + cell if c in right else cell + pad)
        return "  ".join(cells).rstrip()

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(row) for row in rows]
    return "\n".join(lines)


def _display_width(text: str) -> int:
    """Terminal columns: East Asian wide/full-width characters take two."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [CliError, FileNotFoundError]
    try:
        from tracer.models import ModelLoadError

        errors.append(ModelLoadError)
    except ImportError:
        pass
    for module in ("tracer", "tracer.storage"):
        try:
            errors.append(getattr(__import__(module, fromlist=["TraceFormatError"]), "TraceFormatError"))
            break
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("tracer: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, _user_errors()):
            print(f"tracer: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
