"""Records of assisted / speculative decoding (``assistant_model=`` or
``prompt_lookup_num_tokens=``): per verification round the drafted tokens, how many the
verifying model accepted, its distribution at each drafted position and why the first
rejected token lost.  Plain numpy + JSON (``tracer.assisted`` fills them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .jsonio import JsonFile
from .text import TokenTexts

__all__ = ["DraftRound", "AssistedTrace"]

_ARRAYS = {"drafted": np.int64, "appended": np.int64, "verifier_top_ids": np.int64, "verifier_top_probs": np.float32,
           "verifier_p_drafted": np.float32, "verifier_rank_drafted": np.int64}


@dataclass
class DraftRound:
    """One draft-then-verify round (one forward of the verifying model over the drafted tokens)."""

    step: int
    cur_len: int  # sequence length before the round (prompt included)
    drafted: np.ndarray  # (L,) the drafted tokens (L = 0: nothing drafted, one ordinary step)
    appended: np.ndarray  # (A,) the tokens the round appended (accepted drafts, then the verifier's own)
    accepted: int  # leading drafted tokens kept
    verifier_top_ids: np.ndarray  # (L + 1, C) the verifier's processed distribution at each drafted position
    verifier_top_probs: np.ndarray  # (L + 1, C)  (+ the bonus position after the last draft)
    verifier_p_drafted: np.ndarray  # (L,) the verifier's probability of each drafted token
    verifier_rank_drafted: np.ndarray  # (L,) its rank in the verifier's distribution (0 = arg-max)
    draft_p_drafted: np.ndarray | None = None  # (L,) the draft model's probability of it (assistant only)
    reason: str = ""  # why the first rejected token lost (or why the round ended)

    @property
    def num_drafted(self) -> int:
        return int(self.drafted.shape[0])

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.num_drafted if self.num_drafted else None


@dataclass
class AssistedTrace(TokenTexts, JsonFile):
    """One traced assisted ``generate`` call (batch 1, as transformers requires)."""

    source: str  # "assistant_model:<class>" or "prompt_lookup"
    do_sample: bool
    prompt_ids: np.ndarray  # (1, P)
    sequences: np.ndarray  # (1, P + N) what generate returned
    rounds: list[DraftRound]
    token_text: dict[int, str] = field(default_factory=dict)
    token_bytes: dict[int, bytes] = field(default_factory=dict)  # id -> the token's raw UTF-8 bytes
    status: str = "complete"

    @property
    def num_rounds(self) -> int:
        return len(self.rounds)

    @property
    def drafted_total(self) -> int:
        return sum(r.num_drafted for r in self.rounds)

    @property
    def accepted_total(self) -> int:
        return sum(r.accepted for r in self.rounds)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / drafted over the run (None when nothing was drafted)."""
        return self.accepted_total / self.drafted_total if self.drafted_total else None

    @property
    def tokens_per_round(self) -> float:
        return sum(len(r.appended) for r in self.rounds) / max(self.num_rounds, 1)

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "rounds": self.num_rounds, "drafted": self.drafted_total,
                "accepted": self.accepted_total, "acceptance_rate": self.acceptance_rate,
                "tokens_per_round": self.tokens_per_round, "status": self.status}

    def table(self) -> list[dict[str, Any]]:
        """One row per round: drafted text, accepted count, rate, reason."""
        return [{"round": r.step, "drafted": [self.text(t) for t in r.drafted], "accepted": r.accepted,
                 "appended": [self.text(t) for t in r.appended], "rate": r.acceptance_rate, "reason": r.reason}
                for r in self.rounds]

    # -- JSON (no pickle) ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        rounds = []
        for r in self.rounds:
            row = {"step": r.step, "cur_len": r.cur_len, "accepted": r.accepted, "reason": r.reason,
                   "draft_p_drafted": None if r.draft_p_drafted is None else r.draft_p_drafted.tolist()}
            row.update({name: getattr(r, name).tolist() for name in _ARRAYS})
            rounds.append(row)
        return {"format": "tracer-assisted/1", "source": self.source, "do_sample": self.do_sample,
                "status": self.status, "prompt_ids": self.prompt_ids.tolist(), "sequences": self.sequences.tolist(),
                **self.token_maps_to_json(), "rounds": rounds}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AssistedTrace":
        if data.get("format") != "tracer-assisted/1":
            raise ValueError(f"not a tracer assisted-decoding trace (format {data.get('format')!r})")
        rounds = []
        for r in data["rounds"]:
            arrays = {n: np.asarray(r[n], dtype=d) for n, d in _ARRAYS.items()}
            draft = None if r["draft_p_drafted"] is None else np.asarray(r["draft_p_drafted"], dtype=np.float32)
            rounds.append(DraftRound(step=int(r["step"]), cur_len=int(r["cur_len"]), accepted=int(r["accepted"]),
                                     reason=str(r["reason"]), draft_p_drafted=draft, **arrays))
        return cls(source=str(data["source"]), do_sample=bool(data["do_sample"]), status=str(data["status"]),
                   prompt_ids=np.asarray(data["prompt_ids"], dtype=np.int64),
                   sequences=np.asarray(data["sequences"], dtype=np.int64), rounds=rounds,
                   **cls.token_maps_from_json(data))

    def __repr__(self) -> str:
        rate = self.acceptance_rate
        return (f"AssistedTrace({self.source}, rounds={self.num_rounds}, drafted={self.drafted_total}, "
                f"accepted={self.accepted_total}, rate={'n/a' if rate is None else f'{rate:.2f}'})")

    def _repr_html_(self) -> str:
        from .viz.assisted import assisted_html

        return assisted_html(self)
