"""Corpus datasets (tracer.corpus): data files, the Parquet dataset (atomic parts, resume),
reading it (pandas, polars, DuckDB), comparing two, and ``tracer run --dataset`` refusals.

Fast tests build rows from synthetic traces (``tracer.testing.make_trace``); the ``slow`` ones
run the embedded model: the traced batch equals the untraced batch, the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("duckdb")

import tracer.models  # noqa: E402
from tracer.cli import main  # noqa: E402
from tracer.corpus.data import CorpusError, as_items, read_data_file  # noqa: E402
from tracer.corpus.dataset import CorpusWriter, open_dataset  # noqa: E402
from tracer.corpus.rows import trace_rows  # noqa: E402
from tracer.testing import make_trace  # noqa: E402

META = dict(engine="transformers", model="m", dtype="float32", settings={"max_new_tokens": 6}, chat=None,
            system=None, schema="hf-1", record={})


def write_synthetic(path: Path, seeds=(0, 1), ids=("a", "b", "c", "d"), prompts=None, meta=META):
    writer = CorpusWriter(path, dict(meta))
    prompts = prompts or [f"prompt {i}" for i in ids]
    for n, seed in enumerate(seeds):
        tr = make_trace(batch=2, steps=6, seed=seed, attention=False)
        seq, steps = trace_rows(tr, list(ids[2 * n:2 * n + 2]), prompts[2 * n:2 * n + 2], engine="transformers",
                                settings={})
        writer.write(seq, steps)
    return writer


# ------------------------------------------------------------------------------ data files
def test_plain_lines_and_jsonl(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\ufeffhello\n\n  你好，世界  \n", encoding="utf-8")
    items = read_data_file(f)
    assert [(i.id, i.prompt, i.line) for i in items] == [("1", "hello", 1), ("3", "你好，世界", 3)]
    j = tmp_path / "p.jsonl"
    j.write_text('{"id": "x", "prompt": "hi"}\n\n{"id": 7, "messages": [{"role": "user", "content": "问"}]}\n',
                 encoding="utf-8")
    items = read_data_file(j)
    assert [i.id for i in items] == ["x", "7"]
    assert items[1].prompt == [{"role": "user", "content": "问"}]
    assert json.loads(items[1].text)[0]["content"] == "问"


@pytest.mark.parametrize("body, fragment", [
    ('{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": "b"\n', "line 2: not valid JSON"),
    ('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n{"id": 1, "prompt": "c"}\n',
     "duplicate prompt id '1' on lines 1, 2, 3"),
    ('{"id": 1, "prompt": "   "}\n', "line 1: empty prompt"),
    ('{"id": 1}\n', "exactly one of 'prompt' and 'messages'"),
    ('{"id": 1, "prompt": "' + "x" * 40_000 + '"}\n', "over the limit"),
    ('{"id": true, "prompt": "a"}\n', "'id' must be"),
    ('{"id": 1, "messages": [{"role": "user"}]}\n', "'role' and 'content'"),
])
def test_bad_data_files(tmp_path, body, fragment):
    f = tmp_path / "bad.jsonl"
    f.write_text(body, encoding="utf-8")
    with pytest.raises(CorpusError, match=None) as err:
        read_data_file(f)
    assert fragment in str(err.value)


def test_python_prompts_duplicates_refused():
    with pytest.raises(CorpusError, match="duplicate prompt id 'a'"):
        as_items([("a", "x"), ("a", "y")])
    assert [i.id for i in as_items(["x", "y"])] == ["0", "1"]


# ------------------------------------------------------------------------------ the dataset
def test_dataset_written_and_read(tmp_path):
    d = tmp_path / "ds"
    write_synthetic(d)
    ds = open_dataset(d)
    seqs, steps = ds.sequences, ds.steps
    assert list(seqs.prompt_id) == ["a", "b", "c", "d"]
    assert len(steps) == int(seqs.num_tokens.sum())
    tr = make_trace(batch=2, steps=6, seed=0, attention=False)
    assert list(seqs.token_ids[0]) == tr.generated_ids(0).tolist()
    assert list(seqs.token_ids[1]) == tr.generated_ids(1).tolist()
    first = steps[steps.prompt_id == "a"].sort_values("step")
    raw = tr.steps[0].stages[0]
    assert first.logprob.iloc[0] == pytest.approx(float(raw.chosen_logprob[0]))
    assert list(first.topk_ids.iloc[0]) == raw.top.ids[0].tolist()
    lp = raw.top.values[0] - raw.top.logsumexp[0]
    assert np.allclose(first.topk_logprobs.iloc[0], lp, atol=1e-6)
    # each processor's masked count, per step
    procs = first.processors.iloc[0]
    assert [p["name"] for p in procs] == [p.name for p in tr.steps[0].processors]
    assert [p["newly_masked"] for p in procs] == [int(p.newly_masked[0]) for p in tr.steps[0].processors]
    # the same numbers through DuckDB and polars
    con = ds.duckdb()
    n, = con.execute("select count(*) from steps").fetchone()
    assert n == len(steps)
    by_id = dict(con.execute("select prompt_id, count(*) from steps group by 1").fetchall())
    assert by_id == steps.groupby("prompt_id").size().to_dict()
    assert ds.polars("sequences").height == 4
    meta = json.loads((d / "corpus.json").read_text())
    assert meta["format"] == "tracer-corpus" and meta["engine"] == "transformers"
    assert not list(d.rglob(".tmp-*"))


def test_resume_and_leftovers(tmp_path):
    d = tmp_path / "ds"
    w = write_synthetic(d, seeds=(0,), ids=("a", "b"))
    assert w.done_ids() == {"a", "b"}
    # a kill between the steps rename and the sequences rename leaves a steps part alone
    (d / "steps" / "part-dead-00000.parquet").write_bytes((d / "steps" / f"part-{w.run_id}-00000.parquet").read_bytes())
    (d / "steps" / ".tmp-x-part.parquet").write_bytes(b"half")
    assert len(open_dataset(d).steps) == len(open_dataset(d).steps.drop_duplicates(["prompt_id", "step"]))
    w2 = CorpusWriter(d, dict(META))
    assert w2.done_ids() == {"a", "b"}
    assert not (d / "steps" / "part-dead-00000.parquet").exists() and not (d / "steps" / ".tmp-x-part.parquet").exists()
    meta = json.loads((d / "corpus.json").read_text())
    assert len(meta["runs"]) == 2
    with pytest.raises(CorpusError, match="different settings"):
        CorpusWriter(d, {**META, "settings": {"max_new_tokens": 7}})


def test_folder_holding_something_else(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CorpusError, match="holds something else"):
        CorpusWriter(tmp_path, dict(META))
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------ compare
def test_compare_identical_and_different(tmp_path):
    write_synthetic(tmp_path / "a")
    write_synthetic(tmp_path / "b")
    same = tracer_compare(tmp_path / "a", tmp_path / "b")
    assert same.summary["identical_fraction"] == 1.0 and same.summary["max_abs_dlogprob"] == 0.0
    assert same.summary["mean_kl_lb"] == pytest.approx(0.0, abs=1e-9)
    write_synthetic(tmp_path / "c", seeds=(0, 5))  # prompts c, d differ
    diff = tracer_compare(tmp_path / "a", tmp_path / "c")
    rows = diff.prompts.set_index("prompt_id")
    assert list(rows.identical) == [True, True, False, False]
    assert rows.first_divergence["c"] == 0  # the synthetic tokens differ from the first step
    assert diff.summary["identical_fraction"] == 0.5
    assert int(diff.histogram.prompts.sum()) == 2
    assert set(diff.most_different(5).prompt_id) == {"c", "d"}


def tracer_compare(a, b):
    from tracer.corpus import compare_datasets

    return compare_datasets(a, b)


def test_compare_different_prompts_named(tmp_path):
    write_synthetic(tmp_path / "a")
    write_synthetic(tmp_path / "b", ids=("a", "b", "x", "d"))
    with pytest.raises(CorpusError, match="prompt id 'c' is only in A"):
        tracer_compare(tmp_path / "a", tmp_path / "b")


def test_compare_html_escapes_and_keeps_chinese(tmp_path, capsys):
    prompts = ["<script>alert(1)</script>", "中文提示", "c", "d"]
    write_synthetic(tmp_path / "a", prompts=prompts)
    write_synthetic(tmp_path / "b", seeds=(3, 4), prompts=prompts)
    out = tmp_path / "r.html"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--html", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;" in page and "中文提示" in page
    assert "identical answers" in capsys.readouterr().out


# ------------------------------------------------------------------------------ CLI refusals
@pytest.fixture
def no_model(monkeypatch):
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(tracer.models, "load_model", load_model)


def refused(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tracer: error: "), err
    assert fragment in err[0], err[0]


def test_cli_refusals_before_the_model(tmp_path, capsys, no_model):
    good = tmp_path / "p.jsonl"
    good.write_text('{"id": "a", "prompt": "hi"}\n', encoding="utf-8")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", prompt}\n', encoding="utf-8")
    refused(capsys, ["run", "--data-file", str(bad), "--dataset", str(tmp_path / "d")], "line 2: not valid JSON")
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.csv").write_text("1")
    refused(capsys, ["run", "--data-file", str(good), "--dataset", str(other)], "holds something else")
    assert (other / "x.csv").read_text() == "1"
    refused(capsys, ["run", "--data-file", str(good), "--dataset", str(tmp_path / "d"), "--batch-size", "0"],
            "--batch-size must be at least 1")
    refused(capsys, ["run", "--data-file", str(good), "--dataset", str(tmp_path / "d"), "--no-trace"],
            "--no-trace cannot be combined with --dataset")
    refused(capsys, ["run", "--data-file", str(good), "--dataset", str(tmp_path / "d"), "--ray", "--use-vllm"],
            "--ray with --use-vllm is not supported")
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"id": "a", "messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    refused(capsys, ["run", "--data-file", str(chat), "--dataset", str(tmp_path / "d")], "add --with-prompt")
    # mixed engines: a vLLM dataset is not appended to by generate (and what is there stays)
    write_synthetic(tmp_path / "v", meta={**META, "engine": "vllm", "schema": "vllm-1"})
    before = sorted(p.name for p in (tmp_path / "v").rglob("*.parquet"))
    refused(capsys, ["run", "--data-file", str(good), "--dataset", str(tmp_path / "v")], "holds vllm rows")
    assert sorted(p.name for p in (tmp_path / "v").rglob("*.parquet")) == before
    assert not (tmp_path / "d").exists()


def test_cli_resume_with_other_settings_refused_before_the_model(tmp_path, capsys, monkeypatch):
    """What the options decide (settings, chat, system) is compared with the dataset before the
    model loads; the dataset is left byte for byte as it was."""
    loads = []

    class Loaded(Exception):
        pass

    def load_model(*args, **kwargs):
        loads.append(kwargs)
        raise Loaded("the model loader was reached")

    monkeypatch.setattr(tracer.models, "load_model", load_model)
    data = tmp_path / "p.jsonl"
    data.write_text('{"id": "a", "prompt": "hi"}\n{"id": "z", "prompt": "new"}\n', encoding="utf-8")
    d = tmp_path / "ds"
    # what `tracer run --dataset d --max-new-tokens 6` records (pad/eos come from the tokenizer)
    write_synthetic(d, prompts=["hi", "prompt b", "prompt c", "prompt d"], meta={**META, "chat": False, "settings": {
        "max_new_tokens": 6, "do_sample": False, "seed": 0, "pad_token_id": 2, "eos_token_id": [2]}})
    before = {str(f.relative_to(d)): f.read_bytes() for f in d.rglob("*") if f.is_file()}
    base = ["run", "--dataset", str(d), "--data-file", str(data)]
    refused(capsys, [*base, "--max-new-tokens", "7"],
            'was written with a different settings ({"max_new_tokens": 6} vs {"max_new_tokens": 7} now)')
    refused(capsys, [*base, "--max-new-tokens", "6", "--do-sample", "--temperature", "0.5"],
            'different settings ({"do_sample": false, "temperature": null} vs {"do_sample": true, "temperature": 0.5} now)')
    refused(capsys, [*base, "--max-new-tokens", "6", "--seed", "1"], 'different settings ({"seed": 0} vs {"seed": 1} now)')
    refused(capsys, [*base, "--max-new-tokens", "6", "--with-prompt"], "different chat (false vs true now)")
    refused(capsys, [*base, "--max-new-tokens", "6", "--use-vllm"], "holds transformers rows")
    assert loads == []
    assert {str(f.relative_to(d)): f.read_bytes() for f in d.rglob("*") if f.is_file()} == before
    # the same options pass the early check and reach the loader (the rest is compared after it)
    refused(capsys, [*base, "--max-new-tokens", "6"], "the model loader was reached")
    assert len(loads) == 1
    assert {str(f.relative_to(d)): f.read_bytes() for f in d.rglob("*") if f.is_file()} == before
    # a vLLM dataset: its flags' part of the sampling settings, before the engine starts
    v = tmp_path / "v"
    write_synthetic(v, meta={**META, "engine": "vllm", "schema": "vllm-1", "chat": False, "settings": {
        "max_tokens": 6, "temperature": 0.0, "seed": 0, "stop_token_ids": [2]}})
    before = {str(f.relative_to(v)): f.read_bytes() for f in v.rglob("*") if f.is_file()}
    vbase = ["run", "--use-vllm", "--dataset", str(v), "--data-file", str(data)]
    refused(capsys, [*vbase, "--max-new-tokens", "7"], 'different settings ({"max_tokens": 6} vs {"max_tokens": 7} now)')
    refused(capsys, [*vbase, "--max-new-tokens", "6", "--repetition-penalty", "1.1"],
            'different settings ({"repetition_penalty": null} vs {"repetition_penalty": 1.1} now)')
    assert {str(f.relative_to(v)): f.read_bytes() for f in v.rglob("*") if f.is_file()} == before
    assert len(loads) == 1


def test_known_identity_refuses_nothing_the_writer_accepts(tmp_path):
    from tracer.corpus.dataset import check_known_identity

    meta = {**META, "settings": {"max_new_tokens": 6, "pad_token_id": 2}}
    write_synthetic(tmp_path / "ds", meta=meta)
    old = json.loads((tmp_path / "ds" / "corpus.json").read_text())
    check_known_identity(tmp_path / "ds", old, {"chat": None, "system": None, "schema": "hf-1"},
                         {"max_new_tokens": 6, "temperature": None})
    CorpusWriter(tmp_path / "ds", dict(meta))  # the same identity resumes
    with pytest.raises(CorpusError, match=r"different system \(null vs \"be brief\" now\)"):
        check_known_identity(tmp_path / "ds", old, {"system": "be brief"}, {})
    with pytest.raises(CorpusError, match=r'different settings \(\{"temperature": null\} vs \{"temperature": 0.5\} now\)'):
        check_known_identity(tmp_path / "ds", old, {}, {"max_new_tokens": 6, "temperature": 0.5})


# ------------------------------------------------------------------------------ real model
PROMPTS = ["What is the capital of France?", "用一句话介绍长城。", "Write a haiku about rain.",
           "List three prime numbers.", "你好！你是谁？"]


@pytest.mark.slow
def test_traced_batch_equals_untraced_batch(embedded, tmp_path):
    import torch

    from tracer.corpus.engine import prepare_batch, trace_corpus

    model, tok = embedded
    ds = trace_corpus(model, tok, PROMPTS, dataset=tmp_path / "ds", batch_size=len(PROMPTS), max_new_tokens=10)
    _, inputs, kwargs = prepare_batch(model, tok, PROMPTS, chat=None, system=None, max_new_tokens=10)
    with torch.inference_mode():
        out = model.generate(**inputs, **kwargs)
    new = out[:, inputs["input_ids"].shape[1]:].tolist()
    seqs = ds.sequences.set_index("prompt_id")
    stops = set(kwargs["eos_token_id"])
    for b in range(len(PROMPTS)):
        ids = list(seqs.token_ids[str(b)])
        assert ids == new[b][:len(ids)]
        rest = new[b][len(ids):]
        assert all(t == tok.pad_token_id for t in rest) and (not rest or ids[-1] in stops)
    # multibyte-safe texts: the tokens' texts joined are the decoded answer
    steps = ds.steps
    for pid in ("1", "4"):
        rows = steps[steps.prompt_id == pid].sort_values("step")
        shown = "".join(rows.token_text)
        assert "".join(rows.decoded).replace("<|im_end|>", "") == tok.decode(list(seqs.token_ids[pid]), skip_special_tokens=True)
    assert any(ord(c) > 0x1F000 for c in shown)  # the answer to prompt 4 is emoji, shown whole
    assert "\ufffd" not in shown  # a byte that never makes a character is shown escaped, not as U+FFFD
    # each row's settings are the dataset's (the seed included)
    assert all(json.loads(x) == ds.meta["settings"] for x in seqs.settings)


@pytest.mark.slow
def test_cli_dataset_resume_and_compare(tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}, ensure_ascii=False) + "\n"
                            for i, p in enumerate(PROMPTS[:4])), encoding="utf-8")
    short = tmp_path / "first.jsonl"
    short.write_text("".join(data.read_text(encoding="utf-8").splitlines(keepends=True)[:2]), encoding="utf-8")
    d = tmp_path / "ds"
    base = ["run", "--dataset", str(d), "--max-new-tokens", "6", "--batch-size", "2", "--with-prompt"]
    assert main([*base, "--data-file", str(short)]) == 0
    first = open_dataset(d).sequences
    assert list(first.prompt_id) == ["p0", "p1"]
    assert main([*base, "--data-file", str(data)]) == 0  # resumes: p0, p1 skipped
    out = capsys.readouterr().out
    assert "4 prompt(s) (2 new, 2 already there)" in out
    ds = open_dataset(d)
    assert sorted(ds.sequences.prompt_id) == ["p0", "p1", "p2", "p3"] and len(ds.parts) == 2
    # the first two rows are the very rows written by the first run
    again = ds.sequences.set_index("prompt_id")
    assert [list(again.token_ids[p]) for p in ("p0", "p1")] == [list(x) for x in first.token_ids]
    # resuming with other settings is refused, nothing lost
    assert main([*base[:-3], "--batch-size", "2", "--max-new-tokens", "7", "--with-prompt",
                 "--data-file", str(data)]) == 2
    assert "different settings" in capsys.readouterr().err
    assert len(open_dataset(d)) == 4
    # a second run with batch size 1 compared with the first
    d2 = tmp_path / "ds1"
    assert main(["run", "--dataset", str(d2), "--max-new-tokens", "6", "--batch-size", "1", "--with-prompt",
                 "--data-file", str(data)]) == 0
    html = tmp_path / "cmp.html"
    assert main(["compare", str(d), str(d2), "--html", str(html)]) == 0
    text = capsys.readouterr().out
    assert "prompts: 4" in text and html.exists()


@pytest.mark.slow
def test_killed_run_keeps_finished_batches(tmp_path):
    """SIGKILL after the first batch is written: that part is readable, a rerun finishes the rest."""
    import os
    import signal
    import subprocess
    import sys

    data = tmp_path / "p.txt"
    data.write_text("\n".join(PROMPTS[:4]) + "\n", encoding="utf-8")
    d = tmp_path / "ds"
    argv = [sys.executable, "-m", "tracer", "run", "--data-file", str(data), "--dataset", str(d),
            "--batch-size", "1", "--max-new-tokens", "24"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        for line in proc.stderr:
            if "prompt(s) written" in line:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    kept = open_dataset(d)
    assert 1 <= len(kept) < 4 and set(kept.sequences.prompt_id) <= {"1", "2", "3", "4"}
    assert len(kept.steps) == int(kept.sequences.num_tokens.sum())
    assert subprocess.run(argv, env=env, capture_output=True, timeout=300).returncode == 0
    assert sorted(open_dataset(d).sequences.prompt_id) == ["1", "2", "3", "4"]


def test_compare_shows_a_cut_character_escaped_not_as_replacement_char():
    """An answer cut mid-character: its last token's ``decoded`` is U+FFFD; the compare's texts
    show that token's bytes escaped (its ``token_text``), as every other view does."""
    from tracer.corpus.compare import _shown_pieces

    steps = {"decoded": ["十", "", "日", "\ufffd", ""],
             "token_text": ["十", "\\xe6\\x97→日", "\\xa5", "\\xe5", "\\x8c"]}
    assert _shown_pieces(steps) == ["十", "", "日", "\\xe5", "\\x8c"]  # e5 8c: 北 cut after two of its bytes


