"""Stage statistics computed many steps at a time (issue 19) hold the values of a one-row
computation, bit for bit, whatever the grouping and the thread count.

The recorder copies each step's distinct score rows into a pool and computes their statistics
when the pool fills and at the end (``tracer.stage_stats.RowPool``).  The reference here is the
per-step computation the recorder used before, applied to each step's rows alone on one thread.
A row of 49,152 entries (the embedded model's vocabulary) is longer than torch's grain size
(32,768), so a one-row reduction on two threads splits the row and rounds differently: the
recorder reduces every row whole on one thread instead, so a trace holds the same bits on a
1-thread and a many-thread machine.
"""

from __future__ import annotations

import gc
import types
import weakref

import numpy as np
import pytest
import torch

import tracer.recorder as recorder_module
import tracer.stage_stats as stage_stats
from tracer.config import RecordConfig
from tracer.recorder import StepRecorder
from tracer.stage_stats import RowPool

from test_recorder_events import _gen_config, _plan

V = 49152  # the embedded model's vocabulary: longer than torch's grain size


class _Temperature:
    def __init__(self):
        self.temperature = 0.7


class _MaskLow:
    """Masks a fixed block of the vocabulary (a row with -inf entries)."""


class _Nothing:
    """A processor that changes nothing: its stage shares the previous row."""


def _steps(batch: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, V, generator=g) * 4 for _ in range(n)]


def _choose(i: int, masked: torch.Tensor) -> torch.Tensor:
    """Greedy on even steps; on odd steps token 7, far down the ranking (as sampling may pick)."""
    return masked.argmax(-1) if i % 2 == 0 else torch.full((masked.shape[0],), 7)


def _run(rows: list[torch.Tensor], record: RecordConfig | None = None, *, two: bool = False, seen: list | None = None):
    """Drive a recorder through ``len(rows)`` steps with four stages each: logits, temperature,
    a mask (-inf entries), a no-op (``two``: logits and temperature only); the chosen token from
    :func:`_choose`.  A Ctrl-C inside a step ends the generation there, as in ``generate``."""
    batch = rows[0].shape[0]
    procs = [_Temperature()] if two else [_Temperature(), _MaskLow(), _Nothing()]
    rec = StepRecorder(_plan(vocab_size=V, hidden_layers=(), lens_layers=()), record or RecordConfig(cache=False))
    rec.configure(_gen_config(max_length=3 + len(rows)), procs, input_len=3)
    ids = torch.arange(3).repeat(batch, 1)
    error = None
    for i, logits in enumerate(rows):
        fed = ids if i == 0 else ids[:, -1:]
        rec.forward_start((), {"input_ids": fed})
        rec.forward_end(types.SimpleNamespace(cache=None), {})
        rec.scores(None, logits)
        warped = logits / 0.7
        rec.scores(procs[0], warped)
        masked = warped
        if not two:
            masked = warped.clone()
            masked[:, 100:5000] = float("-inf")
            rec.scores(procs[1], masked)
            rec.scores(procs[2], masked)
        if seen is not None:
            seen.append(weakref.ref(masked))
        chosen = _choose(i, masked)
        ids = torch.cat([ids, chosen[:, None]], dim=1)
        try:
            rec.stop_check(ids, torch.zeros(batch, dtype=torch.bool), [])
        except KeyboardInterrupt as exc:
            error = exc
            break
    if seen is not None:  # which steps' tensors are still alive while their rows wait in the pool
        gc.collect()
        seen[:] = [r() is not None for r in seen]
    return rec, rec.finish(ids, error)


