"""``tracer run --multi-turn``: one conversation, each turn answered with the whole history.

Every turn re-renders the history (system prompt, earlier questions and answers, the new
question) with the chat template and passes the previous turn's cache to ``generate``, which
then feeds the model only the tokens after the cached ones.  That is right only when the
re-rendered history starts with exactly the tokens in the cache (the previous prompt and the
answer as generated); re-tokenizing the decoded answer or a template that trims text can
break it, so the prefix is compared token by token and, where it differs, the turn is
prefilled from scratch with a note.  One trace per turn (``turn_000.trace``, ...): from the
second turn on, ``trace.cache.reused_len`` is the number of cached positions reused and the
prefill step's ``input_ids`` hold only the new tokens.

The seed's interactive mode is single-turn only (its banner points to llama.cpp for chat).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable

from .common import Result

__all__ = ["cache_argument", "first_difference", "run_conversation"]


def cache_argument(model: Any) -> str:
    """The name ``generate``/``forward`` take the cache under: ``cache`` (transformers >= 5.24)
    or ``past_key_values`` (older 5.x)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def first_difference(a: Any, b: Any) -> int | None:
    """The first index where the 1-D id tensors ``a`` and ``b`` differ, or None when ``b``
    starts with all of ``a``."""
    n = min(int(a.shape[0]), int(b.shape[0]))
    same = (a[:n] == b[:n]).tolist()
    first = next((i for i, ok in enumerate(same) if not ok), None)
    if first is not None:
        return first
    return None if int(b.shape[0]) >= int(a.shape[0]) else n


def run_conversation(runner: Any, turns: Iterable[str], emit: Callable[[int, Result], None]) -> None:
    """Answer ``turns`` as one conversation on ``runner`` (a :class:`tracer.cli.run.Runner`)."""
    system = runner.args.system
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system is not None else []
    cache_kw = cache_argument(runner.model)
    cache: Any = None
    cached_ids: Any = None  # the token ids whose keys/values the cache holds
    for index, text in enumerate(turns):
        runner.current = f"turn {index}"
        messages.append({"role": "user", "content": text})
        texts, inputs, kwargs = runner.prepare(list(messages), chat=True)
        ids = inputs["input_ids"][0]
        extra: dict[str, Any] = {}
        notes: list[str] = []
        if cache is not None:
            diff = first_difference(cached_ids, ids)
            if diff is None and ids.shape[0] > cached_ids.shape[0]:
                extra[cache_kw] = cache
            else:
                where = f"at token {diff}" if diff is not None else "(nothing new after the cached tokens)"
                notes.append(f"turn {index}: the re-rendered history differs from the cached tokens {where}; "
                             "prefilling the whole history from scratch")
        result, output = runner.generate(text, texts, inputs, kwargs, name=f"turn_{index:03d}",
                                         desc=f"turn {index}", extra=extra)
        result.notes[:0] = notes
        cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        sequence = output.sequences[0]
        cached_ids = sequence[: int(cache.get_seq_length())] if cache is not None else None
        new = sequence[inputs["input_ids"].shape[1]:]
        # the answer as generated (not stripped), so that re-rendering it gives the same tokens
        answer = runner.tokenizer.decode(new, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": answer})
        emit(index, result)
