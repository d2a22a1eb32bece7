"""What a benchmark may publish: each side's rounds must agree before a ratio is printed.

A shared machine (here: 2 cores, other processes busy) makes single runs swing by 2-10×.  Every
benchmark times each side several rounds, and a side whose rounds spread more than
:data:`STABLE_SPREAD` (``(max - min) / median``) is re-run or reported as *unstable*: its
median is shown, but never a ratio built on it.  Threads are pinned (:func:`pin_threads`) so
OpenMP pools do not oversubscribe the cores.
"""

from __future__ import annotations

import os
import statistics
from typing import Any, Sequence

#: Largest accepted ``(max - min) / median`` of one side's rounds.
STABLE_SPREAD = 0.25


def spread(times: Sequence[float]) -> float:
    """``(max - min) / median`` of the rounds (0.0 for fewer than two)."""
    if len(times) < 2:
        return 0.0
    med = statistics.median(times)
    return (max(times) - min(times)) / med if med > 0 else float("inf")


def stable(times: Sequence[float], limit: float = STABLE_SPREAD) -> bool:
    """Whether the rounds agree: at least two rounds, spread within ``limit``."""
    return len(times) >= 2 and spread(times) <= limit


def guarded_ratio(num: Sequence[float], den: Sequence[float], limit: float = STABLE_SPREAD) -> dict[str, Any]:
    """``median(num) / median(den)`` when both sides are stable, else ``ratio: None`` and
    ``status: "unstable"`` naming the side(s); spreads are always given."""
    out: dict[str, Any] = {"spread_num": round(spread(num), 3), "spread_den": round(spread(den), 3)}
    bad = [side for side, xs in (("numerator", num), ("denominator", den)) if not stable(xs, limit)]
    if bad:
        out.update(ratio=None, status="unstable", unstable=bad)
    else:
        out.update(ratio=statistics.median(num) / statistics.median(den), status="stable")
    return out


def available_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def pin_threads(n: int | None = None) -> int:
    """Pin torch's intra-op threads (and OpenMP/MKL's, for processes started later) to ``n``
    (default: the cores this process may run on); returns ``n``."""
    n = n or len(available_cores())
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    return n
