"""The corpus through vLLM (``tracer run --use-vllm --dataset DIR``): batched ``LLM.generate``
traced by :func:`tracer.vllm_generate`, each finished Trace turned into the same ``sequences``
and ``steps`` rows as the ``generate`` engine (:mod:`.rows`).  vLLM traces hold one stage (the
sampled distribution's top-k log-probs, no per-processor rows): ``processors`` is empty and
``final_*`` equal the raw columns.  A dataset never mixes engines (schema ``vllm-1``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from .data import CorpusError, PromptItem
from .dataset import CorpusDataset, CorpusWriter, open_dataset
from .engine import chunks, corpus_meta, load_items

__all__ = ["trace_corpus_vllm", "run_vllm_corpus", "SCHEMA"]

SCHEMA = "vllm-1"


def token_prompts(tokenizer: Any, items: list[PromptItem], chat: bool | None, system: str | None) -> list[dict]:
    """The one place corpus prompts become vLLM inputs: the same code as the transformers path
    (``tracer.session.encode_prompts``: chat template, system prompt, special tokens), given to
    vLLM as token ids, so both engines see the very same prompt tokens."""
    from ..session import encode_prompts

    if not chat and any(not isinstance(it.prompt, str) for it in items):
        raise CorpusError("a prompt holds chat messages: pass chat=True")
    _, enc = encode_prompts(tokenizer, [it.prompt for it in items], chat=chat, system=system)
    return [{"prompt_token_ids": row[mask.bool()].tolist()} for row, mask in zip(enc["input_ids"], enc["attention_mask"])]


def trace_corpus_vllm(llm: Any, prompts: Any, sampling_params: Any, *, dataset: str | Path, batch_size: int = 64,
                      chat: bool | None = None, system: str | None = None, record: Any = None,
                      settings: dict[str, Any] | None = None,
                      on_batch: Callable[[int, int], None] | None = None) -> CorpusDataset:
    """Every prompt through the vLLM engine ``llm`` (traced), ``batch_size`` requests per
    ``LLM.generate`` call, each call's rows written as one part as it finishes (resume as
    :func:`tracer.trace_corpus`).  ``settings``: what to record as the generation settings
    (default: the ``SamplingParams`` fields that matter)."""
    from ..backends.vllm import engine_facts, vllm_generate
    from ..config import RecordConfig
    from .rows import trace_rows

    if batch_size < 1:
        raise CorpusError(f"batch_size must be at least 1, got {batch_size}")
    items = load_items(prompts)
    record = record or RecordConfig()
    tok = llm.get_tokenizer()
    facts = engine_facts(llm)
    if settings is None:
        settings = {k: getattr(sampling_params, k, None) for k in
                    ("max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop_token_ids")}
    settings = {k: (list(v) if isinstance(v, (set, tuple)) else v) for k, v in settings.items()}
    meta = corpus_meta(engine="vllm", model=str(getattr(facts, "model", "") or ""), dtype=str(getattr(facts, "dtype", "")).replace("torch.", ""),
                       settings=settings, chat=chat, system=system, batch_size=batch_size, record=record.to_dict(),
                       schema=SCHEMA, extra={"tensor_parallel_size": getattr(facts, "tensor_parallel_size", 1)})
    writer = CorpusWriter(dataset, meta)
    try:
        for batch in chunks(writer.pending(items), batch_size):
            start = time.perf_counter()
            inputs = token_prompts(tok, batch, chat, system)
            traces = vllm_generate(llm, inputs, sampling_params, record=record)
            seq_rows, step_rows = [], []
            for it, tr in zip(batch, traces):
                s, st = trace_rows(tr, [it.id], [it.text], engine="vllm", settings=settings)
                for row in s:
                    row["batch_size"] = len(batch)
                seq_rows += s
                step_rows += st
            writer.write(seq_rows, step_rows)
            if on_batch is not None:
                on_batch(len(batch), int(time.perf_counter() - start))
    finally:
        writer.close()
    return open_dataset(dataset)


def run_vllm_corpus(args: Any, items: list[PromptItem], *, on_batch: Callable[[int, int], None] | None = None):
    """``tracer run --use-vllm --dataset DIR``: the engine from the same flags as ``--use-vllm``."""
    import os

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from ..backends.vllm_cli import generation_config, llm_kwargs, start_engine

    llm_kwargs(args)  # the flags' refusals, before the import
    try:
        from vllm import SamplingParams
    except ImportError as exc:
        raise CorpusError(f"--use-vllm needs vLLM, which is not installed ({exc})") from None
    llm = start_engine(args)
    config = generation_config(args, llm.get_tokenizer())
    return trace_corpus_vllm(llm, items, SamplingParams(**config), dataset=args.dataset, batch_size=args.batch_size,
                             chat=args.with_prompt, system=args.system, settings=config, on_batch=on_batch)
