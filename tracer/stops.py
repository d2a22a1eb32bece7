"""Why a sequence stopped: :class:`StopReason` and its one priority rule (numpy-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

__all__ = ["STOP_KINDS", "StopReason"]

# --------------------------------------------------------------------------------------
# Stop reasons
# --------------------------------------------------------------------------------------

#: Every kind of :class:`StopReason`, in priority order: when several criteria fire for one
#: sequence at one step, the first kind of this tuple is the reason recorded.
STOP_KINDS = ("eos", "stop_token", "stop_string", "criteria", "max_time", "max_length", "abort", "interrupted")
_PRIORITY = {kind: i for i, kind in enumerate(STOP_KINDS)}
_TEXT_KINDS = ("eos", "stop_token", "stop_string")  # "kind:text" in the string form


@dataclass(frozen=True, eq=False)
class StopReason(str):
    """Why one sequence stopped.

    ``kind`` is one of :data:`STOP_KINDS`; ``token_id`` the terminator that fired (``eos`` /
    ``stop_token``); ``text`` the terminator's text, the stop string, or the name of a custom
    criterion.  A reason *is* its classic string form (``"eos:<|im_end|>"``, ``"max_length"``,
    ``"stop_string:..."``): it compares, hashes, joins and serialises as that string, so code
    written for string reasons keeps working; read the fields for anything else."""

    kind: str
    token_id: int | None = None
    text: str | None = None

    def __new__(cls, kind: str, token_id: int | None = None, text: str | None = None) -> "StopReason":
        if kind not in _PRIORITY:
            raise ValueError(f"unknown stop reason kind {kind!r} (one of {', '.join(STOP_KINDS)})")
        if kind in _TEXT_KINDS:
            form = kind if text is None else f"{kind}:{text}"
        elif kind == "criteria" and text:
            form = text
        else:
            form = kind
        return super().__new__(cls, form)

    def __getnewargs__(self) -> tuple[Any, ...]:  # copy / pickle rebuild from the fields
        return (self.kind, self.token_id, self.text)

    def __repr__(self) -> str:
        return f"StopReason({str(self)!r})"

    def __str__(self) -> str:
        return str.__str__(self)

    @property
    def priority(self) -> int:
        """Lower wins (see :data:`STOP_KINDS`)."""
        return _PRIORITY[self.kind]

    @classmethod
    def parse(cls, value: "str | StopReason | Mapping[str, Any] | None") -> "StopReason | None":
        """Read a reason from its string form (old trace files) or its JSON object."""
        if value is None or isinstance(value, StopReason):
            return value
        if isinstance(value, Mapping):
            token = value.get("token_id")
            return cls(str(value["kind"]), None if token is None else int(token),
                       None if value.get("text") is None else str(value["text"]))
        text = str(value)
        kind, sep, rest = text.partition(":")
        if sep and kind in _TEXT_KINDS:
            return cls(kind, None, rest)
        if text in _PRIORITY:
            return cls(text)
        if text == "stopped":  # old files: a criterion fired that could not be named
            return cls("criteria")
        return cls("criteria", None, text)  # "confidence", a custom criterion's class name

    @classmethod
    def first(cls, reasons: "Sequence[StopReason]") -> "StopReason | None":
        """The reason that wins when several fire at once: the one of lowest :attr:`priority`
        (stable: among equals, the criterion listed first)."""
        return min(reasons, key=lambda r: r.priority) if reasons else None

    @classmethod
    def from_last_token(cls, last_id: int | None, terminators: Mapping[int, str]) -> "StopReason":
        """The reason of a finished plain (untraced) run: ``eos`` when its last token is a
        terminator, else ``max_length``."""
        if last_id is not None and int(last_id) in terminators:
            return cls("eos", int(last_id), terminators[int(last_id)])
        return cls("max_length")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "token_id": self.token_id, "text": self.text}

    def same(self, other: "StopReason | None") -> bool:
        """Field-by-field equality (``==`` compares the string forms only)."""
        return isinstance(other, StopReason) and (self.kind, self.token_id, self.text) == (
            other.kind, other.token_id, other.text)
