"""Starting vLLM from the CLI flags, without vLLM (a stand-in ``vllm`` module): on CPU the KV
cache is sized unless the user set ``VLLM_CPU_KVCACHE_SPACE`` (vLLM's own default asks for 92%
of the machine's memory and refuses to start with less free), and a failed start is one CLI
error that names the fix."""

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
            seen["kw"] = kw
            if seen.get("fail"):
                raise RuntimeError("Engine core initialization failed. See root cause above.")

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM))
    return seen


def test_cpu_kv_cache_is_sized_when_unset(fake_vllm, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_AVPHYS_PAGES": 6 * 2**18, "SC_PAGE_SIZE": 4096}[name])
    vllm_cli.start_engine(_args())
    assert fake_vllm["space"] == "1"  # a quarter of 6 GiB, at least 1
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_AVPHYS_PAGES": 64 * 2**18, "SC_PAGE_SIZE": 4096}[name])
    assert vllm_cli.cpu_kv_cache_gib() == 4  # at most 4


def test_user_setting_is_kept_and_a_failed_start_is_one_error(fake_vllm, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "0.5")
    vllm_cli.start_engine(_args())
    assert fake_vllm["space"] == "0.5"
    fake_vllm["fail"] = True
    with pytest.raises(CliError, match=r"did not start \(RuntimeError: Engine core.*VLLM_CPU_KVCACHE_SPACE=0\.5 GiB"):
        vllm_cli.start_engine(_args())
