"""``tracer compare DIR_A DIR_B`` on corpus datasets: runs with other settings are compared and
the differences named, an answer cut by its length limit is no divergence, the prompts as fed
are compared, both datasets are checked against the schema tracer writes, dataset text is
escaped, an empty dataset is refused.

Datasets are written with :class:`CorpusWriter` from synthetic traces' rows
(``tracer.testing.make_trace`` -> ``tracer.corpus.rows.trace_rows``), edited where a test needs
another answer, stop reason or prompt as fed."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest

pytest.importorskip("pyarrow")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from tracer.cli import main  # noqa: E402
from tracer.corpus.compare import compare_datasets  # noqa: E402
from tracer.corpus.data import CorpusError  # noqa: E402
from tracer.corpus.dataset import CorpusWriter  # noqa: E402
from tracer.corpus.rows import trace_rows  # noqa: E402
from tracer.testing import make_trace  # noqa: E402
from tracer.text import terminal_safe  # noqa: E402

META = dict(engine="transformers", model="m", dtype="float32", settings={"max_new_tokens": 6}, chat=None,
            system=None, schema="hf-1", record={})
IDS = ("a", "b", "c", "d")


def synthetic_rows(seeds=(0, 1)):
    """Sequence rows and step rows of prompts a..d (two batches of two)."""
    seq, steps = [], []
    for n, seed in enumerate(seeds):
        tr = make_trace(batch=2, steps=6, seed=seed, attention=False)
        s, st = trace_rows(tr, list(IDS[2 * n:2 * n + 2]), [f"prompt {i}" for i in IDS[2 * n:2 * n + 2]],
                           engine="transformers", settings={})
        seq += s
        steps += st
    return seq, steps


def write(path: Path, seq, steps, meta=META):
    """One part per two prompts, as the engine writes them."""
    writer = CorpusWriter(path, copy.deepcopy(dict(meta)))
    for n in range(0, len(seq), 2):
        ids = {r["prompt_id"] for r in seq[n:n + 2]}
        writer.write(seq[n:n + 2], [r for r in steps if r["prompt_id"] in ids])
    if hasattr(writer, "close"):
        writer.close()
    return path


def cut(seq, steps, pid: str, keep: int, reason: str):
    """Prompt ``pid``'s answer cut to its first ``keep`` tokens, stopped for ``reason``."""
    seq, steps = copy.deepcopy(seq), copy.deepcopy(steps)
    row = next(r for r in seq if r["prompt_id"] == pid)
    row["token_ids"] = row["token_ids"][:keep]
    row["num_tokens"] = keep
    row["stop_reason"] = reason
    mine = [r for r in steps if r["prompt_id"] == pid]
    dropped = {id(r) for r in mine[keep:]}
    return seq, [r for r in steps if id(r) not in dropped]


def rewrite_part(folder: Path, table: str, change) -> None:
    """Replace the first part file of ``table`` with ``change(arrow table)``."""
    f = sorted((folder / table).glob("part-*.parquet"))[0]
    pq.write_table(change(pq.read_table(f)), f)


# ------------------------------------------------------------------------------ settings differ
def test_settings_that_differ_are_named_escaped_in_text_html_and_summary(tmp_path):
    seq, steps = synthetic_rows()
    a = write(tmp_path / "a", seq, steps)
    meta_b = {**META, "dtype": "bfloat16", "system": "evil\u202e<b>\x1b[31m",
              "settings": {"max_new_tokens": 7, "top_k": 5}}
    b = write(tmp_path / "b", seq, steps, meta=meta_b)
    cmp = compare_datasets(a, b)
    assert cmp.summary["differs"] == {"dtype": ("float32", "bfloat16"), "system": (None, "evil\u202e<b>\x1b[31m"),
                                      "settings.max_new_tokens": (6, 7), "settings.top_k": (None, 5)}
    line = cmp.text().splitlines()[1]
    assert line == ('settings differ: dtype "float32" vs "bfloat16"; system null vs "evil\\u202e<b>\\u001b[31m"; '
                    'max_new_tokens 6 vs 7; top_k (absent) vs 5')
    assert "\u202e" not in cmp.text() and "\x1b" not in cmp.text()
    page = cmp.to_html()
    assert ("settings differ: dtype &quot;float32&quot; vs &quot;bfloat16&quot;; system null vs "
            "&quot;evil\\u202e&lt;b&gt;\\u001b[31m&quot;; max_new_tokens 6 vs 7; top_k (absent) vs 5") in page
    assert "<b>" not in page and "\u202e" not in page
    # the answers are the same: nothing else is reported as a difference
    assert cmp.summary["identical"] == 4 and cmp.summary["diverging"] == 0


