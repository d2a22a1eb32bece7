"""Fixtures of the vLLM tests.

Tests that need vLLM call ``pytest.importorskip("vllm")`` at module level, so in the main
environment (no vLLM) they are collected and skipped; ``make test`` runs them in ``.venv-vllm``.
(The folder is not called ``tests/vllm``: pytest puts ``tests/`` on ``sys.path``, and a folder
named ``vllm`` there imports as a namespace package ``vllm`` where vLLM is not installed.)
``llm`` is ONE engine per pytest session: starting it takes 25-45 s (it spawns a worker).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: plenty for these tests
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

CHAT_QUESTIONS = (
    "What is the capital of France?",
    "Name three colors of the rainbow.",
    "Write one sentence about the sea.",
)


@pytest.fixture(scope="session")
def llm():
    pytest.importorskip("vllm")
    from vllm import LLM

    from tracer.models import embedded_model_path

    engine = LLM(
        model=str(embedded_model_path()),
        dtype="float32",
        max_model_len=1024,
        enforce_eager=True,
        seed=0,
        disable_log_stats=False,  # per-request timing stats for the traces
    )
    yield engine
    core = getattr(engine.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):  # stop the worker while pytest still logs
        core.shutdown()


@pytest.fixture(scope="session")
def questions():
    return CHAT_QUESTIONS


@pytest.fixture(scope="session")
def chat_prompts(llm):
    """The three questions in the embedded model's chat template, as text."""
    tok = llm.get_tokenizer()
    return [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in CHAT_QUESTIONS
    ]