# ------------------------------------------------------------------------------ attack findings (stop 31)
def test_resume_refuses_an_id_already_there_under_another_prompt(tmp_path, capsys, no_model):
    """A resume skips the ids already in the dataset: an id naming another prompt now (a plain-text
    file numbers prompts by line, so a line added above shifts every id) is refused, not skipped."""
    from tracer.corpus.dataset import pending

    d = tmp_path / "ds"
    write_synthetic(d, seeds=(0,), ids=("1", "2"), prompts=["apple", "banana"], meta={**META, "chat": False, "settings": {
        "max_new_tokens": 6, "do_sample": False, "seed": 0, "pad_token_id": 2, "eos_token_id": [2]}})
    assert [it.id for it in pending(d, as_items([("1", "apple"), ("2", "banana"), ("3", "cherry")]))] == ["3"]
    with pytest.raises(CorpusError, match=r'prompt id "2" is already in dataset .* \("banana" there, "kiwi" now\)'):
        pending(d, as_items([("1", "apple"), ("2", "kiwi")]))
    shifted = tmp_path / "f2.txt"
    shifted.write_text("cherry\napple\nbanana\n", encoding="utf-8")
    before = {str(f.relative_to(d)): f.read_bytes() for f in d.rglob("*") if f.is_file()}
    refused(capsys, ["run", "--data-file", str(shifted), "--dataset", str(d), "--max-new-tokens", "6"],
            'prompt id "1" (line 1) is already in dataset')
    assert {str(f.relative_to(d)): f.read_bytes() for f in d.rglob("*") if f.is_file()} == before


