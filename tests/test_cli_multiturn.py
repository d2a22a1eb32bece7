"""``tracer run``: multi-turn conversations reusing the cache, the seed's preset and system
prompt, ``generation_config.json``, and per-token progress that changes no output."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tracer
from tracer.cli import PRESETS, SEED_SYSTEM_PROMPT, build_parser, main
from tracer.cli.chat import first_difference
from tracer.cli.run import apply_preset

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "tracer", *args], input=stdin, capture_output=True, text=True,
                          encoding="utf-8", cwd=REPO_ROOT, env=env, timeout=timeout)


@pytest.fixture
def cli_model(embedded, monkeypatch):
    """``tracer run`` in-process on the session's embedded model (no reload per test)."""
    import tracer.models

    monkeypatch.setattr(tracer.models, "load_model", lambda *a, **k: embedded)
    return embedded


# ------------------------------------------------------------------------------------------
# Preset and system prompt (fast: the parser only)
# ------------------------------------------------------------------------------------------


def _parsed(*argv: str):
    args = build_parser().parse_args(["run", *argv])
    apply_preset(args)
    return args


def test_preset_seed_is_the_seed_generation_config():
    args = _parsed("--preset", "seed")
    got = {k: getattr(args, k) for k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                                          "max_new_tokens", "system")}
    assert got == {"do_sample": True, "temperature": 0.2, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1,
                   "max_new_tokens": 400, "system": "You are a helpful assistant. 你是一个乐于助人的助手。"}
    assert PRESETS["seed"]["system"] == SEED_SYSTEM_PROMPT


def test_explicit_flags_override_the_preset():
    args = _parsed("--preset", "seed", "--max-new-tokens", "5", "--no-do-sample", "--top-k", "0",
                   "--system", "Be brief.")
    assert (args.max_new_tokens, args.do_sample, args.top_k, args.system) == (5, False, 0, "Be brief.")
    assert (args.temperature, args.top_p, args.repetition_penalty) == (0.2, 0.9, 1.1)
    # explicit values equal to the defaults still win
    assert _parsed("--preset", "seed", "--max-new-tokens", "128").max_new_tokens == 128


def test_without_preset_nothing_changes():
    args = _parsed()
    assert (args.max_new_tokens, args.do_sample, args.temperature, args.system) == (128, False, None, None)


def test_first_difference():
    import torch

    t = torch.tensor
    assert first_difference(t([1, 2, 3]), t([1, 2, 3, 4])) is None
    assert first_difference(t([1, 2, 3]), t([1, 9, 3, 4])) == 1
    assert first_difference(t([1, 2, 3]), t([1, 2])) == 2
    assert first_difference(t([], dtype=torch.long), t([5])) is None


# ------------------------------------------------------------------------------------------
# Multi-turn on the embedded model
# ------------------------------------------------------------------------------------------


def test_multi_turn_from_stdin_reuses_the_cache(embedded, tmp_path):
    traces, out = tmp_path / "traces", tmp_path / "p.json"
    proc = run_cli("run", "--interactive", "--multi-turn", "--max-new-tokens", "12", "--trace-dir", str(traces),
                   "--predictions-file", str(out), stdin="What is the capital of France?\nAnd of Italy?\n\nnever\n")
    assert proc.returncode == 0, proc.stderr
    answers = json.loads(out.read_text(encoding="utf-8"))
    assert [a["Input"] for a in answers] == ["What is the capital of France?", "And of Italy?"]
    assert "Paris" in answers[0]["Output"] and "Rome" in answers[1]["Output"]  # turn 2 saw turn 1
    turn1 = tracer.load_trace(traces / "turn_000.trace")
    turn2 = tracer.load_trace(traces / "turn_001.trace")
    assert turn1.cache.reused_len == 0
    assert turn1.steps[0].inputs.input_ids.shape[1] == turn1.prompt_len
    reused = turn2.cache.reused_len
    # the cache held turn 1's prompt and every generated token but the last (never fed)
    assert reused == turn1.prompt_len + int(turn1.num_new_tokens[0]) - 1
    assert turn2.steps[0].inputs.cache_len_before == reused
    prefill = turn2.steps[0].inputs.input_ids
    assert prefill.shape[1] == turn2.prompt_len - reused  # only the new tokens were fed
    assert prefill[0].tolist() == turn2.prompt_ids[0, reused:].tolist()
    # the re-rendered history starts with exactly the cached tokens
    assert turn2.prompt_ids[0, :reused].tolist() == turn1.sequences[0, :reused].tolist()
    assert "differs from the cached tokens" not in proc.stderr


