"""The command line: ``python -m tracer run`` end to end (subprocess) and its helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tracer.cli import DEFAULT_PROMPTS, Result, build_parser, format_summary, main
from tracer.text import display_width

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "tracer", *args],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        cwd=REPO_ROOT,
        env=env,
        timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("tracer: error:")]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------
# Fast: parser, helpers, errors that stop before any model loads
# ------------------------------------------------------------------------------------------


def test_parser_defaults():
    args = build_parser().parse_args(["run"])
    assert args.model is None and args.max_new_tokens == 128 and not args.do_sample
    assert not args.with_prompt and not args.interactive and not args.no_trace
    assert args.trace_dir is None and not args.record_attention


def test_help_is_fast_and_lists_commands():
    proc = run_cli("--help", timeout=60)
    assert proc.returncode == 0
    assert "run" in proc.stdout and "inspect" in proc.stdout


def test_summary_table():
    rows = [Result("为什么要减少污染，保护环境？" * 3, "x", 8, "eos:<|im_end|>", 0.5), Result("hi", "y", 4, "max_length", 0.0)]
    table = format_summary(rows, width=10).splitlines()
    assert table[0].split() == ["#", "prompt", "new", "tokens", "stop", "reason", "time", "s", "tokens/s"]
    assert "…" in table[2] and "eos:<|im_end|>" in table[2] and "16.0" in table[2]
    assert table[3].rstrip().endswith("0.0")


def test_missing_data_file_exits_2(tmp_path, capsys):
    assert main(["run", "--no-trace", "--data-file", str(tmp_path / "none.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tracer: error: data file not found") and err.count("\n") == 1


def test_missing_model_path_exits_2(tmp_path):
    proc = run_cli("run", "--no-trace", "--model", str(tmp_path / "no-model"))
    assert_one_line_error(proc, "model path does not exist")


def test_non_model_folder_exits_2(tmp_path):
    proc = run_cli("run", "--no-trace", "--model", str(tmp_path))
    assert_one_line_error(proc, "not a model folder")


def test_no_trace_conflicts(capsys):
    assert main(["run", "--no-trace", "--record-attention"]) == 2
    assert "--no-trace cannot be combined" in capsys.readouterr().err


def test_inspect_missing_file_exits_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "x.trace")]) == 2
    assert "no such trace" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# Slow: the embedded model through a subprocess
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_no_trace_default_prompts(tmp_path):
    out = tmp_path / "sub" / "predictions.json"
    proc = run_cli("run", "--no-trace", "--max-new-tokens", "8", "--with-prompt", "--predictions-file", str(out))
    assert proc.returncode == 0, proc.stderr
    raw = out.read_text(encoding="utf-8")
    data = json.loads(raw)
    assert [d["Input"] for d in data] == list(DEFAULT_PROMPTS)
    assert all(set(d) == {"Input", "Output"} and d["Output"] for d in data)  # the seed's keys, each answer once
    assert DEFAULT_PROMPTS[0] in raw and "\\u" not in raw  # non-ASCII kept as is
    assert raw.startswith("[\n  {")  # indent 2
    table = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("#  prompt"))
    assert len(table[header + 2 :]) == 2
    assert all(("max_length" in row or "eos:" in row) for row in table[header + 2 :])


@pytest.mark.slow
def test_run_data_file(tmp_path):
    data = tmp_path / "prompts.txt"
    data.write_text("What is the capital of France?\n\n  Name a color.  \n", encoding="utf-8")
    out = tmp_path / "p.json"
    proc = run_cli(
        "run", "--no-trace", "--with-prompt", "--data-file", str(data),
        "--max-new-tokens", "12", "--predictions-file", str(out),
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(out.read_text(encoding="utf-8"))
    assert [d["Input"] for d in got] == ["What is the capital of France?", "Name a color."]
    assert "Paris" in got[0]["Output"]


@pytest.mark.slow
def test_run_interactive_stops_at_empty_line(tmp_path):
    out = tmp_path / "p.json"
    proc = run_cli(
        "run", "--no-trace", "--with-prompt", "--interactive", "--max-new-tokens", "12",
        "--predictions-file", str(out),
        stdin="What is the capital of France?\nSay hi.\n\nnever read\n",
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(out.read_text(encoding="utf-8"))
    assert [d["Input"] for d in got] == ["What is the capital of France?", "Say hi."]
    assert "Paris" in proc.stdout.splitlines()[0]


@pytest.mark.slow
def test_run_interactive_eof(tmp_path):
    proc = run_cli("run", "--no-trace", "--interactive", "--max-new-tokens", "4", stdin="Hello")
    assert proc.returncode == 0, proc.stderr
    assert "Hello" in proc.stdout  # the summary row


@pytest.mark.slow
def test_sampling_is_seeded_and_tracing_changes_nothing(tmp_path):
    args = ["run", "--with-prompt", "--do-sample", "--temperature", "1.3", "--top-k", "50", "--top-p", "0.95",
            "--repetition-penalty", "1.1", "--seed", "7", "--max-new-tokens", "10"]
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    assert run_cli(*args, "--no-trace", "--predictions-file", str(a)).returncode == 0
    assert run_cli(*args, "--no-trace", "--predictions-file", str(b)).returncode == 0
    assert run_cli(*args, "--predictions-file", str(c)).returncode == 0  # traced
    plain = json.loads(a.read_text(encoding="utf-8"))
    assert plain == json.loads(b.read_text(encoding="utf-8"))
    assert plain == json.loads(c.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------
# Traced runs (need the recorder API)
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_summary_clips_a_chinese_prompt_to_its_column(tmp_path):
    prompt = "为什么要减少污染，保护环境？请详细说明原因，并给出三条具体的建议。"  # 33 characters, 66 columns
    data = tmp_path / "zh.txt"
    data.write_text(prompt + "\n", encoding="utf-8")
    proc = run_cli("run", "--no-trace", "--max-new-tokens", "2", "--data-file", str(data))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("#  prompt"))
    header, rule, row = lines[at: at + 3]
    # the prompt column is 32 terminal columns at most: 15 characters (2 each) and "…"
    assert rule.split()[1] == "-" * 31
    assert row.startswith("0  " + prompt[:15] + "…  ")
    assert display_width(row[: row.index("…") + 1]) == 3 + 31
    # the next column lines up with its header in terminal columns
    end = header.index("new tokens") + len("new tokens")
    assert display_width(row[: row.index(" 2 ") + 2]) == display_width(header[:end])


@pytest.mark.slow
def test_run_traced_saves_one_trace_per_prompt(tmp_path):
    trace_dir = tmp_path / "traces"
    out = tmp_path / "p.json"
    proc = run_cli(
        "run", "--with-prompt", "--max-new-tokens", "6", "--trace-dir", str(trace_dir),
        "--predictions-file", str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert (trace_dir / "prompt_000.trace").exists() and (trace_dir / "prompt_001.trace").exists()
    assert len(json.loads(out.read_text(encoding="utf-8"))) == 2


@pytest.mark.slow
def test_run_traced_with_attention_then_inspect(tmp_path):
    trace_dir = tmp_path / "traces"
    data = tmp_path / "prompts.txt"
    data.write_text("Hi\n", encoding="utf-8")
    proc = run_cli(
        "run", "--record-attention", "--max-new-tokens", "3", "--data-file", str(data), "--trace-dir", str(trace_dir)
    )
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("inspect", str(trace_dir / "prompt_000.trace"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


# ------------------------------------------------------------------------------------------
# Nothing lost: incremental predictions, late failures, Ctrl-C (in-process, embedded model)
# ------------------------------------------------------------------------------------------


def test_predictions_writer_is_valid_json_after_every_answer(tmp_path, monkeypatch):
    from tracer.cli import outputs

    path = tmp_path / "p.json"
    writer = outputs.PredictionsWriter(path)
    for i in range(3):
        writer.add(Result(f"q{i} 你好", f"a{i}", 1, "max_length", 0.1))
        data = json.loads(path.read_text(encoding="utf-8"))
        assert [d["Input"] for d in data] == [f"q{j} 你好" for j in range(i + 1)]
        assert [d["Output"] for d in data] == [f"a{j}" for j in range(i + 1)]
    # a write that fails half-way leaves the previous file whole (and no temporary file);
    # the writer goes through the one atomic JSON writer, tracer.jsonio.write_json_atomic
    from tracer import jsonio

    real_replace = os.replace

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jsonio.os, "replace", broken_replace)
    with pytest.raises(Exception, match="No space left on device"):
        writer.add(Result("q3", "a3", 1, "max_length", 0.1))
    monkeypatch.setattr(jsonio.os, "replace", real_replace)
    assert len(json.loads(path.read_text(encoding="utf-8"))) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


@pytest.fixture
def cli_model(embedded, monkeypatch):
    """``tracer run`` in-process on the session's embedded model (no reload per test)."""
    import tracer.models

    monkeypatch.setattr(tracer.models, "load_model", lambda *a, **k: embedded)
    return embedded