def test_a_second_run_into_the_same_dataset_at_once_is_refused(tmp_path):
    import subprocess
    import sys

    from tracer.corpus.dataset import lock_dataset, unlock_dataset

    d = tmp_path / "ds"
    data = tmp_path / "p.txt"
    data.write_text("hi\n", encoding="utf-8")
    lock_dataset(d)  # as a run writing into it holds it
    try:
        cli = subprocess.run([sys.executable, "-m", "tracer", "run", "--data-file", str(data), "--dataset", str(d)],
                             capture_output=True, text=True, timeout=120)
        assert cli.returncode == 2
        assert cli.stderr.strip().splitlines() == [
            f"tracer: error: dataset {d} is being written by another run right now: wait for it to end, or use "
            "another folder"]
        lock_dataset(d)  # the same process holds it again (the engine's writer inside a CLI run)
        unlock_dataset(d)
    finally:
        unlock_dataset(d)
    free = subprocess.run([sys.executable, "-c", "import sys; from tracer.corpus.dataset import lock_dataset; "
                           "lock_dataset(sys.argv[1])", str(d)], capture_output=True, text=True, timeout=120)
    assert free.returncode == 0, free.stderr


def test_corpus_flags_are_refused_or_applied_never_ignored(tmp_path, capsys, no_model, monkeypatch):
    good = tmp_path / "p.txt"
    good.write_text("hi\n", encoding="utf-8")
    d = str(tmp_path / "d")
    refused(capsys, ["run", "--data-file", str(good), "--dataset", d, "--presence-penalty", "1.5"],
            "--presence-penalty is a vLLM option")
    refused(capsys, ["run", "--data-file", str(good), "--dataset", d, "--gpus", "xyz"], "--gpus takes")
    refused(capsys, ["run", "--data-file", str(good), "--no-trace", "--ray"], "--ray applies to a corpus run")
    refused(capsys, ["run", "--data-file", str(good), "--batch-size", "0", "--ray-workers", "3"],
            "--batch-size, --ray-workers apply to a corpus run: add --dataset DIR")
    refused(capsys, ["run", "--data-file", str(good), "--dataset", d, "--ray-workers", "3"],
            "--ray-workers applies to --ray")
    afile = tmp_path / "afile"
    afile.write_text("x")
    refused(capsys, ["run", "--data-file", str(good), "--dataset", str(afile / "sub")],
            f"dataset folder {afile / 'sub'} cannot be made or written")
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    refused(capsys, ["run", "--data-file", str(good), "--dataset", d], "RAY_ADDRESS=127.0.0.1:1: no Ray cluster answers")