def test_multi_turn_falls_back_when_the_history_does_not_match(cli_model, tmp_path, capsys, monkeypatch):
    _, tok = cli_model
    # a template that renders earlier answers with a prefix the model never generated
    changed = tok.chat_template.replace("message['content']", "('[A] ' if message['role'] == 'assistant' else '') "
                                        "+ message['content']")
    assert changed != tok.chat_template
    monkeypatch.setattr(tok, "chat_template", changed)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\nAnd of Italy?\n"))
    traces = tmp_path / "traces"
    code = main(["run", "--interactive", "--multi-turn", "--max-new-tokens", "8", "--trace-dir", str(traces)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "tracer: note: turn 1: the re-rendered history differs from the cached tokens at token" in err
    turn2 = tracer.load_trace(traces / "turn_001.trace")
    assert turn2.cache.reused_len == 0
    assert turn2.steps[0].inputs.input_ids.shape[1] == turn2.prompt_len  # a fresh prefill


# ------------------------------------------------------------------------------------------
# Seed fidelity on the embedded model
# ------------------------------------------------------------------------------------------


def test_preset_seed_run_writes_generation_config_and_uses_the_system_prompt(cli_model, tmp_path, capsys):
    out, traces = tmp_path / "run" / "predictions.json", tmp_path / "traces"
    code = main(["run", "--preset", "seed", "--with-prompt", "--max-new-tokens", "4", "--predictions-file", str(out),
                 "--trace-dir", str(traces)])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out.parent / "generation_config.json").read_text(encoding="utf-8"))
    assert {k: config[k] for k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                                   "max_new_tokens")} == {"do_sample": True, "temperature": 0.2, "top_k": 40,
                                                          "top_p": 0.9, "repetition_penalty": 1.1,
                                                          "max_new_tokens": 4}
    assert config["eos_token_id"] == [2]  # <|im_end|>: the embedded model's terminator
    trace = tracer.load_trace(traces / "prompt_000.trace")
    assert SEED_SYSTEM_PROMPT in trace.prompts[0] and "为什么要减少污染，保护环境？" in trace.prompts[0]
    assert trace.steps[0].sampled  # the preset samples
    assert trace.meta.generation_config["top_k"] == 40 and trace.meta.generation_config["temperature"] == 0.2
    data = json.loads(out.read_text(encoding="utf-8"))
    assert [d["Input"] for d in data] == ["为什么要减少污染，保护环境？", "你有什么建议？"]


def test_system_prompt_reaches_the_template(cli_model, tmp_path, capsys):
    traces = tmp_path / "traces"
    data = tmp_path / "q.txt"
    data.write_text("Hi\n", encoding="utf-8")
    code = main(["run", "--with-prompt", "--system", "Answer like a pirate.", "--data-file", str(data),
                 "--max-new-tokens", "2", "--trace-dir", str(traces)])
    assert code == 0, capsys.readouterr().err
    prompt = tracer.load_trace(traces / "prompt_000.trace").prompts[0]
    assert prompt.startswith("<|im_start|>system\nAnswer like a pirate.<|im_end|>")


# ------------------------------------------------------------------------------------------
# Per-token progress
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("traced", [False, True])
def test_progress_changes_no_output(cli_model, capsys, monkeypatch, traced):
    from tracer.cli import run as run_module

    made = []
    real = run_module.token_progress

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(run_module, "token_progress", spy)
    flags = ["--with-prompt", "--do-sample", "--temperature", "1.3", "--seed", "3", "--max-new-tokens", "10"]
    results = {}
    for progress in ("--progress", "--no-progress"):
        args = build_parser().parse_args(["run", *flags, progress, *([] if traced else ["--no-trace"])])
        apply_preset(args)
        runner = run_module.Runner(args)
        results[progress] = runner.run_prompt("Tell me a story.", 0)
    with_bar, without = results["--progress"], results["--no-progress"]
    assert with_bar.token_ids == without.token_ids and len(with_bar.token_ids) > 0
    assert len(made) == 1 and made[0].count == with_bar.new_tokens  # one bar, one tick per new token
    err = capsys.readouterr().err
    assert "prompt 0" in err and "tok" in err  # the bar, named like the summary row


def test_progress_auto_only_on_a_terminal():
    from tracer.cli.progress import progress_wanted

    class Stream(io.StringIO):
        def __init__(self, tty):
            super().__init__()
            self.tty = tty

        def isatty(self):
            return self.tty

    assert progress_wanted(None, Stream(True)) and not progress_wanted(None, Stream(False))
    assert progress_wanted(True, Stream(False)) and not progress_wanted(False, Stream(True))