def _reference(rows: list[torch.Tensor], top_k: int = 10, *, two: bool = False):
    """Each step alone, row by row, on one thread: the recorder's statistics before issue 19."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = []
        for i, logits in enumerate(rows):
            warped = logits / 0.7
            masked = warped.clone()
            masked[:, 100:5000] = float("-inf")
            if two:
                masked = warped
            x = torch.stack([logits, warped] if two else [logits, warped, masked])  # the step's distinct rows
            n = x.shape[0]
            chosen = _choose(i, masked)
            values, ids = torch.topk(x, top_k, dim=-1)
            lse = torch.stack([torch.logsumexp(x[r], dim=-1) for r in range(n)])
            logp = x - lse.unsqueeze(-1)
            p = logp.exp()
            ent = torch.special.entr(p)
            entropy = [ent[r].sum(-1) for r in range(n)]
            terms = p[1:] * (logp[1:] - logp[:-1])
            kl = [torch.zeros_like(lse[0])] + [terms[r - 1].nansum(-1) for r in range(1, n)]
            clp = logp.gather(-1, chosen.view(1, -1, 1).expand(n, -1, 1))
            ranks = (logp > clp).sum(-1)
            stages = []
            for j, r in enumerate((0, 1) if two else (0, 1, 2, 2)):  # the no-op stage shares the mask's row: KL 0
                stages.append(dict(ids=ids[r].numpy(), values=values[r].numpy(), lse=lse[r].numpy(),
                                   masked=torch.isneginf(x[r]).sum(-1).numpy(),
                                   kl=(kl[0] if j == 3 else kl[r]).numpy(), entropy=entropy[r].numpy(),
                                   rank=ranks[r].numpy(), logp=clp[r, :, 0].numpy()))
            out.append(stages)
        return out
    finally:
        torch.set_num_threads(before)


def _assert_same(trace, reference):
    assert trace.num_steps == len(reference)
    for step, want in zip(trace.steps, reference):
        names = ["logits", "_Temperature", "_MaskLow", "_Nothing"]
        assert [s.name for s in step.stages] == names[: len(want)]
        for stage, w in zip(step.stages, want):
            np.testing.assert_array_equal(stage.top.ids, w["ids"])
            for got, key in ((stage.top.values, "values"), (stage.top.logsumexp, "lse"), (stage.kl, "kl"),
                             (stage.entropy, "entropy"), (stage.chosen_logprob, "logp")):
                assert got.tobytes() == w[key].astype(np.float32).tobytes(), key  # bit for bit
            np.testing.assert_array_equal(stage.n_masked, w["masked"])
            np.testing.assert_array_equal(stage.chosen_rank, w["rank"])


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_statistics_equal_one_row_one_thread(batch, n_threads, threads):
    rows = _steps(batch, 5)
    want = _reference(rows)
    threads(n_threads)
    _, trace = _run(rows)
    _assert_same(trace, want)


@pytest.mark.parametrize("n_steps", [1, 12])
def test_two_row_steps_keep_their_kl_on_two_threads(n_steps, threads):
    """Logits and one processor (sampling's usual two rows): a group of one such step still
    reduces its KL over two rows (a lone row would be split across threads); 12 steps leave a
    one-step remainder group at 49,152 entries."""
    rows = _steps(1, n_steps, seed=4)
    want = _reference(rows, two=True)
    threads(2)
    _, trace = _run(rows, two=True)
    _assert_same(trace, want)


def test_split_rows_round_differently_on_two_threads(threads):
    """Why the recorder reduces rows whole: the one-row reduction it replaced depends on the
    thread count for a row this long (if torch stops splitting rows, this test says so)."""
    probs = [torch.softmax(r, dim=-1) for r in _steps(1, 8, seed=3)]
    threads(1)
    one = [torch.special.entr(p).sum(-1) for p in probs]
    threads(2)
    two = [torch.special.entr(p).sum(-1) for p in probs]
    assert any(not torch.equal(a, b) for a, b in zip(one, two))


def test_pool_flushes_mid_run_and_groups_keep_the_values(monkeypatch, threads):
    """A pool of two steps and groups of one row: flushed four times during the run, many groups
    each time; every value as computed alone."""
    row_bytes = V * 4 * 2
    monkeypatch.setattr(stage_stats, "ROW_POOL_BYTES", 7 * row_bytes)  # room for two steps' rows
    monkeypatch.setattr(stage_stats, "STATS_GROUP_BYTES", 1)
    flushes = []
    original = RowPool.flush

    def counted(self):
        flushes.append(len(self.pending))
        return original(self)

    monkeypatch.setattr(RowPool, "flush", counted)
    rows = _steps(2, 9, seed=1)
    want = _reference(rows)
    threads(2)
    _, trace = _run(rows)
    assert flushes == [2, 2, 2, 2, 1]  # four flushes while decoding, the last step's at the end
    _assert_same(trace, want)


@pytest.mark.parametrize("where", ["while decoding", "at the end"])
def test_statistics_failure_keeps_the_steps_before(monkeypatch, where):
    """A failure computing a group's statistics stops recording there: the steps of earlier
    groups keep their values, the failed group's and later steps are not kept, and the note
    names the group's first step (not the step that was running)."""
    if where == "while decoding":
        monkeypatch.setattr(stage_stats, "ROW_POOL_BYTES", 7 * V * 4)  # two steps' rows: flush after steps 1, 3
        failing_call = 2  # steps 2 and 3, flushed during step 3
    else:
        monkeypatch.setattr(stage_stats, "STATS_GROUP_BYTES", 1)  # one flush at the end, a group per step
        failing_call = 3  # step 2
    calls = [0]
    original = RowPool._group

    def failing(self, group, group_rows):
        calls[0] += 1
        if calls[0] == failing_call:
            raise RuntimeError("boom")
        return original(self, group, group_rows)

    monkeypatch.setattr(RowPool, "_group", failing)
    rows = _steps(1, 5, seed=2)
    want = _reference(rows)
    with pytest.warns(recorder_module.TracerWarning, match="recording stopped at step 2: RuntimeError: boom"):
        rec, trace = _run(rows)
    assert trace.num_steps == 2
    _assert_same(trace, want[:2])
    assert any("boom" in n for n in trace.meta.notes)


def test_ctrl_c_during_a_flush_keeps_every_step(monkeypatch):
    """Ctrl-C while the pool computes mid-run: the generation stops there, and the steps whose
    statistics were being computed keep their rows and get them at the end."""
    monkeypatch.setattr(stage_stats, "ROW_POOL_BYTES", 7 * V * 4)  # flushes after steps 1 and 3
    calls = [0]
    original = RowPool._group

    def interrupted(self, group, group_rows):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return original(self, group, group_rows)

    monkeypatch.setattr(RowPool, "_group", interrupted)
    rows = _steps(1, 6, seed=5)
    _, trace = _run(rows)
    assert trace.meta.status == "interrupted"
    _assert_same(trace, _reference(rows[:4]))


def test_waiting_steps_hold_no_step_tensors():
    """The pool keeps a step's rows and what its statistics need, not the step's own tensors
    (score rows, hidden states): those are freed when the step ends."""
    seen: list = []
    rows = _steps(1, 6, seed=6)
    rec, trace = _run(rows, seen=seen)  # the pool holds all six steps until finish
    assert seen == [False] * 5 + [True]  # only the last step's rows, held by the driver itself
    _assert_same(trace, _reference(rows))


def test_records_share_no_statistics_memory():
    """The records hold views of each group's statistics, not copies; a no-op processor's stage
    (which shares its predecessor's row) gets copies, and stage 0 a zero KL of its own: no two
    arrays of the records share memory, so writing one changes no other."""
    _, trace = _run(_steps(2, 3))
    arrays = [a for step in trace.steps for st in step.stages
              for a in (st.top.ids, st.top.values, st.top.logsumexp, st.n_masked, st.chosen_rank,
                        st.chosen_logprob, st.kl, st.entropy)]
    assert not [(a, b) for i, a in enumerate(arrays) for b in arrays[i + 1:] if np.shares_memory(a, b)]
    step = trace.steps[1]
    assert np.array_equal(step.stages[3].top.ids, step.stages[2].top.ids)  # the no-op stage: same values
    before = step.stages[2].entropy.copy()
    step.stages[3].entropy[0] = 1.0
    step.stages[0].kl[0] = 2.0
    assert np.array_equal(step.stages[2].entropy, before) and trace.steps[2].stages[0].kl[0] == 0.0


def test_kl_only_for_rows_with_a_predecessor_mixed_steps_on_two_threads(threads):
    """Steps of one distinct row (a processor that changed nothing) and of two, in one group
    (uneven steps: KL over every row after the first, not the strided slices of even steps):
    each step's later row holds the one-row, one-thread bits; a step's first row has KL 0."""
    rows = _steps(1, 5, seed=2)
    unchanged = {0, 2, 3, 4}  # these steps' temperature stage returns the logits themselves
    want = []
    threads(1)
    for i, logits in enumerate(rows):
        if i in unchanged:
            want.append(0.0)
            continue
        x = torch.stack([logits, logits / 0.7])
        logp = x - torch.stack([torch.logsumexp(x[r], dim=-1) for r in range(2)]).unsqueeze(-1)
        want.append((logp[1].exp() * (logp[1] - logp[0])).nansum(-1))
    threads(2)
    proc = _Temperature()
    rec = StepRecorder(_plan(vocab_size=V, hidden_layers=(), lens_layers=()), RecordConfig(cache=False))
    rec.configure(_gen_config(max_length=3 + len(rows)), [proc], input_len=3)
    ids = torch.arange(3).repeat(1, 1)
    for i, logits in enumerate(rows):
        rec.forward_start((), {"input_ids": ids if i == 0 else ids[:, -1:]})
        rec.forward_end(types.SimpleNamespace(cache=None), {})
        rec.scores(None, logits)
        rec.scores(proc, logits if i in unchanged else logits / 0.7)
        ids = torch.cat([ids, logits.argmax(-1)[:, None]], dim=1)
        rec.stop_check(ids, torch.zeros(1, dtype=torch.bool), [])
    trace = rec.finish(ids, None)
    for i, step in enumerate(trace.steps):
        assert step.stages[0].kl.tobytes() == np.zeros(1, np.float32).tobytes()
        got = step.stages[1].kl
        assert got.tobytes() == np.asarray(want[i], dtype=np.float32).reshape(1).tobytes(), i
        assert (got[0] == 0.0) == (i in unchanged)
