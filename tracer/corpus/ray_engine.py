"""``tracer.corpus.trace_corpus_ray``: the prompt set sharded over a Ray cluster with Ray Data.

The batches are fixed on the driver (the same left-padded batches, in the same composition, as
:func:`tracer.trace_corpus` makes, so greedy results equal the single-process run); each is one
row of a Ray Dataset, mapped by an actor pool: one actor per model replica, which loads the
model once in its constructor and turns each batch into Arrow tables (``sequences``, ``steps``)
sent back as Arrow IPC bytes.  The driver is the only writer: it writes each batch as one part
of the dataset the moment it arrives (streaming execution), so a killed run keeps every part
already received, a rerun skips the prompt ids present, and the nodes need no shared
filesystem (except for ``trace_dir``, which each actor writes itself).

Cluster: ``address`` (or ``RAY_ADDRESS``) connects to a running one; otherwise a local cluster
starts (and is shut down at the end).  On a small machine the actors take fractional CPUs
(``num_cpus``): an actor pool of 2 one-CPU actors on 2 CPUs stalls under Ray Data's resource
budget (its own tasks need CPU too)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from .data import CorpusError, PromptItem
from .dataset import (CorpusDataset, CorpusWriter, check_dataset_folder, lock_dataset, open_dataset, pending,
                      unlock_dataset)
from .engine import chunks, corpus_meta, load_items

__all__ = ["trace_corpus_ray", "Replica"]


def _ipc(table: Any) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(data: bytes) -> Any:
    import pyarrow as pa

    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


class Replica:
    """One model replica (a Ray actor): loads the model once, generates whole batches traced."""

    def __init__(self, load: dict[str, Any], chat: bool | None, system: str | None, record: dict[str, Any],
                 seed: int | None, trace_dir: str | None, run_id: str, generate_kwargs: dict[str, Any]):
        from ..config import RecordConfig
        from ..models import load_model
        from .engine import model_name, model_dtype, resolved_settings

        self.model, self.tokenizer = load_model(**load)
        self.chat, self.system, self.seed = chat, system, seed
        self.record = RecordConfig(**record) if record else RecordConfig()
        self.trace_dir = None if trace_dir is None else Path(trace_dir)
        self.run_id = run_id
        self.generate_kwargs = dict(generate_kwargs)
        dtype = model_dtype(self.model)
        settings = resolved_settings(self.model, self.tokenizer, chat, system, seed, dict(generate_kwargs))
        self.identity = json.dumps({"model": model_name(self.model), "dtype": dtype, "settings": settings},
                                   default=str)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from .engine import batch_rows
        from .rows import sequences_table, steps_table

        out: dict[str, list] = {"n": [], "identity": [], "sequences": [], "steps": [], "prompts": []}
        for n, items_json in zip(batch["n"], batch["items"]):
            items = [PromptItem(d["id"], d["prompt"], d["line"]) for d in json.loads(items_json)]
            tpath = None if self.trace_dir is None else self.trace_dir / f"{self.run_id}-{int(n):05d}.trace"
            seq_rows, step_rows = batch_rows(self.model, self.tokenizer, items, chat=self.chat, system=self.system,
                                             record=self.record, seed=self.seed,
                                             generate_kwargs=dict(self.generate_kwargs), trace_path=tpath)
            out["n"].append(int(n))
            out["identity"].append(self.identity)
            out["sequences"].append(_ipc(sequences_table(seq_rows)))
            out["steps"].append(_ipc(steps_table(step_rows)))
            out["prompts"].append(len(items))
        return out


def _local_env() -> dict[str, str]:
    """What the workers of a local cluster need from this process's environment."""
    keep = ("PYTHONPATH", "TRACER_CACHE_DIR", "OMP_NUM_THREADS", "HF_HOME", "HF_HUB_OFFLINE")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    here = str(Path(__file__).resolve().parents[2])  # the checkout this tracer is imported from
    env["PYTHONPATH"] = os.pathsep.join([here, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def trace_corpus_ray(prompts: Any, *, dataset: str | Path, load: dict[str, Any] | None = None, workers: int = 2,
                     batch_size: int = 8, chat: bool | None = None, system: str | None = None, record: Any = None,
                     seed: int | None = 0, trace_dir: str | Path | None = None, address: str | None = None,
                     num_cpus: float | None = None, on_batch: Callable[[int, int], None] | None = None,
                     **generate_kwargs: Any) -> CorpusDataset:
    """:func:`tracer.trace_corpus` over ``workers`` model replicas on a Ray cluster.

    ``load``: :func:`tracer.load_model` keyword arguments each replica loads with (default: the
    embedded model).  ``address``: a cluster to join (default ``RAY_ADDRESS``; none: a local
    cluster with ``workers`` CPUs).  ``num_cpus``: CPUs per replica (default 0.5 on a local
    cluster, 1 on a given one).  Everything else as :func:`tracer.trace_corpus`; same dataset."""
    from ..config import RecordConfig

    if batch_size < 1 or workers < 1:
        raise CorpusError(f"batch_size and workers must be at least 1, got {batch_size} and {workers}")
    items = load_items(prompts)
    record = record or RecordConfig()
    check_dataset_folder(dataset)  # a folder that holds something else: refused before any replica loads
    lock_dataset(dataset)  # (and another run writing into it now) released at the end
    try:
        return _trace_corpus_ray(pending(dataset, items), dataset=dataset, load=load, workers=workers,
                                 batch_size=batch_size, chat=chat, system=system, record=record, seed=seed,
                                 trace_dir=trace_dir, address=address, num_cpus=num_cpus, on_batch=on_batch,
                                 generate_kwargs=generate_kwargs)
    finally:
        unlock_dataset(dataset)


def _trace_corpus_ray(todo: list, *, dataset: str | Path, load: dict[str, Any] | None, workers: int,
                      batch_size: int, chat: bool | None, system: str | None, record: Any, seed: int | None,
                      trace_dir: str | Path | None, address: str | None, num_cpus: float | None,
                      on_batch: Callable[[int, int], None] | None, generate_kwargs: dict[str, Any]) -> CorpusDataset:
    import uuid

    import ray

    run_id = uuid.uuid4().hex[:8]
    address = address or os.environ.get("RAY_ADDRESS") or None
    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(2, workers), include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": _local_env()})
            started = True
    cpus = num_cpus if num_cpus is not None else (0.5 if not address else 1.0)
    writer: CorpusWriter | None = None
    try:
        if not todo:
            return open_dataset(dataset) if Path(dataset, "corpus.json").is_file() else _empty(dataset)
        batches = [{"n": n, "items": json.dumps([{"id": it.id, "prompt": it.prompt, "line": it.line} for it in b],
                                                ensure_ascii=False)}
                   for n, b in enumerate(chunks(todo, batch_size))]
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ds = ray.data.from_items(batches, override_num_blocks=len(batches))
        ds = ds.map_batches(
            Replica, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus,
            fn_constructor_kwargs=dict(load=dict(load or {}), chat=chat, system=system, record=record.to_dict(),
                                       seed=seed, trace_dir=None if trace_dir is None else str(trace_dir),
                                       run_id=run_id, generate_kwargs=dict(generate_kwargs)))
        if trace_dir is not None:
            Path(trace_dir).mkdir(parents=True, exist_ok=True)
        for row in ds.iter_rows():
            if writer is None:  # the first batch back says what the replicas loaded
                ident = json.loads(row["identity"])
                meta = corpus_meta(engine="transformers", model=ident["model"], dtype=ident["dtype"],
                                   settings=ident["settings"], chat=chat, system=system, batch_size=batch_size,
                                   record=record.to_dict(),
                                   extra={"ray": {"workers": workers, "num_cpus": cpus,
                                                  "address": address or "local"}})
                writer = CorpusWriter(dataset, meta)
            writer.write_tables(_from_ipc(row["sequences"]), _from_ipc(row["steps"]))
            if on_batch is not None:
                on_batch(int(row["prompts"]), 0)
        return open_dataset(dataset)
    finally:
        if writer is not None:
            writer.close()
        if started:
            ray.shutdown()


def _empty(dataset: str | Path) -> CorpusDataset:
    raise CorpusError(f"no prompts to run into {dataset}")
