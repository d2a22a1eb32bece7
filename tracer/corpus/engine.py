"""``tracer.trace_corpus``: a prompt set through batched, traced ``generate`` into a dataset.

Each batch is left-padded and generated once inside ``tracer.trace`` (the same preparation
as :func:`tracer.trace_generate`, so an untraced run of the same batch generates the same
tokens); the finished Trace becomes rows (:mod:`.rows`) and one part of the dataset
(:mod:`.dataset`) before the next batch starts."""

from __future__ import annotations

import datetime as _dt
import platform
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .data import CorpusError, PromptItem, as_items, read_data_file
from .dataset import CorpusDataset, CorpusWriter, open_dataset

__all__ = ["trace_corpus", "prepare_batch", "batch_rows", "corpus_meta", "load_items", "SCHEMA"]

SCHEMA = "hf-1"  # steps/sequences columns of this engine (a dataset never mixes schemas)


def load_items(prompts: Any) -> list[PromptItem]:
    """A data file path, or Python prompts (see :func:`tracer.corpus.data.as_items`)."""
    if isinstance(prompts, (str, Path)) and Path(prompts).is_file():
        return read_data_file(prompts)
    if isinstance(prompts, str):
        raise CorpusError(f"data file not found: {prompts} (pass a list to give prompts directly)")
    return as_items(prompts)


def prepare_batch(model: Any, tokenizer: Any, prompts: Sequence[Any], *, chat: bool | None, system: str | None,
                  **generate_kwargs: Any):
    """The one place corpus prompts become ``generate`` inputs: (texts, inputs, kwargs).

    Same rules as ``tracer run``'s ``Runner.prepare`` (``tracer.session.prepare_generate``)."""
    from ..session import prepare_generate

    return prepare_generate(model, tokenizer, list(prompts), chat=chat, system=system, **generate_kwargs)


def model_name(model: Any) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "_name_or_path", "") or getattr(cfg, "name_or_path", "") or type(model).__name__)


def model_dtype(model: Any) -> str:
    """The weights' dtype, with the bitsandbytes quantization when there is one (part of a
    dataset's identity: a resumed run with another precision is refused)."""
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    if getattr(model, "is_loaded_in_4bit", False):
        return f"{dtype}+bnb-4bit"
    if getattr(model, "is_loaded_in_8bit", False):
        return f"{dtype}+bnb-8bit"
    return dtype


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("tracer", "torch", "transformers", "pyarrow", "vllm", "ray"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def resolved_settings(model: Any, tokenizer: Any, chat: bool | None, system: str | None, seed: int | None,
                      generate_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The generate kwargs after prepare_generate's defaults (what every batch is given)."""
    _, _, kwargs = prepare_batch(model, tokenizer, ["x"], chat=chat, system=system, **generate_kwargs)
    out = {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}
    out["seed"] = seed
    return out


def corpus_meta(*, engine: str, model: str, dtype: str, settings: dict[str, Any], chat: Any, system: Any,
                batch_size: int, record: dict[str, Any], schema: str = SCHEMA, extra: dict | None = None) -> dict:
    return {
        "engine": engine, "model": model, "dtype": dtype, "settings": settings, "chat": chat, "system": system,
        "schema": schema, "record": record, "versions": _versions(),
        "run": {"started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "host": platform.node(), "batch_size": batch_size, **(extra or {})},
    }


def batch_rows(model: Any, tokenizer: Any, items: Sequence[PromptItem], *, chat: bool | None, system: str | None,
               record: Any, seed: int | None, generate_kwargs: dict[str, Any], engine: str = "transformers",
               trace_path: Path | None = None) -> tuple[list[dict], list[dict]]:
    """Generate one batch traced; return its (sequence rows, step rows).  An interrupted or
    failed generation raises (nothing half-done becomes rows)."""
    import torch

    from ..session import trace
    from .rows import trace_rows

    texts, inputs, kwargs = prepare_batch(model, tokenizer, [it.prompt for it in items], chat=chat, system=system,
                                          **generate_kwargs)
    if seed is not None:
        import transformers

        transformers.set_seed(seed)
    with torch.inference_mode(), trace(model, tokenizer, record=record) as session:
        session.pending_prompts = texts
        model.generate(**inputs, **kwargs)
    tr = session.trace
    if tr.meta.status != "complete":
        raise CorpusError(f"generation of a batch ended {tr.meta.status}: {tr.meta.error}")
    files = None
    if trace_path is not None:
        from ..storage import save_trace

        saved = save_trace(tr, trace_path)
        files = [str(saved)] * len(items)
    settings = {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}
    settings["seed"] = seed  # (as corpus.json's settings: resolved_settings)
    return trace_rows(tr, [it.id for it in items], [it.text for it in items], engine=engine, settings=settings,
                      trace_files=files)


def chunks(items: Sequence[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


def trace_corpus(model: Any, tokenizer: Any, prompts: Any, *, dataset: str | Path, batch_size: int = 8,
                 chat: bool | None = None, system: str | None = None, record: Any = None, seed: int | None = 0,
                 trace_dir: str | Path | None = None,
                 on_batch: Callable[[int, int], None] | None = None, **generate_kwargs: Any) -> CorpusDataset:
    """Generate every prompt traced, in left-padded batches, into the dataset folder ``dataset``.

    ``prompts``: a data file (one prompt a line, or JSONL with ``id`` + ``prompt``/``messages``)
    or a list (texts, chat message lists, ``(id, prompt)`` pairs or dicts).  Each batch's rows are
    written as the batch finishes; prompt ids already in the dataset are skipped (resume), and
    resuming with other settings is refused.  ``record`` is a :class:`tracer.RecordConfig`;
    ``trace_dir`` also keeps one full trace file per batch, referenced from the rows.
    ``generate_kwargs`` pass to ``generate`` (``max_new_tokens`` defaults to 64).
    Returns the dataset opened for reading."""
    from ..config import RecordConfig

    if batch_size < 1:
        raise CorpusError(f"batch_size must be at least 1, got {batch_size}")
    items = load_items(prompts)
    record = record or RecordConfig()
    settings = resolved_settings(model, tokenizer, chat, system, seed, dict(generate_kwargs))
    dtype = model_dtype(model)
    meta = corpus_meta(engine="transformers", model=model_name(model), dtype=dtype, settings=settings,
                       chat=chat, system=system, batch_size=batch_size, record=record.to_dict())
    writer = CorpusWriter(dataset, meta)
    try:
        todo = writer.pending(items)
        tdir = Path(trace_dir) if trace_dir is not None else None
        if tdir is not None:
            tdir.mkdir(parents=True, exist_ok=True)
        for n, batch in enumerate(chunks(todo, batch_size)):
            tpath = None if tdir is None else tdir / f"{writer.run_id}-{n:05d}.trace"
            start = time.perf_counter()
            seq_rows, step_rows = batch_rows(model, tokenizer, batch, chat=chat, system=system, record=record,
                                             seed=seed, generate_kwargs=dict(generate_kwargs), trace_path=tpath)
            writer.write(seq_rows, step_rows)
            if on_batch is not None:
                on_batch(len(batch), int(time.perf_counter() - start))
    finally:
        writer.close()
    return open_dataset(dataset)