def test_same_settings_print_no_differ_line(tmp_path):
    seq, steps = synthetic_rows()
    cmp = compare_datasets(write(tmp_path / "a", seq, steps), write(tmp_path / "b", seq, steps))
    assert cmp.summary["differs"] == {} and cmp.summary["prompts_fed_differ"] == 0
    assert not any(line.startswith("settings differ") for line in cmp.text().splitlines())
    assert "settings differ" not in cmp.to_html()


# ------------------------------------------------------------------------------ one side stopped first
def test_an_answer_cut_by_its_length_limit_is_no_divergence(tmp_path):
    seq, steps = synthetic_rows()
    b = write(tmp_path / "b", seq, steps, meta={**META, "settings": {"max_new_tokens": 7}})
    s1, st1 = cut(seq, steps, "a", 3, "max_length")  # A's limit: its 3 tokens are B's first 3
    s1, st1 = cut(s1, st1, "c", 2, "stop_string:END")  # A stopped on a stop string B did not have
    a = write(tmp_path / "a", s1, st1)
    cmp = compare_datasets(a, b)
    rows = cmp.prompts.set_index("prompt_id")
    assert rows.loc["a", "tokens_a"] == 3 and rows.loc["a", "tokens_b"] == 6
    assert rows.first_divergence.isna().all()  # nothing diverges
    assert list(rows.identical) == [False, True, False, True]
    assert rows.loc["a", "cut_by"] == "A" and bool(rows.loc["a", "length_limited"])
    assert rows.loc["c", "cut_by"] == "A" and not rows.loc["c", "length_limited"]
    assert rows.loc["c", "cut_reason"] == "stop_string:END"
    s = cmp.summary
    assert (s["identical"], s["length_limited"], s["stopped_first"], s["diverging"]) == (2, 1, 1, 0)
    assert s["differs"] == {"settings.max_new_tokens": (6, 7)}
    assert cmp.text().splitlines()[2] == ("prompts: 4, identical answers: 2 (50.0%), identical up to A's length "
                                          "limit: 1, identical until A stopped first (stop_string): 1, "
                                          "diverging: 0 (near-ties: 0)")
    assert len(cmp.most_different(10)) == 0 and len(cmp.histogram) == 0
    assert "identical up to A&#x27;s length limit: 1" in cmp.to_html()
    # the shared tokens are compared: same values on both sides
    assert s["max_abs_dlogprob"] == 0.0
    # B cut instead (the sides swapped)
    swapped = compare_datasets(b, a)
    assert swapped.prompts.set_index("prompt_id").loc["a", "cut_by"] == "B"
    assert "identical up to B's length limit: 1" in swapped.text()


def test_a_real_divergence_after_a_cut_side_still_diverges(tmp_path):
    """A shorter answer that differs before it ends diverges where it differs."""
    seq, steps = synthetic_rows()
    b = write(tmp_path / "b", seq, steps)
    s1, st1 = cut(seq, steps, "a", 3, "max_length")
    row = next(r for r in s1 if r["prompt_id"] == "a")
    other = (row["token_ids"][1] + 1) % 40
    row["token_ids"][1] = other
    [r for r in st1 if r["prompt_id"] == "a"][1]["token_id"] = other
    cmp = compare_datasets(write(tmp_path / "a", s1, st1), b)
    rows = cmp.prompts.set_index("prompt_id")
    assert rows.loc["a", "first_divergence"] == 1 and rows.loc["a", "cut_by"] is None
    assert cmp.summary["diverging"] == 1 and cmp.summary["length_limited"] == 0


