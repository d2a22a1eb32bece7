"""Corpus tracing with vLLM: ``tracer run --use-vllm --dataset DIR`` / :func:`trace_corpus_vllm`.

Prompts are built by the same code as the transformers path (``tracer.session.encode_prompts``:
chat template, system prompt, special tokens) and given to vLLM as token ids, so both engines
see the very same prompt tokens.  Each batch goes to ``LLM.generate`` as one call (vLLM batches
continuously inside it) through :func:`tracer.vllm_generate`; its Traces become rows and one part
of the dataset before the next batch starts.  The dataset's engine is ``vllm`` (a dataset never
mixes engines; compare two datasets instead)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .data import CorpusError
from .dataset import CorpusDataset, CorpusWriter, open_dataset
from .engine import chunks, corpus_meta, load_items

__all__ = ["trace_corpus_vllm", "run_vllm_corpus", "SCHEMA"]

SCHEMA = "vllm-1"


def _token_prompts(tokenizer: Any, prompts: list[Any], chat: bool | None, system: str | None) -> tuple[list, list[str]]:
    from ..session import encode_prompts

    texts, enc = encode_prompts(tokenizer, prompts, chat=chat, system=system)
    ids = [row[mask.bool()].tolist() for row, mask in zip(enc["input_ids"], enc["attention_mask"])]
    return [{"prompt_token_ids": i} for i in ids], texts


def trace_corpus_vllm(llm: Any, prompts: Any, *, dataset: str | Path, sampling: dict[str, Any] | None = None,
                      batch_size: int = 64, chat: bool | None = None, system: str | None = None, record: Any = None,
                      trace_dir: str | Path | None = None, on_batch: Callable[[int, int], None] | None = None,
                      extra_meta: dict[str, Any] | None = None) -> CorpusDataset:
    """Every prompt through the vLLM engine ``llm`` (traced), in batches, into ``dataset``.

    ``sampling``: ``SamplingParams`` keyword arguments (default: greedy, 64 tokens, the
    tokenizer's terminators as stop ids).  Resume and refusals as :func:`tracer.trace_corpus`."""
    from vllm import SamplingParams

    from ..backends.vllm import vllm_generate
    from ..backends.vllm_convert import sampling_dict
    from ..config import RecordConfig
    from ..models import terminators
    from .rows import trace_rows

    if batch_size < 1:
        raise CorpusError(f"batch_size must be at least 1, got {batch_size}")
    items = load_items(prompts)
    record = record or RecordConfig()
    tok = llm.get_tokenizer()
    config = {"max_tokens": 64, "temperature": 0.0, "stop_token_ids": terminators(tok), **(sampling or {})}
    sp = SamplingParams(**config)
    settings = sampling_dict(sp)
    mc = llm.llm_engine.model_config
    meta = corpus_meta(engine="vllm", model=str(getattr(mc, "model", "")), dtype=str(getattr(mc, "dtype", "")).replace(
        "torch.", ""), settings=settings, chat=chat, system=system, batch_size=batch_size, record=record.to_dict(),
        schema=SCHEMA, extra=extra_meta)
    writer = CorpusWriter(dataset, meta)
    done = writer.done_ids()
    todo = [it for it in items if it.id not in done]
    tdir = Path(trace_dir) if trace_dir is not None else None
    if tdir is not None:
        tdir.mkdir(parents=True, exist_ok=True)
    for n, batch in enumerate(chunks(todo, batch_size)):
        token_prompts, texts = _token_prompts(tok, [it.prompt for it in batch], chat, system)
        traces = vllm_generate(llm, token_prompts, sp, record=record)
        if len(traces) != len(batch):
            raise CorpusError(f"vLLM returned {len(traces)} sequences for {len(batch)} prompts (n > 1 is not supported)")
        seq_rows, step_rows = [], []
        for k, (it, tr) in enumerate(zip(batch, traces)):
            tr.prompts = [texts[k]]
            files = None
            if tdir is not None:
                files = [str(tr.save(tdir / f"{writer.run_id}-{n:05d}-{k:03d}.trace"))]
            s, st = trace_rows(tr, [it.id], [it.text], engine="vllm", settings=settings, trace_files=files)
            for row in s:
                row["batch_size"] = len(batch)
            seq_rows += s
            step_rows += st
        writer.write(seq_rows, step_rows)
        if on_batch is not None:
            on_batch(len(batch), 0)
    return open_dataset(dataset)


def run_vllm_corpus(args: Any, items: list, *, on_batch: Callable[[int, int], None] | None = None) -> CorpusDataset:
    """``tracer run --use-vllm --dataset DIR``: the engine from the same flags as ``--use-vllm``."""
    import os

    from ..backends.vllm_cli import generation_config, llm_kwargs

    if getattr(args, "record_attention", False):
        raise CorpusError("--record-attention is not available with --use-vllm (vLLM does not expose attention)")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        from vllm import LLM
    except ImportError as exc:
        raise CorpusError(f"--use-vllm needs vLLM ({exc}): pip install 'tracer[vllm]'") from None
    llm = LLM(**llm_kwargs(args))
    config = generation_config(args, llm.get_tokenizer())
    return trace_corpus_vllm(llm, items, dataset=args.dataset, sampling=config, batch_size=args.batch_size,
                             chat=args.with_prompt, system=args.system, trace_dir=args.trace_dir, on_batch=on_batch)
