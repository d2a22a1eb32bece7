"""Per-token progress for ``tracer run``: a streamer handed to ``generate``.

``generate`` calls ``streamer.put(prompt_ids)`` once, then ``streamer.put(next_tokens)`` after
every step, then ``streamer.end()``.  The streamer only counts: it draws no random numbers and
touches no tensor the model uses, so the generated ids are the same with and without it
(tests/test_cli_multiturn.py checks this).  On CUDA ``generate`` copies each step's new tokens
to the host for the streamer, one small synchronisation per step: progress is off unless stderr
is a terminal or ``--progress`` is given.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

__all__ = ["progress_wanted", "token_progress"]


def progress_wanted(flag: bool | None, stream: TextIO | None = None) -> bool:
    """``--progress`` / ``--no-progress`` win; otherwise on when stderr is a terminal."""
    if flag is not None:
        return flag
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def token_progress(total: int, desc: str, stream: TextIO | None = None) -> Any:
    """A ``transformers`` streamer drawing a tqdm bar of new tokens on ``stream`` (stderr)."""
    from tqdm.auto import tqdm
    from transformers.generation.streamers import BaseStreamer

    class TokenProgress(BaseStreamer):
        def __init__(self) -> None:
            self.bar = tqdm(total=total, desc=desc, unit="tok", file=stream if stream is not None else sys.stderr,
                            leave=False, dynamic_ncols=True, mininterval=0.1)
            self.prompt_seen = False
            self.count = 0

        def put(self, value: Any) -> None:
            if not self.prompt_seen:  # the first call carries the prompt
                self.prompt_seen = True
                return
            n = int(value.shape[-1]) if getattr(value, "ndim", 0) > 1 else 1
            self.count += n
            self.bar.update(n)

        def end(self) -> None:
            self.bar.close()

    return TokenProgress()
