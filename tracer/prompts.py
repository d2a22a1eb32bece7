"""One prompt builder for every engine: the exact token ids a prompt becomes.

``tracer run`` (HF ``generate``), ``tracer run --use-vllm`` and any other engine call
:func:`build_prompt` and hand the model its ``ids``, so the same flags give every engine the
same prompt, token for token (vLLM receives the ids, not a string it would tokenize again).

The rule, as the seed script's ``--with-prompt``:

* ``chat=False`` and a string: the string as it is, tokenized with the tokenizer's special
  tokens (a Llama-3 tokenizer adds ``<|begin_of_text|>``);
* ``chat=True`` (or a list of ``{"role", "content"}`` messages): the tokenizer's chat template
  with the assistant header (``add_generation_prompt=True``), ``system`` first when given and
  the messages do not start with one, tokenized *without* adding special tokens (the template
  already has them: adding them again would put a second ``<|begin_of_text|>`` in front).

No torch here: vLLM's process and the CLI's validation import it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

__all__ = ["BuiltPrompt", "build_prompt", "build_prompts", "chat_messages"]

@dataclass(frozen=True)
class BuiltPrompt:
    """One prompt as an engine receives it."""

    text: str
    """The text given to the tokenizer (the templated chat when ``chat``)."""
    ids: tuple[int, ...]
    """Its token ids, unpadded: exactly what the model sees."""

    def vllm(self) -> dict[str, Any]:
        """vLLM's ``TokensPrompt``: the ids (vLLM does not tokenize again) and the text."""
        return {"prompt_token_ids": list(self.ids), "prompt": self.text}


def chat_messages(prompt: Any, system: str | None = None) -> list[dict[str, str]]:
    """``[{"role": "system", ...}?, {"role": "user", "content": prompt}]``; a message list is kept
    as it is, with ``system`` put first unless it already starts with a system message."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if not messages:
        raise ValueError("no messages given")
    if system is not None and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def build_prompt(tokenizer: Any, prompt: Any, *, chat: bool, system: str | None = None) -> BuiltPrompt:
    """The text and token ids ``prompt`` becomes (see the module doc for the rule).

    ``prompt``: a string, or a list of ``{"role", "content"}`` messages (always templated).
    ``system`` needs the chat template: given with ``chat=False`` and a string prompt it is
    refused (``ValueError``), never dropped."""
    if isinstance(prompt, str) and not chat:
        if system is not None:
            raise ValueError("a system prompt needs the chat template (chat=True)")
        text, special = prompt, True
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template")
        text = tokenizer.apply_chat_template(chat_messages(prompt, system), tokenize=False, add_generation_prompt=True)
        special = False
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    return BuiltPrompt(text, tuple(int(i) for i in ids))


def build_prompts(tokenizer: Any, prompts: Iterable[Any], *, chat: bool, system: str | None = None) -> list[BuiltPrompt]:
    """:func:`build_prompt` for each prompt."""
    return [build_prompt(tokenizer, p, chat=chat, system=system) for p in prompts]
