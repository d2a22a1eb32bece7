"""Command line of the corpus layer: ``tracer run --dataset DIR`` and ``tracer compare DIR_A DIR_B``.

``tracer.cli.run`` and ``tracer.analysis.cli`` dispatch here early; everything that can be
checked without the model (options, the data file, the dataset folder, its engine and, on a
resume, the settings the options decide) is checked before the model loads, and each failure
is one ``tracer: error:`` line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..cli.common import CliError, Interrupted, hold_interrupts, shown
from .data import CorpusError, PromptItem, as_items, read_data_file
from .dataset import check_dataset_folder, check_known_identity, lock_dataset, open_dataset, pending, unlock_dataset

__all__ = ["add_run_options", "cmd_run_corpus", "cmd_compare_corpus", "refuse_corpus_options", "check_ray_address"]


def add_run_options(run: argparse.ArgumentParser) -> None:
    """The corpus options of ``tracer run`` (one group)."""
    g = run.add_argument_group("corpus (a whole prompt set into one dataset)")
    g.add_argument("--dataset", type=Path, default=None, metavar="DIR",
                   help="write a Parquet corpus dataset (sequences + steps tables); resumes: prompt ids "
                   "already there are skipped. --data-file may be JSONL with 'id' and 'prompt' or 'messages'")
    # (None: not given; a corpus option given without --dataset is refused, never ignored)
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"prompts per left-padded generate batch (default: {BATCH_SIZE})")
    g.add_argument("--ray", action="store_true",
                   help="shard the prompts over a Ray cluster (RAY_ADDRESS, else a local one) with Ray Data")
    g.add_argument("--ray-workers", type=int, default=None,
                   help=f"model replicas (Ray actors) with --ray (default: {RAY_WORKERS})")


BATCH_SIZE = 8
RAY_WORKERS = 2


def refuse_corpus_options(args: argparse.Namespace) -> None:
    """``tracer run`` without ``--dataset``: a corpus option given is refused, not ignored."""
    given = [flag for flag, on in (("--batch-size", getattr(args, "batch_size", None) is not None),
                                   ("--ray", getattr(args, "ray", False)),
                                   ("--ray-workers", getattr(args, "ray_workers", None) is not None)) if on]
    if given:
        raise CliError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to a corpus run: add --dataset DIR")


def _items(args: argparse.Namespace) -> list[PromptItem]:
    from ..cli.common import DEFAULT_PROMPTS

    if args.data_file is not None:
        return read_data_file(args.data_file)
    return as_items([(str(i + 1), p) for i, p in enumerate(DEFAULT_PROMPTS)])


def validate(args: argparse.Namespace) -> list[PromptItem]:
    """Every check possible before the model loads; returns the prompts."""
    from ..cli.run import apply_preset
    from ..cli.validation import check_device, check_generation, check_gpus, check_output_folder, check_text

    apply_preset(args)
    for flag, on in (("--interactive", args.interactive), ("--multi-turn", args.multi_turn),
                     ("--no-trace", args.no_trace), ("--predictions-file", args.predictions_file is not None)):
        if on:
            raise CliError(f"{flag} cannot be combined with --dataset (the dataset holds every answer)")
    args.batch_size = BATCH_SIZE if args.batch_size is None else args.batch_size
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.ray and args.use_vllm:
        raise CliError("--ray with --use-vllm is not supported: vLLM shards itself (see docs/corpus.md)")
    # RAY_ADDRESS set also runs on Ray (docs/corpus.md); never for vLLM
    args.use_ray = bool(args.ray or os.environ.get("RAY_ADDRESS")) and not args.use_vllm
    if args.ray_workers is not None and not args.use_ray:
        raise CliError("--ray-workers applies to --ray" + (" (not to --use-vllm)" if args.use_vllm else ""))
    args.ray_workers = RAY_WORKERS if args.ray_workers is None else args.ray_workers
    if args.use_ray and args.ray_workers < 1:
        raise CliError(f"--ray-workers must be at least 1, got {args.ray_workers}")
    if args.load_in_4bit and args.load_in_8bit:
        raise CliError("choose one of --load-in-4bit and --load-in-8bit")
    if args.system is not None:
        check_text(args.system, "--system")
    if args.system is not None and not args.with_prompt:
        if "system" in args.explicit:
            raise CliError("--system applies to the chat template: add --with-prompt")
        args.system = None
    if getattr(args, "presence_penalty", None) is not None and not args.use_vllm:
        raise CliError("--presence-penalty is a vLLM option (add --use-vllm); transformers' generate has no "
                       "presence penalty: use --repetition-penalty")
    check_generation(args)
    args.gpu_ids = check_gpus(args.gpus)
    if args.gpu_ids is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, args.gpu_ids))  # before CUDA starts
    check_device(args.device)
    for mod, extra in (("pyarrow", "corpus"), ("duckdb", "corpus")) + ((("ray", "ray"),) if args.use_ray else ()):
        try:
            __import__(mod)
        except ImportError:
            raise CliError(f"--dataset needs {mod}: pip install 'tracer[{extra}]'") from None
    items = _items(args)
    if not args.with_prompt and any(not isinstance(it.prompt, str) for it in items):
        first = next(it for it in items if not isinstance(it.prompt, str))
        raise CliError(f"prompt {first.id!r} (line {first.line}) holds chat messages: add --with-prompt")
    old = check_dataset_folder(args.dataset)
    engine = "vllm" if args.use_vllm else "transformers"
    if old is not None and old.get("engine") != engine:
        raise CliError(f"dataset {shown(args.dataset)} holds {old.get('engine')} rows (schema {old.get('schema')}); "
                       f"this run would add {engine} rows: use another folder")
    if old is not None:
        check_known_identity(args.dataset, old, *_known_identity(args))
    if args.trace_dir is not None:
        check_output_folder(args.trace_dir, "--trace-dir")
    if args.use_ray:
        check_ray_address(os.environ.get("RAY_ADDRESS"))
    lock_dataset(args.dataset)  # made if absent, proved writable, held until the run ends (cmd_run_corpus)
    args.dataset_locked = True
    pending(args.dataset, items)  # an id already there under another prompt: refused now
    return items


def check_ray_address(address: str | None, timeout: float = 10.0) -> None:
    """A ``host:port`` (or ``ray://host:port``) cluster address answers, before anything loads
    (ray.init would otherwise wait on an unreachable one for minutes)."""
    import socket

    if not address or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # a form ray.init reads itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise CliError(f"RAY_ADDRESS={shown(address)}: no Ray cluster answers there ({exc.strerror or exc}); "
                       "start one (ray start --head) or unset RAY_ADDRESS for a local cluster") from None


def _known_identity(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The dataset identity this run will record, as far as it is known before the model loads:
    ``(identity keys, generation settings)`` for :func:`check_known_identity`.

    Known from the options: the schema, ``chat`` and ``system`` (what every engine records), and
    the settings the flags give.  Known only once the model (or vLLM engine) is loaded, and so
    still compared by ``CorpusWriter`` after the load: ``model`` (the loaded config's name),
    ``dtype`` (``auto`` and quantization resolve on load), and the settings taken from the model
    and tokenizer (``pad_token_id`` and ``eos_token_id`` for generate; ``stop_token_ids`` and
    ``stop`` for vLLM)."""
    known: dict[str, Any] = {"chat": args.with_prompt, "system": args.system}
    if args.use_vllm:
        from ..backends.vllm_cli import flag_config
        from .vllm_engine import SCHEMA as VLLM_SCHEMA

        # run_vllm_corpus records generation_config(args, tokenizer): these flags' part of it
        return {**known, "schema": VLLM_SCHEMA}, flag_config(args)
    from .engine import SCHEMA

    # trace_corpus / trace_corpus_ray record resolved_settings(): the flags' generate kwargs,
    # then the seed, then pad/eos from the model and tokenizer (not known yet)
    settings = {name: None for name in ("temperature", "top_k", "top_p", "repetition_penalty")}
    settings.update(_settings(args))
    settings["seed"] = args.seed
    return {**known, "schema": SCHEMA}, settings


def cmd_run_corpus(args: argparse.Namespace) -> int:
    try:
        return _run_corpus(args)
    finally:
        if getattr(args, "dataset_locked", False):  # (taken by validate)
            args.dataset_locked = False
            unlock_dataset(args.dataset)


def _run_corpus(args: argparse.Namespace) -> int:
    try:
        items = validate(args)
    except CorpusError as exc:
        raise CliError(str(exc)) from None
    done_before = 0
    if (args.dataset / "corpus.json").exists():
        done_before = len(open_dataset(args.dataset))
    start = time.perf_counter()
    counter = {"n": 0}

    def on_batch(n: int, secs: int) -> None:
        counter["n"] += n
        print(f"tracer: {counter['n']} prompt(s) written to {shown(args.dataset)}", file=sys.stderr, flush=True)

    def saved() -> str:
        try:
            n = len(open_dataset(args.dataset))
        except Exception:  # noqa: BLE001
            return ""
        return f"{n} prompt(s) are saved in {shown(args.dataset)}"

    try:
        if args.use_vllm:
            from .vllm_engine import run_vllm_corpus

            ds = run_vllm_corpus(args, items, on_batch=on_batch)
        elif args.use_ray:
            from .ray_engine import trace_corpus_ray

            ds = trace_corpus_ray(items, dataset=args.dataset, load=_load_spec(args), workers=args.ray_workers,
                                  batch_size=args.batch_size, chat=args.with_prompt, system=args.system,
                                  seed=args.seed, record=_record(args), trace_dir=args.trace_dir,
                                  on_batch=on_batch, **_settings(args))
        else:
            from ..cli.run import Runner
            from .engine import trace_corpus

            runner = Runner(args)
            ds = trace_corpus(runner.model, runner.tokenizer, items, dataset=args.dataset,
                              batch_size=args.batch_size, chat=args.with_prompt, system=args.system,
                              seed=args.seed, record=_record(args), trace_dir=args.trace_dir,
                              on_batch=on_batch, **runner.settings)
    except KeyboardInterrupt:
        hold_interrupts()  # (a second Ctrl-C must not lose the count of what is saved)
        raise Interrupted(saved()) from None
    except (CliError, CorpusError) as exc:
        raise CliError(f"{exc}{'; ' + saved() if counter['n'] else ''}") from None
    except Exception as exc:  # noqa: BLE001 - one line, and say what is kept
        raise CliError(f"{type(exc).__name__}: {exc}{'; ' + saved() if counter['n'] else ''}") from exc
    total = len(ds)
    print(f"dataset {shown(args.dataset)}: {total} prompt(s) ({total - done_before} new, {done_before} already there), "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    return 0


def _record(args: argparse.Namespace):
    from ..config import RecordConfig

    return RecordConfig(attention=args.record_attention)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    from ..cli.run import generation_settings

    return generation_settings(args)


def _load_spec(args: argparse.Namespace) -> dict[str, Any]:
    """``tracer.load_model`` keyword arguments a Ray actor loads its replica with."""
    return dict(path=args.model, dtype=args.dtype, device=args.device, attn_implementation=args.attn_implementation,
                load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit, tokenizer=args.tokenizer)


def cmd_compare_corpus(args: argparse.Namespace) -> int:
    from .compare import compare_datasets

    for path in (args.a, args.b):
        if not Path(path).is_dir() or not (Path(path) / "corpus.json").is_file():
            raise CliError(f"{shown(path)} is not a corpus dataset: compare two datasets, or two traces")
    try:
        result = compare_datasets(args.a, args.b)
    except CorpusError as exc:
        raise CliError(str(exc)) from None
    print(result.text())
    if args.html is not None:
        args.html.parent.mkdir(parents=True, exist_ok=True)
        result.to_html(args.html)
        print(f"wrote {shown(args.html)}")
    return 0
