"""Stage statistics of many decode steps at once: the score rows' pool (issue 19).

Each stage of a step (the raw logits, then every processor that changed them) leaves one score
row `(B, V)`.  The step recorder copies each distinct row into a :class:`RowPool` (a later
processor may write in place) and does nothing else with it during the step.  When the pool
fills, and at the end, :meth:`RowPool.flush` computes the statistics of every waiting row in a
few batched ops per group of whole steps: top-k, log-sum-exp, entropy, KL against the step's
previous row, count of ``-inf`` entries, the chosen token's rank and log-prob.

Bits: every float sum reduces each `(V,)` row whole on one thread (torch splits a reduction over
many rows across rows, never inside one; one row alone would be split on a CPU with several
threads, so a group has at least two rows).  The values are those of a one-row reduction on one
thread, whatever the grouping and the thread count (``tests/test_stage_stats.py``).  Results go
to the host without waiting (pinned memory on CUDA) and are read once, at the end, after the
recorder's one synchronisation.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ._device import to_host
from .assemble import FinishedStep, StageRows

__all__ = ["ROW_POOL_BYTES", "STATS_GROUP_BYTES", "RowPool", "Waiting", "count_neginf", "newly_neginf", "ranks"]

#: The pool holds about this many bytes of score rows (at least one step's).
ROW_POOL_BYTES = 32 << 20
#: Rows are reduced in groups of about this many bytes (whole steps; cache-sized on a CPU).
STATS_GROUP_BYTES = 4 << 20


class Waiting(NamedTuple):
    """A finished step whose rows wait in the pool (only what its statistics need)."""

    done: FinishedStep  # gets ``stages``, ``ranks`` and ``logps`` from :meth:`RowPool.records`
    first_row: int  # its distinct rows are pool rows first_row .. first_row + n_rows - 1
    n_rows: int
    stages: list  # (name, params) per stage
    row_of: list[int]  # per stage: its row among the step's distinct rows


class RowPool:
    """Score rows waiting for their statistics, and the steps they belong to."""

    def __init__(self, top_k: int, n_stages: int):
        self.top_k = top_k
        self.n_stages = n_stages
        self.rows: torch.Tensor | None = None  # (capacity, B, V)
        self._fits: tuple = (0, None, None)  # (capacity, dtype, row shape) of rows: the fast path's test
        self.used = 0
        self.pending: list[Waiting] = []  # steps whose rows wait in the pool
        self.lost_from: int | None = None  # the first step whose statistics a failed flush dropped
        self.groups: list[tuple[list, int, dict]] = []  # (steps, first row, host statistics) per group

    @property
    def waiting(self) -> bool:
        return bool(self.pending or self.groups)

    def keep(self, scores: torch.Tensor) -> int:
        """Copy ``scores`` into the next row; its index.  The pool is made on the first row (room
        for :data:`ROW_POOL_BYTES`, at least one step), and grows (a step with more rows than
        stages) or widens (a processor returned a wider dtype) keeping the rows it holds."""
        used = self.used
        capacity, dtype, shape = self._fits
        if used < capacity and scores.dtype == dtype and scores.shape == shape:  # the common case, kept short
            self.rows[used].copy_(scores)
            self.used = used + 1
            return used
        rows = self.rows
        dtype = scores.dtype if rows is None else torch.promote_types(rows.dtype, scores.dtype)
        if rows is not None and tuple(rows.shape[1:]) != tuple(scores.shape):
            raise RuntimeError(f"score rows changed shape during generation: {tuple(rows.shape[1:])} -> "
                               f"{tuple(scores.shape)}")
        if rows is None or self.used == rows.shape[0] or dtype != rows.dtype:
            row_bytes = max(scores.numel() * torch.empty((), dtype=dtype).element_size(), 1)
            size = max(self.n_stages, ROW_POOL_BYTES // row_bytes) if rows is None else rows.shape[0] + self.n_stages
            fresh = torch.empty((size, *scores.shape), dtype=dtype, device=scores.device)
            if rows is not None and self.used:
                fresh[: self.used].copy_(rows[: self.used])
            self.rows = fresh
            self._fits = (fresh.shape[0], fresh.dtype, fresh.shape[1:])
        self.rows[self.used].copy_(scores)
        self.used += 1
        return self.used - 1

    def add(self, step: Waiting) -> None:
        """A finished step whose rows are in the pool; flushes when another step might not fit."""
        self.pending.append(step)
        if self.rows.shape[0] - self.used < self.n_stages:
            self.flush()

    def flush(self) -> None:
        """Every waiting step's statistics, in groups of whole steps of about
        :data:`STATS_GROUP_BYTES`; the pool is free again.  On an error the steps not yet
        computed are dropped (``lost_from``: the first of them); interrupted (Ctrl-C) they stay
        waiting, their rows in place, for the flush at the end."""
        pending, used = self.pending, self.used
        if not pending:
            self.used = 0
            return
        width = max(int(self.rows[0].numel()) * self.rows.element_size(), 1)
        group_rows = max(STATS_GROUP_BYTES // width, 1)
        start = 0
        try:
            while start < len(pending):
                end, rows = start, 0
                while end < len(pending) and (end == start or rows < group_rows):
                    rows += pending[end].n_rows
                    end += 1
                self._group(pending[start:end], group_rows)
                start = end
        except Exception:
            self.pending, self.used, self.lost_from = [], 0, pending[start].done.index
            raise
        except BaseException:
            self.pending, self.used = pending[start:], used
            raise
        self.pending, self.used = [], 0

    def _group(self, group: list[Waiting], group_rows: int) -> None:
        first = group[0].first_row
        n = group[-1].first_row + group[-1].n_rows - first  # the group's rows are consecutive
        x = self.rows[first : first + n]  # (n, B, V)
        chosen = torch.cat([w.done.chosen.view(1, -1).expand(w.n_rows, -1) for w in group])  # (n, B)
        # On a CPU every reduction needs two rows at least (KL's too, over rows 1..): one row
        # alone would be split across threads.  On an accelerator every group has one size (a
        # group ends at the first step reaching group_rows), so the kernels' layout, and the
        # bits, do not depend on where a step falls or how long the run is.
        if x.device.type == "cpu":
            size = max(n, 3 if x.shape[1] == 1 else 2)
        else:
            size = max(n, group_rows + self.n_stages - 1)
        if size > n:
            x = torch.cat([x, x[-1:].expand(size - n, *x.shape[1:])])
            chosen = torch.cat([chosen, chosen[-1:].expand(size - n, -1)])
        values, ids = torch.topk(x, min(self.top_k, x.shape[-1]), dim=-1)
        s32 = x.float()
        lse = torch.logsumexp(s32, dim=-1)  # (n, B)
        logp = s32 - lse.unsqueeze(-1)  # -inf stays -inf
        p = logp.exp()
        entropy = torch.special.entr(p).sum(-1)
        # KL(row || the row before it); 0·log0 terms are nan and dropped.  Only a step's later
        # distinct rows use theirs (against the step's previous row).
        kl = torch.zeros_like(lse)
        per = group[0].n_rows
        if x.device.type == "cpu" and len(group) > 1 and per > 1 and all(w.n_rows == per for w in group):
            # steps of `per` rows each (the usual case; no padding then: n >= 4): only the rows
            # with a predecessor in their step, per - 1 strided slices of two rows at least; each
            # row still reduced whole on one thread, so the same bits, without the KL of each
            # step's first row (dropped).  On a CPU only: on an accelerator a group's layout stays
            # one (above), and the waste is device time.
            for j in range(1, per):
                kl[j::per] = (p[j::per] * (logp[j::per] - logp[j - 1::per])).nansum(-1)
        elif x.shape[0] > 1:
            kl[1:] = (p[1:] * (logp[1:] - logp[:-1])).nansum(-1)
        chosen_lp = logp.gather(-1, chosen.unsqueeze(-1))
        masked = count_neginf(x)
        results = dict(ids=ids, values=values.float(), lse=lse, masked=masked, added=newly_neginf(x, masked), kl=kl,
                       entropy=entropy, ranks=ranks(x, logp, chosen, chosen_lp, values, ids),
                       logp=chosen_lp.squeeze(-1))
        # to the host without waiting (read in records(), after the recorder's one synchronisation)
        host = {k: v if v.device.type == "cpu" else to_host(v) for k, v in results.items()}
        self.groups.append((group, first, host))

    def records(self) -> None:
        """Each computed group's statistics, as host arrays, into its steps (after a sync).

        The records hold views of the group's arrays (no copy); a stage that shares its
        predecessor's row gets copies, so no two records' arrays share memory."""
        groups, self.groups = self.groups, []
        for group, first, host in groups:
            a = {k: v.numpy() for k, v in host.items()}
            for w in group:
                base = w.first_row - first
                stages, ranks_, logps, prev = [], [], [], -1
                for (name, params), r in zip(w.stages, w.row_of):
                    at = base + r  # a stage that changed nothing shares its predecessor's row, KL 0
                    got = {k: (v[at] if r != prev else v[at].copy()) for k, v in a.items()}
                    kl = np.zeros_like(got["kl"]) if r == prev or r == 0 else got["kl"]
                    # (a stage that changed nothing masked nothing; the logits row has no row before it)
                    added = np.zeros_like(got["added"]) if r == prev or r == 0 else got["added"]
                    stages.append(StageRows(name, params, got["ids"], got["values"], got["lse"], got["masked"], kl,
                                            got["entropy"], added))
                    ranks_.append(got["ranks"])
                    logps.append(got["logp"])
                    prev = r
                w.done.ranks, w.done.logps, w.done.stages = ranks_, logps, stages  # stages last: "computed"


def count_neginf(x: torch.Tensor) -> torch.Tensor:
    """`-inf` entries per row of `(n, B, V)`.  On a CPU only rows whose minimum is `-inf` (or
    NaN) are counted entry by entry: a raw logits row has none."""
    if x.device.type != "cpu":
        return torch.isneginf(x).sum(-1)
    flat = x.reshape(-1, x.shape[-1])
    counts = torch.zeros(flat.shape[0], dtype=torch.int64)
    rows = (~(flat.amin(-1) > float("-inf"))).nonzero().squeeze(-1)  # NaN counts as "maybe"
    if rows.numel():  # (indices, not a read of values: nothing here is on a device)
        counts[rows] = torch.isneginf(flat[rows]).sum(-1)
    return counts.view(x.shape[:-1])


def newly_neginf(x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Per row of ``(n, B, V)``: entries at ``-inf`` that are not at ``-inf`` in the row before
    (row 0: its own count; only a step's later rows use theirs).  ``masked``: each row's count
    (:func:`count_neginf`).  On a CPU only the rows where both have ``-inf`` entries are compared
    entry by entry, in one op (after a raw logits row, which has none, the count is the row's own);
    on an accelerator every row is (a few kernels, no host read)."""
    added = masked.clone()
    if x.shape[0] < 2:
        return added
    if x.device.type != "cpu":
        added[1:] = (torch.isneginf(x[1:]) & ~torch.isneginf(x[:-1])).sum(-1)
        return added
    both = ((masked[1:] > 0) & (masked[:-1] > 0)).nonzero()  # (k, 2): the row before, the sequence
    if both.numel():
        r, b = both.unbind(1)
        added[r + 1, b] = (torch.isneginf(x[r + 1, b]) & ~torch.isneginf(x[r, b])).sum(-1)
    return added


def ranks(x: torch.Tensor, logp: torch.Tensor, chosen: torch.Tensor, chosen_lp: torch.Tensor,
           values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """How many entries of each row have a higher log-prob than the chosen token.

    On a CPU, a row whose chosen score is at least its k-th largest counts among its top-k only:
    log-probs are the scores minus one number, rounded, so an entry can rank above the chosen
    token only if its score is strictly higher, and every such entry is in the top-k.  The count
    is the same; other rows (and every row on an accelerator, where a branch would wait for
    the device) count all entries."""
    if x.device.type != "cpu":
        return (logp > chosen_lp).sum(-1)
    out = (logp.gather(-1, ids) > chosen_lp).sum(-1)
    inside = x.gather(-1, chosen.unsqueeze(-1)) >= values[..., -1:]  # NaN: False
    rows = (~inside).reshape(-1).nonzero().squeeze(-1)
    if rows.numel():
        flat = logp.reshape(-1, logp.shape[-1])
        out.view(-1)[rows] = (flat[rows] > chosen_lp.reshape(-1, 1)[rows]).sum(-1)
    return out
