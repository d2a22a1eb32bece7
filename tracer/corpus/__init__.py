"""Corpus tracing: a whole prompt set as one queryable dataset (Parquet ``sequences`` and
``steps`` tables + ``corpus.json``), compared engine against engine.

This layer reads finished Traces and tables; it never installs hooks.  Engines produce the
Traces: ``tracer.trace`` (batched ``generate``), vLLM, or either inside Ray actors.

* :func:`trace_corpus` writes a dataset (``tracer run --data-file F --dataset DIR``);
* :func:`open_dataset` reads one (pandas, polars, DuckDB);
* :func:`compare_datasets` compares two (``tracer compare DIR_A DIR_B``).

Needs the ``corpus`` extra (pyarrow, duckdb, pandas, polars).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "trace_corpus": ("engine", "trace_corpus"),
    "open_dataset": ("dataset", "open_dataset"),
    "CorpusDataset": ("dataset", "CorpusDataset"),
    "is_dataset": ("dataset", "is_dataset"),
    "compare_datasets": ("compare", "compare_datasets"),
    "CorpusComparison": ("compare", "CorpusComparison"),
    "read_data_file": ("data", "read_data_file"),
    "CorpusError": ("data", "CorpusError"),
    "PromptItem": ("data", "PromptItem"),
    "trace_corpus_ray": ("ray_engine", "trace_corpus_ray"),
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'tracer.corpus' has no attribute {name!r}") from None
    value = getattr(import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value