def test_data_files_split_at_newlines_only_and_refuse_what_is_not_text(tmp_path):
    j = tmp_path / "ls.jsonl"
    j.write_text(json.dumps({"id": "a", "prompt": "one\u2028two\x85three"}, ensure_ascii=False) + "\r\n"
                 + json.dumps({"id": "b", "prompt": "x"}) + "\n", encoding="utf-8")
    assert [(i.id, i.prompt) for i in read_data_file(j)] == [("a", "one\u2028two\x85three"), ("b", "x")]
    t = tmp_path / "ff.txt"
    t.write_text("first\x0cstill first\nsecond\x1cprompt\rthird\n", encoding="utf-8")
    assert [(i.id, i.prompt) for i in read_data_file(t)] == [("1", "first\x0cstill first"), ("2", "second\x1cprompt"),
                                                             ("3", "third")]
    for body, fragment in [('{"id": "a", "prompt": "x\\ud800"}\n', "line 1: the prompt holds a lone surrogate (\\ud800)"),
                           ('{"id": "x\\udc80", "prompt": "x"}\n', "line 1: the id holds a lone surrogate (\\udc80)"),
                           ('{"id": "a", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "nested too deeply"),
                           ('{"id": "a", "prompt": "x\n', "line 1: not valid JSON (Unterminated string starting at, column")]:
        f = tmp_path / "bad.jsonl"
        f.write_text(body, encoding="utf-8")
        with pytest.raises(CorpusError) as err:
            read_data_file(f)
        assert fragment in str(err.value)


def test_a_half_moved_part_never_matches_a_parquet_glob(tmp_path, monkeypatch):
    import os

    from tracer.corpus import dataset

    moved = []
    real = os.replace
    monkeypatch.setattr(dataset.os, "replace", lambda src, dst: (moved.append(Path(src).name), real(src, dst)))
    write_synthetic(tmp_path / "ds", seeds=(0,), ids=("a", "b"))
    parts = [n for n in moved if "part-" in n]  # (corpus.json is written atomically too)
    assert len(parts) == 2 and all(n.startswith(".tmp-") and not n.endswith(".parquet") for n in parts), moved
    meta = tmp_path / "ds" / "corpus.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format_version": "x"}))
    with pytest.raises(CorpusError, match='format_version is not a number \\("x"\\)'):
        open_dataset(tmp_path / "ds")