def _fail_in_second_prompt(model, exc_type, decode_steps=2):
    """A forward pre-hook raising ``exc_type`` at the second prompt's ``decode_steps``-th
    decode forward (registered before tracing starts, so it runs before the tracer's hooks)."""
    state = {"prefills": 0, "decodes": 0}

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids.shape[1] > 1:
            state["prefills"] += 1
        elif state["prefills"] == 2:
            state["decodes"] += 1
            if state["decodes"] == decode_steps:
                raise exc_type("injected")

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def _two_prompts(tmp_path):
    data = tmp_path / "prompts.txt"
    data.write_text("What is the capital of France?\nName a colour.\n", encoding="utf-8")
    return data


def test_ctrl_c_keeps_finished_answers_and_the_partial_trace(cli_model, tmp_path, capsys):
    import tracer

    model, _ = cli_model
    out, traces = tmp_path / "out" / "p.json", tmp_path / "traces"
    handle = _fail_in_second_prompt(model, KeyboardInterrupt)
    try:
        code = main(["run", "--with-prompt", "--data-file", str(_two_prompts(tmp_path)), "--max-new-tokens", "6",
                     "--predictions-file", str(out), "--trace-dir", str(traces)])
    finally:
        handle.remove()
    err = capsys.readouterr().err.splitlines()
    assert code == 130
    assert len(err) == 1 and err[0].startswith("tracer: interrupted: 1 answer(s) finished, saved in"), err
    assert f"the partial trace of prompt 1 is in {traces / 'prompt_001.trace'}" in err[0]
    data = json.loads(out.read_text(encoding="utf-8"))
    assert [d["Input"] for d in data] == ["What is the capital of France?"] and "Paris" in data[0]["Output"]
    assert tracer.load_trace(traces / "prompt_000.trace").meta.status == "complete"
    partial = tracer.load_trace(traces / "prompt_001.trace")
    assert partial.meta.status == "interrupted"
    assert partial.num_steps == 2  # the prefill and one decode step ran before Ctrl-C
    assert partial.stop_reasons == ["interrupted"]
    assert (out.parent / "generation_config.json").is_file()


