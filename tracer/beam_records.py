"""Records of a beam search: per step the candidates, the surviving beams and their parents, the
finished hypotheses; the final ranking.  Plain numpy + JSON, no torch, no hooks (``tracer.beam``
fills them, ``tracer.viz.beam`` draws them).

Shapes: ``B`` prompts, ``N = num_beams`` running beams, ``K`` candidates transformers keeps per
step (``max(2, 1 + n_eos) * num_beams``), ``C`` candidates recorded per running beam.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .jsonio import JsonFile
from .text import TokenTexts

__all__ = ["BeamStep", "BeamTrace", "Hypothesis", "EMPTY_SCORE"]

#: transformers marks impossible beams / empty finished slots with scores near -1e9
EMPTY_SCORE = -1.0e8

_ARRAYS = ("running_before", "beam_top_ids", "beam_top_scores", "cand_ids", "cand_parent", "cand_scores",
           "cand_stop", "survivors", "finished_scores", "finished_from")
_DTYPES = {"beam_top_ids": np.int64, "cand_ids": np.int64, "cand_parent": np.int64, "survivors": np.int64,
           "finished_from": np.int64, "cand_stop": bool}


@dataclass
class BeamStep:
    """One beam-search step (one forward of all running beams)."""

    step: int
    running_before: np.ndarray  # (B, N) cumulative log-prob of each running beam entering the step
    beam_top_ids: np.ndarray  # (B, N, C) each running beam's best next tokens
    beam_top_scores: np.ndarray  # (B, N, C) their cumulative scores (beam score + processed log-prob)
    cand_ids: np.ndarray  # (B, K) the K continuations transformers kept, best first
    cand_parent: np.ndarray  # (B, K) the running beam (0..N-1) each continues
    cand_scores: np.ndarray  # (B, K) cumulative log-prob of each continuation
    cand_stop: np.ndarray  # (B, K) bool, the continuation hit a stopping criterion (finished)
    survivors: np.ndarray  # (B, N) candidate index (0..K-1) of each beam running into the next step
    finished_scores: np.ndarray  # (B, N) length-penalised scores of the finished set (<= -1e8: empty slot)
    finished_from: np.ndarray  # (B, N, 2) (step, candidate) that produced each finished slot; (-1, -1) empty

    @property
    def survivor_parent(self) -> np.ndarray:
        """`(B, N)` the running beam of the previous step each surviving beam came from."""
        return np.take_along_axis(self.cand_parent, self.survivors, axis=1)

    @property
    def survivor_scores(self) -> np.ndarray:
        return np.take_along_axis(self.cand_scores, self.survivors, axis=1)

    def token_logprob(self) -> np.ndarray:
        """`(B, K)` each candidate's own processed log-prob (its score minus its parent's)."""
        return self.cand_scores - np.take_along_axis(self.running_before, self.cand_parent, axis=1)


@dataclass(frozen=True)
class Hypothesis:
    """A finished hypothesis of the final ranking."""

    rank: int
    score: float  # length-penalised (what ``sequences_scores`` returns)
    step: int  # the step whose candidate finished it
    candidate: int
    tokens: tuple[int, ...]  # new tokens, prompt excluded
    beams: tuple[int, ...]  # per step, the running beam it continued (transformers' ``beam_indices`` mod N)
    returned: bool  # among the num_return_sequences generate returned


@dataclass
class BeamTrace(TokenTexts, JsonFile):
    """One traced beam-search ``generate`` call."""

    num_beams: int
    num_return_sequences: int
    length_penalty: float
    early_stopping: Any  # bool or "never"
    do_sample: bool
    prompt_ids: np.ndarray  # (B, P) int64 as given to generate (left padded)
    prompt_mask: np.ndarray  # (B, P) int64
    sequences: np.ndarray  # (B * num_return_sequences, P + T) what generate returned
    steps: list[BeamStep]
    token_text: dict[int, str] = field(default_factory=dict)
    token_bytes: dict[int, bytes] = field(default_factory=dict)  # id -> the token's raw UTF-8 bytes
    status: str = "complete"  # or the error that ended the run

    @property
    def batch_size(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def prompt_len(self) -> int:
        return int(self.prompt_ids.shape[1])

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def lineage(self, seq: int, step: int, candidate: int) -> list[tuple[int, int]]:
        """``[(step, candidate), ...]`` from step 0 to ``(step, candidate)``: the path of one
        continuation through the surviving beams."""
        path = [(step, candidate)]
        beam = int(self.steps[step].cand_parent[seq, candidate])
        for s in range(step - 1, -1, -1):
            k = int(self.steps[s].survivors[seq, beam])
            path.append((s, k))
            beam = int(self.steps[s].cand_parent[seq, k])
        return path[::-1]

    def tokens_of(self, seq: int, step: int, candidate: int) -> list[int]:
        return [int(self.steps[s].cand_ids[seq, k]) for s, k in self.lineage(seq, step, candidate)]

    def ranking(self, seq: int = 0) -> list[Hypothesis]:
        """The final finished set of prompt ``seq``, best first (transformers keeps it sorted)."""
        if not self.steps:
            return []
        last = self.steps[-1]
        out = []
        for rank in range(self.num_beams):
            score = float(last.finished_scores[seq, rank])
            step, k = (int(x) for x in last.finished_from[seq, rank])
            if score <= EMPTY_SCORE or step < 0:
                continue
            path = self.lineage(seq, step, k)
            out.append(Hypothesis(rank=rank, score=score, step=step, candidate=k,
                                  tokens=tuple(int(self.steps[s].cand_ids[seq, c]) for s, c in path),
                                  beams=tuple(int(self.steps[s].cand_parent[seq, c]) for s, c in path),
                                  returned=rank < self.num_return_sequences))
        return out

    def summary(self) -> dict[str, Any]:
        return {"num_beams": self.num_beams, "steps": self.num_steps, "batch": self.batch_size,
                "length_penalty": self.length_penalty, "early_stopping": self.early_stopping,
                "do_sample": self.do_sample, "num_return_sequences": self.num_return_sequences,
                "best_scores": [h[0].score if (h := self.ranking(b)) else None for b in range(self.batch_size)],
                "status": self.status}

    # -- JSON (no pickle) ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "tracer-beam/1",
            "num_beams": self.num_beams, "num_return_sequences": self.num_return_sequences,
            "length_penalty": self.length_penalty, "early_stopping": self.early_stopping,
            "do_sample": self.do_sample, "status": self.status,
            "prompt_ids": self.prompt_ids.tolist(), "prompt_mask": self.prompt_mask.tolist(),
            "sequences": self.sequences.tolist(),
            **self.token_maps_to_json(),
            "steps": [{"step": s.step, **{name: getattr(s, name).tolist() for name in _ARRAYS}} for s in self.steps],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BeamTrace":
        if data.get("format") != "tracer-beam/1":
            raise ValueError(f"not a tracer beam trace (format {data.get('format')!r})")
        steps = [BeamStep(step=int(s["step"]), **{n: np.asarray(s[n], dtype=_DTYPES.get(n, np.float32))
                                                   for n in _ARRAYS}) for s in data["steps"]]
        return cls(num_beams=int(data["num_beams"]), num_return_sequences=int(data["num_return_sequences"]),
                   length_penalty=float(data["length_penalty"]), early_stopping=data["early_stopping"],
                   do_sample=bool(data["do_sample"]), status=str(data["status"]),
                   prompt_ids=np.asarray(data["prompt_ids"], dtype=np.int64),
                   prompt_mask=np.asarray(data["prompt_mask"], dtype=np.int64),
                   sequences=np.asarray(data["sequences"], dtype=np.int64), steps=steps,
                   **cls.token_maps_from_json(data))

    def __repr__(self) -> str:
        return (f"BeamTrace(batch={self.batch_size}, num_beams={self.num_beams}, steps={self.num_steps}, "
                f"status={self.status!r})")

    def _repr_html_(self) -> str:
        from .viz.beam import beam_tree_svg

        return beam_tree_svg(self, 0)
