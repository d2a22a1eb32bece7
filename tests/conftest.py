"""Shared fixtures.

- ``tiny_model``: a random-weight 2-layer Llama (vocab 256), seeded, eval, fp32 — unit speed.
- ``tiny_inputs``: a tokenizer-free helper making ``input_ids``/``attention_mask`` for it.
- ``embedded``: ``(model, tokenizer)`` of the real embedded SmolLM2-135M-Instruct (slow).
- ``llama3_tokenizer``: the Llama 3.2 tokenizer from the installed wheel.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Keep the converted embedded model in the checkout (git-ignored), as the Makefile does.
os.environ.setdefault("TRACER_CACHE_DIR", str(REPO_ROOT / ".cache" / "tracer"))

TINY_VOCAB = 256


def make_tiny_llama(seed: int = 0):
    """A random-weight LlamaForCausalLM small enough for unit tests (eval mode, fp32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    return model


def make_inputs(batch: int = 1, seq: int = 6, *, seed: int = 0, left_pad: int = 0, vocab: int = TINY_VOCAB):
    """Token ids without a tokenizer: ``{"input_ids", "attention_mask"}``, each ``(batch, seq)``.

    Ids are drawn from ``[3, vocab)`` (0 pad, 1 bos, 2 eos are reserved). With ``left_pad > 0``
    the last sequence gets that many left pad positions (id 0, mask 0).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if left_pad:
        ids[-1, :left_pad] = 0
        mask[-1, :left_pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def tiny_inputs():
    """The :func:`make_inputs` helper (call it: ``tiny_inputs(batch=2, seq=5)``)."""
    return make_inputs


@pytest.fixture(scope="session")
def embedded():
    """``(model, tokenizer)`` of the embedded model, loaded once per session."""
    from tracer.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def llama3_tokenizer():
    from tracer.models import load_tokenizer

    return load_tokenizer("llama-3")


def pytest_collection_modifyitems(items):
    # Anything that uses the real embedded model is slow.
    for item in items:
        if "embedded" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