# ------------------------------------------------------------------------------ prompts as fed
def test_prompts_fed_differently_are_counted_in_the_header(tmp_path):
    seq, steps = synthetic_rows()
    a = write(tmp_path / "a", seq, steps)
    fed = copy.deepcopy(seq)
    for r in fed[:3]:
        r["prompt_text"] = f"<|im_start|>user\n{r['prompt']}<|im_end|>\n"
        r["prompt_tokens"] += 4
    b = write(tmp_path / "b", fed, steps, meta={**META, "chat": True})
    cmp = compare_datasets(a, b)
    assert cmp.summary["prompts_fed_differ"] == 3
    assert list(cmp.prompts.fed_differs) == [True, True, True, False]
    assert cmp.text().splitlines()[1] == ("settings differ: chat null vs true; prompts fed differ for 3 prompt(s) "
                                          "(chat template / system)")


def test_vllm_and_transformers_datasets_compare(tmp_path):
    """Two known schemas compare; the prompt text vLLM decodes back may be spelled otherwise
    (special tokens), so across engines the fed prompts are told apart by their token count."""
    seq, steps = synthetic_rows()
    a = write(tmp_path / "a", seq, steps)
    v = copy.deepcopy(seq)
    for r in v:
        r["engine"] = "vllm"
        r["prompt_text"] = "<s>" + r["prompt_text"]  # same tokens, decoded back with a special token
    v[0]["prompt_tokens"] += 1  # one prompt really fed otherwise
    meta_v = {**META, "engine": "vllm", "schema": "vllm-1", "settings": {"max_tokens": 6}}
    cmp = compare_datasets(a, write(tmp_path / "v", v, steps, meta=meta_v))
    assert cmp.summary["identical"] == 4
    assert cmp.summary["prompts_fed_differ"] == 1
    assert cmp.text().splitlines()[1] == ('settings differ: engine "transformers" vs "vllm"; schema "hf-1" vs '
                                          '"vllm-1"; max_new_tokens 6 vs (absent); max_tokens (absent) vs 6; '
                                          'prompts fed differ for 1 prompt(s) (chat template / system)')


# ------------------------------------------------------------------------------ schema checks
def _unknown_schema(path):
    import json

    meta = json.loads((path / "corpus.json").read_text())
    meta["schema"] = "other-9"
    (path / "corpus.json").write_text(json.dumps(meta))


def _token_ids_as_strings(path):
    def change(t):
        col = pa.array([str(list(x)) for x in t["token_ids"].to_pylist()], pa.string())
        return t.set_column(t.schema.get_field_index("token_ids"), "token_ids", col)
    rewrite_part(path, "sequences", change)


def _no_topk_logprobs(path):
    rewrite_part(path, "steps", lambda t: t.drop_columns(["topk_logprobs"]))


def _logprob_as_strings(path):
    def change(t):
        col = pa.array([str(x) for x in t["logprob"].to_pylist()], pa.string())
        return t.set_column(t.schema.get_field_index("logprob"), "logprob", col)
    rewrite_part(path, "steps", change)


