"""What the recorders of beam search (``tracer.beam``) and assisted decoding (``tracer.assisted``)
share: the refusal of per-step extras, the run with transformers' helpers wrapped on the model
instance (always restored), and the end of recording (status, warning, what generate got and
returned).  Each mode keeps its own records; this module holds no state."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from .assemble import token_bytes, token_texts
from .errors import NotSupportedError, TracerWarning

__all__ = ["refuse_step_records", "run_patched", "end_status", "given_and_returned", "token_maps"]

_STEP_FLAGS = ("full_logits", "modules", "logit_lens", "attention", "routing")
_STEP_SELECTIONS = ("hidden_layers", "kv_layers")


def refuse_step_records(config: Any, mode: str) -> None:
    """Beam search and assisted decoding keep their own records, not the per-step ``Trace``:
    refuse (before generating) a ``RecordConfig`` asking for per-step extras they would not record."""
    asked = [n for n in _STEP_FLAGS if getattr(config, n, False)]
    asked += [n for n in _STEP_SELECTIONS if getattr(config, n, None)]
    if asked:
        raise NotSupportedError(
            f"{mode} is recorded as its own trace (candidates, acceptance), without per-step records: "
            f"RecordConfig({', '.join(asked)}) cannot be recorded in this mode; trace greedy/sampling for those"
        )


def run_patched(session: Any, patches: dict[str, Any], original: Any, args: tuple, kwargs: dict, *,
                build: Callable[[Any, str], Any], into: list, what: str) -> Any:
    """``original(*args, **kwargs)`` with ``patches`` set as attributes of the model instance;
    afterwards (also after an exception or Ctrl-C) the attributes are restored and
    ``build(output, status)`` goes to ``into``.  A failure to build is a warning: it never hides
    generate's result or error."""
    model = session.model
    saved = {name: model.__dict__.get(name) for name in patches}
    model.__dict__.update(patches)
    output, status = None, "complete"
    try:
        output = original(*args, **kwargs)
    except BaseException as exc:
        status = f"error: {type(exc).__name__}: {exc}"
        raise
    finally:
        session.pending_prompts = None
        for name, previous in saved.items():
            if previous is None:
                model.__dict__.pop(name, None)
            else:
                model.__dict__[name] = previous
        try:
            into.append(build(output, status))
        except Exception as exc:  # noqa: BLE001 - never hide generate's result or error
            warnings.warn(f"could not build the {what} trace: {exc!r}", TracerWarning, stacklevel=4)
    return output


def end_status(rec: Any, saw_steps: bool, output: Any, status: str, *, nothing: str, what: str) -> str:
    """The trace's status: ``rec.error`` (set to ``nothing`` when generate returned but no step was
    seen: transformers changed) stops recording with a warning and is named in the status."""
    if rec.error is None and output is not None and not saw_steps:
        rec.error = nothing
    if rec.error is not None:
        warnings.warn(f"{what} recording stopped: {rec.error}", TracerWarning, stacklevel=6)
        status = f"recording stopped: {rec.error}" if status == "complete" else status
    return status


def given_and_returned(args: tuple, kwargs: dict, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt ids generate was given ``(B, P)`` and the sequences it returned (empty tensors
    where there are none: an interrupted run)."""
    ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    ids = ids if isinstance(ids, torch.Tensor) else torch.zeros(1, 0, dtype=torch.long)
    seqs = getattr(output, "sequences", output)
    seqs = seqs if isinstance(seqs, torch.Tensor) else torch.zeros(0, 0, dtype=torch.long)
    return ids, seqs


def token_maps(tokenizer: Any, ids: set[int]) -> dict[str, dict]:
    """``token_text`` and ``token_bytes`` of the ids a mode's records use (empty without a
    tokenizer), as keyword arguments of its trace."""
    if tokenizer is None:
        return {"token_text": {}, "token_bytes": {}}
    ordered = sorted(ids)
    text = token_texts(tokenizer, ordered)
    return {"token_text": text, "token_bytes": token_bytes(tokenizer, ordered, text)}
