"""``tracer run`` / ``tracer inspect`` refuse bad input before the model loads: exactly one
``tracer: error: ...`` line on stderr and exit status 2.

Most cases run in-process through ``main()`` with ``tracer.models.load_model`` replaced by a
function that fails the test, so a check that is missing (or comes after the model loads)
shows up as a wrong message.  File permissions: the tests run as root here and root ignores
them, so the read-only/unreadable cases run twice: once in a child process as the
unprivileged user ``nobody`` (real permissions, really refused by the kernel), and once
in-process with ``os.access`` / ``open`` replaced (the check's logic).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tracer.models
from tracer.cli import main
from tracer.cli import validation

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_model(monkeypatch):
    """Loading the model fails the test: every refusal must come before it."""

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(tracer.models, "load_model", load_model)


def refused(capsys, argv, fragment):
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("tracer: error: "), err
    assert fragment in lines[0], err
    assert out == ""  # nothing ran
    return lines[0]


# ------------------------------------------------------------------------------------------
# Generation values
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
        (["--max-new-tokens", "-3"], "--max-new-tokens must be at least 1, got -3"),
        (["--do-sample", "--temperature", "0"], "--temperature must be > 0 with --do-sample"),
        (["--do-sample", "--temperature", "-0.5"], "--temperature must be > 0 with --do-sample"),
        (["--do-sample", "--temperature", "nan"], "--temperature must be a finite number"),
        (["--temperature", "inf"], "--temperature must be a finite number"),
        (["--top-k", "-1"], "--top-k must be >= 0"),
        (["--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
        (["--repetition-penalty", "nan"], "--repetition-penalty must be a finite number"),
        (["--top-p", "2"], "--top-p must be in (0, 1], got 2.0"),
        (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
        (["--top-p", "nan"], "--top-p must be a finite number"),
        (["--seed", "-1"], "--seed must be in [0, 2**32)"),
        (["--dtype", "float8"], "unknown --dtype float8"),
        (["--gpus", "0,x"], "--gpus takes comma-separated GPU indices"),
        (["--preset", "seed", "--temperature", "0"], "--temperature must be > 0 with --do-sample"),
        (["--max-new-tokens", "many"], "argument --max-new-tokens: invalid int value: 'many'"),
        (["--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
    ],
)
def test_generation_values_refused(no_model, capsys, flags, fragment):
    refused(capsys, ["run", *flags], fragment)


def test_greedy_ignores_temperature_zero_but_not_nan(no_model, capsys):
    # without --do-sample a temperature of 0 is harmless (greedy), so it is not refused:
    # the run goes on to load the model (the fixture's failure is the one line)
    line = refused(capsys, ["run", "--temperature", "0"], "the model was loaded")
    assert "AssertionError" in line


def test_system_needs_the_chat_template(no_model, capsys):
    refused(capsys, ["run", "--system", "Be brief."], "--system applies to the chat template: add --with-prompt")


def test_text_that_was_not_utf8_is_refused_in_one_line(no_model, capsys, monkeypatch):
    """Bytes that are not UTF-8 reach Python as lone surrogates (argv, stdin): --system is refused
    before the model loads, a stdin line when it is read (both gave a tokenizer's TypeError)."""
    import io

    from tracer.cli import run
    from tracer.cli.common import CliError

    refused(capsys, ["run", "--with-prompt", "--system", "caf\udce9"],
            "--system is not valid UTF-8 text (it holds \\udce9)")
    refused(capsys, ["run", "--dataset", "ds", "--with-prompt", "--system", "caf\udce9"],
            "--system is not valid UTF-8 text (it holds \\udce9)")
    monkeypatch.setattr(sys, "stdin", io.StringIO("fine\ncaf\udce9 ok\n"))  # (surrogateescape: a C locale)
    lines = run.stdin_prompts()
    assert next(lines) == "fine"
    with pytest.raises(CliError, match="stdin line 2 is not valid UTF-8 text"):
        next(lines)
    # a UTF-8 locale decodes stdin strictly: the bytes fail as they are read (a buffer at a time)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"fine\ncaf\xe9 ok\n"), encoding="utf-8"))
    with pytest.raises(CliError, match=r"stdin is not valid UTF-8 text \(at or after its line 1\)"):
        list(run.stdin_prompts())


# ------------------------------------------------------------------------------------------
# Files read
# ------------------------------------------------------------------------------------------


def test_binary_data_file(no_model, capsys, tmp_path):
    data = tmp_path / "prompts.bin"
    data.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00")
    refused(capsys, ["run", "--data-file", str(data)], "data file looks binary (a NUL byte at offset 7)")


def test_latin1_data_file(no_model, capsys, tmp_path):
    data = tmp_path / "prompts.txt"
    data.write_bytes("Où est le café ?\n".encode("latin-1"))
    refused(capsys, ["run", "--data-file", str(data)], "data file is not UTF-8 text (byte 0xf9 at offset 1)")


def test_data_file_is_a_directory(no_model, capsys, tmp_path):
    refused(capsys, ["run", "--data-file", str(tmp_path)], "data file is a directory, not a file")


def test_data_file_missing(no_model, capsys, tmp_path):
    refused(capsys, ["run", "--data-file", str(tmp_path / "none.txt")], "data file not found")


def test_unreadable_data_file_logic(no_model, capsys, tmp_path, monkeypatch):
    data = tmp_path / "prompts.txt"
    data.write_text("hello\n", encoding="utf-8")

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(validation, "open", denied, raising=False)
    refused(capsys, ["run", "--data-file", str(data)], "cannot read data file")


def test_jsonl_data_file_gives_its_prompts_not_its_raw_lines(tmp_path):
    """Without --dataset a JSONL file is read as --dataset reads it: the prompts, not the lines."""
    data = tmp_path / "zh.jsonl"
    data.write_text('{"id": "bj", "prompt": "用一句话介绍北京。"}\n\n{"prompt": "{not} a brace line"}\n',
                    encoding="utf-8")
    assert validation.read_prompt_file(data) == ["用一句话介绍北京。", "{not} a brace line"]
    plain = tmp_path / "plain.txt"
    plain.write_text("{name} is a placeholder, not JSON\nsecond\n", encoding="utf-8")
    assert validation.read_prompt_file(plain) == ["{name} is a placeholder, not JSON", "second"]


def test_jsonl_data_file_refusals_before_the_model(no_model, capsys, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "ok"}\n{"prompt": "ok", \n', encoding="utf-8")
    refused(capsys, ["run", "--data-file", str(data)], "line 2")
    first = tmp_path / "first.jsonl"
    first.write_text('{"prompt": "a broken first line"\n{"prompt": "ok"}\n', encoding="utf-8")
    refused(capsys, ["run", "--data-file", str(first)], "line 1")  # not sent as raw text
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"prompt": "ok"}\n{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    refused(capsys, ["run", "--data-file", str(chat)], "line 2: chat 'messages' prompts are read with --dataset")


def test_data_file_with_a_bom_and_blank_lines_is_read(tmp_path):
    data = tmp_path / "prompts.txt"
    data.write_bytes("\ufeff你好\r\n\r\n  second  \n".encode("utf-8"))
    assert validation.read_prompt_file(data) == ["你好", "second"]


def test_inspect_name_too_long(capsys):
    refused(capsys, ["inspect", "x" * 300], "File name too long")


def test_inspect_missing(capsys, tmp_path):
    refused(capsys, ["inspect", str(tmp_path / "x.trace")], "no such trace")


def test_inspect_name_with_escape_sequences_is_shown_escaped(capsys, tmp_path):
    line = refused(capsys, ["inspect", str(tmp_path / "a\x1b[31mred.trace")], "no such trace")
    assert "\x1b" not in line and "\\x1b[31mred" in line


# ------------------------------------------------------------------------------------------
# Folders and files written
# ------------------------------------------------------------------------------------------


def test_trace_dir_is_a_file(no_model, capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    refused(capsys, ["run", "--trace-dir", str(f)], "is a file, not a folder")


def test_trace_dir_under_a_file(no_model, capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    refused(capsys, ["run", "--trace-dir", str(f / "a" / "b")], f"is under a file ({f})")


def test_predictions_file_is_a_directory(no_model, capsys, tmp_path):
    refused(capsys, ["run", "--predictions-file", str(tmp_path)], "is a directory, not a file")


def test_predictions_file_under_a_file(no_model, capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    refused(capsys, ["run", "--predictions-file", str(f / "p.json")], "is under a file")


@pytest.mark.parametrize("option", ["--trace-dir", "--predictions-file"])
def test_read_only_folder_logic(no_model, capsys, tmp_path, monkeypatch, option):
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path) == ro and mode & os.W_OK:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(validation.os, "access", access)
    target = ro / "sub" / ("p.json" if option == "--predictions-file" else "traces")
    refused(capsys, ["run", option, str(target)], f"cannot write {option} {target} (in {ro}): permission denied")


def test_write_probe_failure_is_refused(no_model, capsys, tmp_path, monkeypatch):
    """os.access says yes but creating a file fails (a read-only mount): still refused."""

    def mkstemp(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(validation.tempfile, "mkstemp", mkstemp)
    refused(capsys, ["run", "--predictions-file", str(tmp_path / "p.json")], "read-only file system")


def test_device_cuda_without_cuda(no_model, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    refused(capsys, ["run", "--device", "cuda"], "--device cuda: no CUDA GPU is available here")


def test_unknown_device(no_model, capsys):
    refused(capsys, ["run", "--device", "tpu9"], "unknown --device tpu9")


def test_use_vllm_without_the_backend_names_the_extra(no_model, capsys, monkeypatch):
    import importlib

    real = importlib.import_module

    def import_module(name, *args):
        if name == "vllm":
            raise ModuleNotFoundError("No module named 'vllm'", name="vllm")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", import_module)
    refused(capsys, ["run", "--use-vllm"], "--use-vllm needs the vLLM backend (vllm is not installed): "
                                           "pip install 'tracer[vllm]'")


# ------------------------------------------------------------------------------------------
# Real permissions: a child process that the kernel holds to file permissions
# ------------------------------------------------------------------------------------------


def _unprivileged_prefix() -> list[str] | None:
    """Root ignores file permissions through CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH; a child
    started without them in its bounding set is refused like any user.  Not root: as is."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]


def _as_unprivileged(prefix: list[str], *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONIOENCODING="utf-8")
    return subprocess.run([*prefix, sys.executable, "-m", "tracer", *args], capture_output=True, text=True,
                          encoding="utf-8", env=env, cwd=REPO_ROOT, timeout=120)


@pytest.mark.parametrize("option", ["--trace-dir", "--predictions-file", "--data-file"])
def test_real_permissions(tmp_path, option):
    prefix = _unprivileged_prefix()
    if prefix is None:
        pytest.skip("running as root without setpriv: cannot drop the permission override")
    ro = tmp_path / "ro"
    ro.mkdir()
    if option == "--data-file":
        target = ro / "prompts.txt"
        target.write_text("hello\n", encoding="utf-8")
        target.chmod(0o000)
        fragment = "cannot read data file"
    else:
        target = ro / ("p.json" if option == "--predictions-file" else "traces")
        fragment = f"cannot write {option}"
    ro.chmod(0o555)
    try:
        # the model path does not exist: a missing check would fail later with another message
        proc = _as_unprivileged(prefix, "run", "--model", str(tmp_path / "no-model"), option, str(target))
    finally:
        ro.chmod(0o755)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("tracer: error: ") and fragment in lines[0], proc.stderr
    assert "permission denied" in lines[0].lower()
