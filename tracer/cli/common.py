"""What every ``tracer`` subcommand shares: the error type, one prompt's result, the summary
table, the seed's defaults, and terminal-safe display of user-given text.

No torch, no transformers: importing this keeps ``tracer --help`` fast.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..text import clip, clip_middle, display_width, escaped_units, unsafe_char

#: The seed script's two sample prompts (the default of ``tracer run``).
DEFAULT_PROMPTS = ("为什么要减少污染，保护环境？", "你有什么建议？")

#: The seed's ``DEFAULT_SYSTEM_PROMPT``: its ``generate_prompt`` puts it before every
#: instruction when the chat template is applied (``--with-prompt``); ``--preset seed`` uses it.
SEED_SYSTEM_PROMPT = "You are a helpful assistant. 你是一个乐于助人的助手。"

#: Generation presets (``--preset NAME``); an explicit flag overrides any value here.
#: ``seed``: the upstream script's ``GenerationConfig`` (near-greedy sampling, 400 tokens).
PRESETS: dict[str, dict[str, Any]] = {
    "seed": {
        "do_sample": True,
        "temperature": 0.2,
        "top_k": 40,
        "top_p": 0.9,
        "repetition_penalty": 1.1,
        "max_new_tokens": 400,
        "system": SEED_SYSTEM_PROMPT,
    },
}

#: The seed's stop strings (its ``vllm_generation_config["stop"]``).
SEED_STOP_STRINGS = ("<|eot_id|>", "<|end_of_text|>")

#: What ``--preset NAME --use-vllm`` changes in :data:`PRESETS` (``None`` removes a value).
#: ``seed``: the upstream script's vLLM settings differ from its ``GenerationConfig``: a
#: presence penalty of 1.0 and no repetition penalty, its stop strings (``stop_token_ids`` are
#: the terminators on both engines); no ``do_sample`` (vLLM samples whenever temperature > 0).
VLLM_PRESETS: dict[str, dict[str, Any]] = {
    "seed": {"repetition_penalty": None, "presence_penalty": 1.0, "stop": list(SEED_STOP_STRINGS)},
}


class CliError(Exception):
    """An error reported as one ``tracer: error: ...`` line on stderr with exit status 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run, with what was saved (printed on one line, exit status 130)."""


@dataclass
class Result:
    """One prompt's outcome, for the summary table and the predictions file."""

    prompt: str
    output: str
    new_tokens: int
    stop_reason: str
    time_s: float
    notes: list[str] = field(default_factory=list)
    token_ids: tuple[int, ...] = ()
    """The generated token ids (new tokens only)."""

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.time_s if self.time_s > 0 else 0.0

    def prediction(self) -> dict[str, str]:
        """The predictions-file entry, with the seed's keys: ``{"Input": prompt, "Output": answer}``
        (the raw prompt, on every engine; :func:`tracer.cli.outputs.read_predictions` also
        reads the lower-case keys earlier tracer versions wrote)."""
        return {"Input": self.prompt, "Output": self.output}


def shown(value: Any, limit: int = 300) -> str:
    """``value`` as one terminal-safe line: control and format characters escaped
    (``\\x1b``, ``\\n``, lone surrogates), long text shortened in the middle to ``limit``
    terminal columns (never inside a character, an emoji cluster or an escape)."""
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    return clip_middle(escaped_units(text, unsafe_char, _shown_escape), limit)


def _shown_escape(ch: str) -> str:
    return ch.encode("unicode_escape", "backslashreplace").decode("ascii")


def format_summary(results: Sequence[Result], width: int = 32) -> str:
    """A plain-text table: prompt (on one line, clipped to ``width`` terminal columns), new
    tokens, stop reason, time, tokens/s."""
    header = ("#", "prompt", "new tokens", "stop reason", "time s", "tokens/s")
    rows = [
        (str(i), clip(escaped_units(" ".join(r.prompt.split()), unsafe_char, _shown_escape), width),
         str(r.new_tokens), shown(r.stop_reason, 40),
         f"{r.time_s:.2f}", f"{r.tokens_per_s:.1f}")
        for i, r in enumerate(results)
    ]
    widths = [max(len(h), *(display_width(row[c]) for row in rows)) for c, h in enumerate(header)]
    right = {0, 2, 4, 5}

    def fmt(row: Sequence[str]) -> str:
        cells = []
        for c, cell in enumerate(row):
            pad = " " * (widths[c] - display_width(cell))
            cells.append(pad + cell if c in right else cell + pad)
        return "  ".join(cells).rstrip()

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(row) for row in rows]
    return "\n".join(lines)


def hold_interrupts() -> Any:
    """After a first Ctrl-C: further ones are ignored while what finished is saved, counted and
    reported (a second one would lose the partial trace or the report).  Returns the handler
    it replaced, for :func:`release_interrupts`.  Main thread only (signals are)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, signal.SIG_IGN)


def release_interrupts(handler: Any) -> None:
    """The SIGINT handler :func:`hold_interrupts` replaced, back."""
    if handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)


def _exit_interrupted(signum: int, frame: Any) -> None:  # pragma: no cover - ends the process
    os._exit(130)


_ENDING = []  # set by end_interrupted: the command was interrupted and is ending


def end_interrupted() -> None:
    """The command was interrupted and has reported: while the process ends, another Ctrl-C
    ends it at once with status 130 (Ray's or vLLM's shutdown at exit may take a while), never
    by the signal (status -2) or a traceback.  For the ``tracer`` command only."""
    if threading.current_thread() is threading.main_thread():
        _ENDING.append(True)
        signal.signal(signal.SIGINT, _exit_interrupted)


def _quiet_finalisation() -> None:  # pragma: no cover - runs at exit
    """Last of the exit handlers (registered first): the interpreter's finalisation resets a
    Python-level SIGINT handler to the default (a Ctrl-C there would end the process by the
    signal), but leaves SIG_IGN alone."""
    if _ENDING and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


atexit.register(_quiet_finalisation)