def test_late_failure_keeps_finished_answers(cli_model, tmp_path, capsys):
    model, _ = cli_model
    out = tmp_path / "p.json"
    handle = _fail_in_second_prompt(model, RuntimeError)
    try:
        code = main(["run", "--no-trace", "--with-prompt", "--data-file", str(_two_prompts(tmp_path)),
                     "--max-new-tokens", "6", "--predictions-file", str(out)])
    finally:
        handle.remove()
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert code == 2
    assert err == [f"tracer: error: prompt 1: RuntimeError: injected (1 finished answer(s) saved in {out})"]
    assert [d["Input"] for d in json.loads(out.read_text(encoding="utf-8"))] == ["What is the capital of France?"]
    assert "Paris" in captured.out  # the finished answer was printed as it finished


def test_prompt_over_the_memory_budget_is_one_line(cli_model, tmp_path, capsys):
    data = tmp_path / "long.txt"
    data.write_text("hello " * 2600 + "\n", encoding="utf-8")
    code = main(["run", "--record-attention", "--data-file", str(data), "--max-new-tokens", "2"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("tracer: error: prompt 0: recording this generation would take"), err
    assert "over the budget RecordConfig(max_bytes=2048.0 MiB)" in err[0]


# ------------------------------------------------------------------------------------------
# Subcommands from other modules (tracer compare)
# ------------------------------------------------------------------------------------------


def test_extension_subcommand_is_registered(monkeypatch, capsys):
    import types

    import tracer.cli as cli

    mod = types.ModuleType("tracer_fake_ext")

    def add_compare_parser(sub):
        p = sub.add_parser("compare", help="compare two traces")
        p.add_argument("a")
        p.add_argument("b")
        p.set_defaults(func=lambda args: print(f"compared {args.a} {args.b}") or 0)

    mod.add_compare_parser = add_compare_parser
    monkeypatch.setitem(sys.modules, "tracer_fake_ext", mod)
    monkeypatch.setattr(cli, "EXTENSIONS", (("tracer_fake_ext", "add_compare_parser", "compare"),))
    assert main(["compare", "x.trace", "y.trace"]) == 0
    assert capsys.readouterr().out == "compared x.trace y.trace\n"
    assert main(["compare", "x.trace"]) == 2  # its argument errors are one line too
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("tracer: error: the following arguments are required: b")


def test_absent_extension_is_no_command_and_broken_one_says_why(monkeypatch, capsys, tmp_path):
    import tracer.cli as cli

    monkeypatch.setattr(cli, "EXTENSIONS", (("tracer_no_such_module.cli", "add_compare_parser", "compare"),))
    assert main(["compare", "a", "b"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "invalid choice: 'compare'" in err[0]

    (tmp_path / "tracer_broken_ext.py").write_text("import tracer_missing_dependency\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "EXTENSIONS", (("tracer_broken_ext", "add_compare_parser", "compare"),))
    assert main(["compare", "a", "b"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["tracer: error: tracer compare is not available: No module named 'tracer_missing_dependency'"]


def test_tracer_warnings_print_on_one_line_and_an_in_process_interrupt_restores_sigint(monkeypatch, capsys):
    import signal
    import warnings

    import tracer.cli.run as run_cli
    from tracer.cli import main
    from tracer.errors import TracerWarning

    def cmd_run(args):
        warnings.warn("recording stopped\nat step 3 \x1b[31m", TracerWarning)
        raise KeyboardInterrupt

    monkeypatch.setattr(run_cli, "cmd_run", cmd_run)
    before = signal.getsignal(signal.SIGINT)
    with warnings.catch_warnings():
        warnings.simplefilter("always", TracerWarning)  # (the suite turns warnings into errors)
        assert main(["run"]) == 130
    assert signal.getsignal(signal.SIGINT) is before  # (the command itself keeps ignoring them while it ends)
    assert capsys.readouterr().err.splitlines() == ["tracer: warning: recording stopped at step 3 \\x1b[31m",
                                                    "tracer: interrupted"]


def test_an_error_after_holding_interrupts_still_restores_sigint_in_process(monkeypatch, capsys):
    import signal

    import tracer.cli.run as run_cli
    from tracer.cli import main
    from tracer.cli.common import CliError, hold_interrupts

    def cmd_run(args):
        hold_interrupts()  # as the partial-trace save does after a Ctrl-C
        raise CliError("the disk is full")

    monkeypatch.setattr(run_cli, "cmd_run", cmd_run)
    before = signal.getsignal(signal.SIGINT)
    assert main(["run"]) == 2
    assert signal.getsignal(signal.SIGINT) is before
    assert capsys.readouterr().err.strip() == "tracer: error: the disk is full"


def test_main_without_argv_called_from_python_leaves_sigint_as_it_was(monkeypatch, capsys):
    """Only the tracer command (tracer.cli.command) keeps Ctrl-C off while the process ends;
    main() called from Python with sys.argv gives the caller its handler back."""
    import signal
    import sys

    import tracer.cli.run as run_cli
    from tracer.cli import main

    def cmd_run(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_cli, "cmd_run", cmd_run)
    monkeypatch.setattr(sys, "argv", ["tracer", "run"])
    before = signal.getsignal(signal.SIGINT)
    assert main() == 130
    assert signal.getsignal(signal.SIGINT) is before
    assert capsys.readouterr().err.strip() == "tracer: interrupted"