def test_compare_output_and_trace_options_checked_before_the_work(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    write_synthetic(a)
    write_synthetic(b, seeds=(0, 2))
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "adir").mkdir()
    for html, fragment in ((afile / "x.html", "--html"), (tmp_path / "adir", "is a directory, not a file")):
        refused(capsys, ["compare", str(a), str(b), "--html", str(html)], fragment)
    refused(capsys, ["compare", str(a), str(b), "--stage", "final"], "--stage applies to comparing two traces")
    refused(capsys, ["compare", str(a), str(b), "--stage", "1", "--context", "2"],
            "--stage and --context apply to comparing two traces")
    refused(capsys, ["compare", str(a), str(b), "--context", "-5"], "--context must be 0 or more, got -5")
    assert main(["compare", str(a), str(b), "--html", str(tmp_path / "out" / "c.html")]) == 0
    assert (tmp_path / "out" / "c.html").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("gap", [0.005, 0.3])
def test_two_quick_ctrl_c_still_exit_130_with_what_is_saved(tmp_path, gap):
    """A second Ctrl-C while the first is handled (counting what is saved) or while the process
    ends: before, the count was lost (0.005 s) or the process died by the signal (0.3 s: -2)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data = tmp_path / "p.txt"
    data.write_text("\n".join(PROMPTS * 4) + "\n", encoding="utf-8")
    d = tmp_path / "ds"
    argv = [sys.executable, "-m", "tracer", "run", "--data-file", str(data), "--dataset", str(d),
            "--batch-size", "1", "--max-new-tokens", "24"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "prompt(s) written" in line:
                proc.send_signal(signal.SIGINT)
                time.sleep(gap)
                proc.send_signal(signal.SIGINT)
                break
        lines += proc.stderr.readlines()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == 130, lines
    last = lines[-1].strip()
    n = len(open_dataset(d))
    assert last == f"tracer: interrupted: {n} prompt(s) are saved in {d}", lines
    assert not any("Traceback" in ln or "Warning" in ln for ln in lines), lines


def test_review_mends_jsonl_rule_lock_errors_fork_and_in_process_release(tmp_path, capsys, no_model, monkeypatch):
    """What a review of the fixes above found: a malformed JSONL file run as text, a file
    system without flock refusing every run, a forked process keeping the lock, an in-process
    CLI run keeping it after it ended, --ray-workers ignored with --use-vllm."""
    import errno
    import os
    import subprocess
    import sys
    import time

    from tracer.corpus import dataset
    from tracer.corpus.data import looks_like_jsonl

    for first, jsonl in (("{", True), ("{'id': 1, 'prompt': 'x'}", True), ('{ "id": "a", }', True), ("{}", True),
                         ("{name} is a placeholder", False), ("plain", False)):
        assert looks_like_jsonl(first) is jsonl, first
    f = tmp_path / "pretty.json"
    f.write_text('{\n  "id": "a",\n  "prompt": "x"\n}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match="line 1: not valid JSON"):
        read_data_file(f)
    # flock unsupported: not held (as without fcntl); held elsewhere: refused
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    dataset.lock_dataset(tmp_path / "nfs")
    assert os.path.realpath(tmp_path / "nfs") not in dataset._LOCKS
    monkeypatch.undo()
    # a forked child does not keep the folder held after its parent releases it
    d = tmp_path / "ds"
    dataset.lock_dataset(d)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        time.sleep(20)
        os._exit(0)
    try:
        dataset.unlock_dataset(d)
        other = subprocess.run([sys.executable, "-c", "import sys; from tracer.corpus.dataset import lock_dataset; "
                                "lock_dataset(sys.argv[1])", str(d)], capture_output=True, text=True, timeout=120)
        assert other.returncode == 0, other.stderr
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    # an in-process CLI run releases the folder when it ends (here: refused after taking it)
    d2 = tmp_path / "d2"
    w = write_synthetic(d2, seeds=(0,), ids=("1", "2"), prompts=["apple", "banana"], meta={**META, "chat": False,
                        "settings": {"max_new_tokens": 6, "do_sample": False, "seed": 0, "pad_token_id": 2,
                                     "eos_token_id": [2]}})
    w.close()
    good = tmp_path / "p.txt"
    good.write_text("kiwi\n", encoding="utf-8")
    refused(capsys, ["run", "--data-file", str(good), "--dataset", str(d2), "--max-new-tokens", "6"],
            'prompt id "1" (line 1) is already in dataset')
    assert os.path.realpath(d2) not in dataset._LOCKS
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    refused(capsys, ["run", "--data-file", str(good), "--dataset", str(tmp_path / "d3"), "--use-vllm",
                     "--ray-workers", "3"], "--ray-workers applies to --ray (not to --use-vllm)")
