"""Reading a corpus data file: one prompt a line (the seed's form) or JSONL (``id`` + ``prompt``
or chat ``messages``).  Everything here runs before the model loads; each problem raises
:class:`CorpusError` with one line naming the file and line number."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import TracerError

__all__ = ["CorpusError", "PromptItem", "read_data_file", "as_items", "split_lines", "looks_like_jsonl", "MAX_PROMPT_CHARS"]

#: A prompt longer than this many characters is refused (a sign of a wrong file, e.g. a whole
#: document on one line); callers may pass their own limit.
MAX_PROMPT_CHARS = 32_000


class CorpusError(TracerError):
    """A corpus input or dataset problem (one line)."""


@dataclass(frozen=True)
class PromptItem:
    """One prompt of the corpus: its id, the prompt (text or chat messages) and its source line."""

    id: str
    prompt: Any  # str, or list of {"role", "content"} messages
    line: int = 0  # 1-based line in the data file (0: given in Python)

    @property
    def text(self) -> str:
        """The prompt as one string (chat messages as JSON) for the ``sequences`` table."""
        return self.prompt if isinstance(self.prompt, str) else json.dumps(self.prompt, ensure_ascii=False)


def split_lines(text: str) -> list[str]:
    """The lines of ``text`` as a file read in text mode gives them (ends: ``\\n``, ``\\r\\n``,
    ``\\r``).  Not ``str.splitlines()``: it also breaks at U+2028/U+2029, NEL, form feed and other
    separators, which JSON strings and prompts may hold."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def looks_like_jsonl(first_line: str) -> bool:
    """A data file is JSONL when its first non-blank line is a JSON object or starts like one:
    ``{`` then (after spaces) a quote, ``}`` or nothing (``{"id"``, ``{ 'id'``, a pretty-printed
    ``{``), so that a malformed file is refused with its line number, not run as text; ``{name}
    is ...`` is text.  The one rule of ``tracer run --data-file``, with or without ``--dataset``."""
    line = first_line.strip()
    if not line.startswith("{"):
        return False
    rest = line[1:].lstrip()
    if not rest or rest[0] in "\"'}":
        return True
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):
        return False


def _check_text(text: str, where: str, what: str = "prompt") -> None:
    """A lone surrogate (JSON can spell one: ``"\\ud800"``) is not text: no tokenizer or Parquet
    file takes it, so it is refused here rather than after the model loads."""
    bad = next((c for c in text if 0xD800 <= ord(c) <= 0xDFFF), None)
    if bad is not None:
        raise CorpusError(f"{where}: the {what} holds a lone surrogate (\\u{ord(bad):04x}), which is not text")


def _check_prompt(prompt: Any, where: str, max_chars: int) -> Any:
    if isinstance(prompt, str):
        _check_text(prompt, where)
        if not prompt.strip():
            raise CorpusError(f"{where}: empty prompt")
        if len(prompt) > max_chars:
            raise CorpusError(f"{where}: prompt of {len(prompt)} characters is over the limit of {max_chars}")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        total = 0
        for m in prompt:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise CorpusError(f"{where}: each chat message needs a string 'role' and 'content'")
            _check_text(m["role"] + m["content"], where)
            total += len(m["content"])
        if not any(m["content"].strip() for m in prompt):
            raise CorpusError(f"{where}: empty prompt (every message is empty)")
        if total > max_chars:
            raise CorpusError(f"{where}: prompt of {total} characters is over the limit of {max_chars}")
        return [dict(role=m["role"], content=m["content"]) for m in prompt]
    raise CorpusError(f"{where}: a prompt must be text or a non-empty list of chat messages")


def _refuse_duplicates(items: Sequence[PromptItem], source: str) -> None:
    seen: dict[str, list[int]] = {}
    for n, item in enumerate(items, 1):
        seen.setdefault(item.id, []).append(item.line or n)
    dups = {k: v for k, v in seen.items() if len(v) > 1}
    if dups:
        first = next(iter(dups))
        where = "lines" if items and items[0].line else "items"
        more = f" (and {len(dups) - 1} more duplicated id(s))" if len(dups) > 1 else ""
        raise CorpusError(f"{source}: duplicate prompt id {first!r} on {where} "
                          f"{', '.join(map(str, dups[first]))}{more}")


def read_data_file(path: str | Path, *, max_chars: int = MAX_PROMPT_CHARS) -> list[PromptItem]:
    """The prompts of ``path``.  A file whose first non-blank line starts with ``{`` is JSONL
    (every non-blank line an object with ``prompt`` or ``messages``, ``id`` optional: default
    the line number); otherwise one prompt a line with ids ``"1"``, ``"2"``, ... (line numbers)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise CorpusError(f"data file is a directory, not a file: {path}") from None
    except OSError as exc:
        raise CorpusError(f"cannot read data file {path}: {exc.strerror or exc}") from None
    nul = raw.find(bytes(1))
    if nul >= 0:
        raise CorpusError(f"data file looks binary (a NUL byte at offset {nul}): {path}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"data file is not UTF-8 text (offset {exc.start}): {path}") from None
    lines = split_lines(text)
    first = next((ln.strip() for ln in lines if ln.strip()), None)
    if first is None:
        raise CorpusError(f"data file has no prompts: {path}")
    items: list[PromptItem] = []
    if looks_like_jsonl(first):
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}: line {n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            except RecursionError:
                raise CorpusError(f"{where}: not valid JSON here (nested too deeply)") from None
            if not isinstance(obj, dict):
                raise CorpusError(f"{where}: expected a JSON object with 'prompt' or 'messages'")
            if ("prompt" in obj) == ("messages" in obj):
                raise CorpusError(f"{where}: give exactly one of 'prompt' and 'messages'")
            pid = obj.get("id", n)
            if not isinstance(pid, (str, int)) or isinstance(pid, bool) or str(pid) == "":
                raise CorpusError(f"{where}: 'id' must be a non-empty string or an integer")
            _check_text(str(pid), where, "id")
            prompt = _check_prompt(obj.get("prompt", obj.get("messages")), where, max_chars)
            items.append(PromptItem(str(pid), prompt, n))
    else:
        for n, line in enumerate(lines, 1):
            if line.strip():
                items.append(PromptItem(str(n), _check_prompt(line.strip(), f"{path}: line {n}", max_chars), n))
    _refuse_duplicates(items, str(path))
    return items


def as_items(prompts: Iterable[Any], *, max_chars: int = MAX_PROMPT_CHARS) -> list[PromptItem]:
    """Python prompts as items: PromptItems, ``(id, prompt)`` pairs, dicts like a JSONL line, or
    bare prompts (ids ``"0"``, ``"1"``, ...)."""
    items: list[PromptItem] = []
    for n, p in enumerate(prompts):
        where = f"prompt {n}"
        if isinstance(p, PromptItem):
            items.append(p)
        elif isinstance(p, tuple) and len(p) == 2:
            items.append(PromptItem(str(p[0]), _check_prompt(p[1], where, max_chars)))
        elif isinstance(p, dict) and ("prompt" in p or "messages" in p):
            items.append(PromptItem(str(p.get("id", n)), _check_prompt(p.get("prompt", p.get("messages")), where, max_chars)))
        else:
            items.append(PromptItem(str(n), _check_prompt(p, where, max_chars)))
    if not items:
        raise CorpusError("no prompts given")
    _refuse_duplicates(items, "prompts")
    return items