@pytest.mark.parametrize("damage, message", [
    (_unknown_schema, 'dataset {b} has schema "other-9" in its corpus.json, which this tracer cannot read '
                      '(it reads hf-1, vllm-1)'),
    (_token_ids_as_strings, "dataset {b}: sequences/{part}: column 'token_ids' holds string, not "
                            "list<item: int64> as schema hf-1 has it"),
    (_no_topk_logprobs, "dataset {b}: steps/{part} has no column 'topk_logprobs' (schema hf-1 has it)"),
    (_logprob_as_strings, "dataset {b}: steps/{part}: column 'logprob' holds string, not float as schema hf-1 "
                          "has it"),
])
def test_a_dataset_not_as_tracer_writes_it_is_refused_in_one_line(tmp_path, capsys, damage, message):
    seq, steps = synthetic_rows()
    a = write(tmp_path / "a", seq, steps)
    b = write(tmp_path / "b", seq, steps)
    damage(b)
    part = sorted((b / "sequences").glob("part-*.parquet"))[0].name
    expected = message.format(b=b, part=part)
    with pytest.raises(CorpusError) as err:
        compare_datasets(a, b)
    assert str(err.value) == expected
    capsys.readouterr()
    assert main(["compare", str(a), str(b)]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == f"tracer: error: {expected}\n"


def test_a_prompt_id_twice_is_refused(tmp_path):
    """Two runs writing into one folder at once leave every prompt twice."""
    seq, steps = synthetic_rows()
    a = write(tmp_path / "a", seq, steps)
    b = write(tmp_path / "b", seq, steps)
    writer = CorpusWriter(b, dict(META))
    writer.write(seq[:2], [r for r in steps if r["prompt_id"] in ("a", "b")])
    if hasattr(writer, "close"):
        writer.close()
    with pytest.raises(CorpusError, match=rf"^dataset {b} holds prompt id 'a' 2 times \(2 id\(s\) repeated"):
        compare_datasets(a, b)


def test_steps_rows_that_do_not_match_the_answer_are_refused(tmp_path):
    seq, steps = synthetic_rows()
    a = write(tmp_path / "a", seq, steps)
    b = write(tmp_path / "b", seq, steps)
    first = sorted((b / "steps").glob("part-*.parquet"))[0]
    first.unlink()  # the sequences of prompts a, b kept, their steps rows gone
    n = len(seq[0]["token_ids"])
    with pytest.raises(CorpusError) as err:
        compare_datasets(a, b)
    assert str(err.value) == (f"dataset {b}: the steps rows of prompt id 'a' do not match its answer "
                              f"({n} token(s), 0 steps row(s))")


# ------------------------------------------------------------------------------ names, empty datasets
def test_dataset_names_are_escaped(tmp_path, capsys):
    seq, steps = synthetic_rows()
    a = write(tmp_path / "a", seq, steps)
    evil = tmp_path / "evil\x1b[31mRED\nfake line\u202e"
    shutil.copytree(a, evil)
    cmp = compare_datasets(evil, a)
    first = cmp.text().splitlines()[0]
    assert first == f"corpus compare: A = {terminal_safe(str(evil))}, B = {a}"
    assert "\\x1b[31mRED\\x0afake line\\u202e" in first
    assert main(["compare", str(evil), str(a)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out and out.splitlines()[0] == first
    page = cmp.to_html()
    assert "\x1b" not in page and "\u202e" not in page and "evil\\x1b[31mRED" in page


def test_an_empty_dataset_is_refused(tmp_path, capsys):
    seq, steps = synthetic_rows()
    full = write(tmp_path / "full", seq, steps)
    empty = tmp_path / "empty"
    writer = CorpusWriter(empty, dict(META))  # what a run interrupted before its first batch leaves
    if hasattr(writer, "close"):
        writer.close()
    empty2 = tmp_path / "empty2"
    shutil.copytree(empty, empty2)
    for x, y, named in ((empty, empty2, empty), (full, empty, empty), (empty, full, empty)):
        with pytest.raises(CorpusError) as err:
            compare_datasets(x, y)
        assert str(err.value) == f"dataset {named} holds no prompts yet (no batch finished): nothing to compare"
    capsys.readouterr()
    assert main(["compare", str(empty), str(empty2)]) == 2
    assert capsys.readouterr().err == (f"tracer: error: dataset {empty} holds no prompts yet (no batch finished): "
                                       "nothing to compare\n")
