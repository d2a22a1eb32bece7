"""Starting vLLM from the CLI flags, without vLLM (a stand-in ``vllm`` module): on CPU the KV
cache is sized unless the user set ``VLLM_CPU_KVCACHE_SPACE`` (vLLM's own default asks for 92%
of the machine's memory and refuses to start with less free), for that engine only, and a
failed start is one CLI error that names the fix."""

from __future__ import annotations

import argparse
import os
import sys
import types

import pytest

from tracer.backends import vllm_cli
from tracer.cli import CliError


def _args(**kw):
    return argparse.Namespace(**{"model": None, "gpus": None, "device": "cpu", "dtype": "auto", "seed": 0,
                                 "tokenizer": None, "load_in_4bit": False, "load_in_8bit": False,
                                 "attn_implementation": None, **kw})


@pytest.fixture()
def fake_vllm(monkeypatch):
    seen = {}

    class LLM:
        def __init__(self, **kw):
            seen["space"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
            if seen.get("fail"):
                raise RuntimeError(seen["fail"])

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM))
    return seen


@pytest.mark.parametrize("free, gib", [(2.0, 1), (6.0, 1), (12.0, 3), (64.0, 4)])
def test_cpu_kv_cache_is_a_quarter_of_the_free_memory_within_1_to_4_gib(monkeypatch, free, gib):
    monkeypatch.setattr(vllm_cli, "_available_gib", lambda: free)
    assert vllm_cli.cpu_kv_cache_gib() == gib


def test_sized_for_this_engine_only_when_unset(fake_vllm, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(vllm_cli, "_available_gib", lambda: 12.0)
    vllm_cli.start_engine(_args())
    assert fake_vllm["space"] == "3" and "VLLM_CPU_KVCACHE_SPACE" not in os.environ
    assert 0 < vllm_cli._available_gib() < 2**20  # the real /proc/meminfo reads as GiB


def test_user_setting_is_kept_and_a_failed_start_is_one_error(fake_vllm, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "0.5")
    vllm_cli.start_engine(_args())
    assert fake_vllm["space"] == "0.5" and os.environ["VLLM_CPU_KVCACHE_SPACE"] == "0.5"
    fake_vllm["fail"] = "Engine core initialization failed. See root cause above."
    with pytest.raises(CliError, match=r"did not start \(RuntimeError: Engine core.*VLLM_CPU_KVCACHE_SPACE=0\.5 GiB"):
        vllm_cli.start_engine(_args())
    fake_vllm["fail"] = "no such model: /x"
    with pytest.raises(CliError) as err:
        vllm_cli.start_engine(_args())
    assert "no such model" in str(err.value) and "KVCACHE" not in str(err.value)
