"""compare / replay / branch / reprocess / trace.table (tracer.analysis).

Unit tests run on synthetic traces and the tiny random Llama; the done-when checks run on the
embedded model (slow)."""

from __future__ import annotations

import dataclasses

import numpy as np
from pathlib import Path

import pytest
import torch

import tracer
from tracer import RecordConfig
from tracer.analysis import CompareError, compare, trace_table
from tracer.records import MemoryStore, replace
from tracer.testing import make_trace
from tracer.text import display_width

from conftest import make_inputs

pd = pytest.importorskip("pandas")

PROMPTS = ["What is the capital of France?", "Name a colour."]
SAMPLING = dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.1)


def _with_token(trace, seq: int, step: int, token: int):
    """A copy of ``trace`` whose sequence ``seq`` chose ``token`` at ``step``."""
    steps = list(trace.steps)
    chosen = steps[step].chosen.copy()
    chosen[seq] = token
    steps[step] = replace(steps[step], chosen=chosen)
    return dataclasses.replace(trace, steps=steps)


def _strip_blobs(trace):
    return dataclasses.replace(trace, blobs=MemoryStore())


# ----------------------------------------------------------------------------------------
# compare on synthetic traces (numpy only)
# ----------------------------------------------------------------------------------------


def test_compare_with_itself_has_no_divergence():
    t = make_trace(batch=2, steps=6, attention=False)
    d = compare(t, t)
    assert d.first_divergence == [None, None]
    df = d.table()
    assert len(df) == sum(t.num_new_tokens)
    assert df["same"].all() and (df["abs_dlogprob"] == 0).all() and (df["kl"] == 0).all()
    assert (df["topk_overlap"] == 1).all()
    s = d.summary()["sequences"]
    assert [x["identical_fraction"] for x in s] == [1.0, 1.0]
    assert [x["max_abs_dlogprob"] for x in s] == [0.0, 0.0]


def test_first_divergence_and_recorded_values():
    a = make_trace(batch=2, steps=6, attention=False)
    b = _with_token(a, seq=0, step=3, token=int(a.steps[3].stages[0].top.ids[0, 1]))
    d = compare(a, b)
    assert d.first_divergence == [3, None]
    df = d.table()
    row = df[(df.seq == 0) & (df.step == 3)].iloc[0]
    assert not row.same and row.comparable
    # the other side's token is a's second candidate: its log-prob and rank come from a's top-k
    top = a.steps[3].stages[0].top
    assert row.logprob_a_of_b == pytest.approx(float(top.values[0, 1]) - float(top.logsumexp[0]), abs=1e-6)
    assert row.rank_a_of_b == 1
    for _, r in df.iterrows():  # every log-prob in the table is the trace's own recorded value
        assert r.logprob_a == pytest.approx(float(a.steps[r.step].stages[0].chosen_logprob[r.seq]))
        assert r.logprob_b == pytest.approx(float(b.steps[r.step].stages[0].chosen_logprob[r.seq]))
    assert not df[(df.seq == 0) & (df.step > 3)]["comparable"].any()
    assert d.summary()["sequences"][0]["divergence"]["close"]


def test_compare_refuses_different_prompts():
    a = make_trace(batch=2, attention=False)
    b = make_trace(batch=2, attention=False, seed=1)
    with pytest.raises(CompareError, match="different prompts"):
        compare(a, b)
    with pytest.raises(CompareError, match="1 sequences"):
        compare(a, make_trace(batch=1, attention=False))
    with pytest.raises(CompareError, match="stage 9"):
        compare(a, a, stage=9)


def test_compare_text_and_html_escape_tokens():
    t = make_trace(batch=1, steps=5, attention=False, text="<script>x</script>")
    d = compare(t, _with_token(t, 0, 2, 7))
    html = d._repr_html_()
    assert "<script>" not in html
    assert "first divergence at step 2" in d.text()


# ----------------------------------------------------------------------------------------
# tiny model: KL exact vs bound, reprocess, replay, branch
# ----------------------------------------------------------------------------------------


def _tiny_trace(model, record=None, **kw):
    inputs = make_inputs(batch=2, seq=6, left_pad=2)
    kw.setdefault("max_new_tokens", 8)
    with tracer.trace(model, record=record or RecordConfig(full_logits=True, top_k=5)) as t:
        model.generate(**inputs, pad_token_id=0, **kw)
    return t.trace


def test_kl_bound_is_below_exact_kl(tiny_model):
    a = _tiny_trace(tiny_model)
    torch.manual_seed(0)
    b = _tiny_trace(tiny_model, do_sample=True, temperature=1.5)  # same prompts, different run
    exact = compare(a, b).table()
    bound = compare(_strip_blobs(a), _strip_blobs(b)).table()
    ok = exact["comparable"] & exact["kl"].notna()
    assert exact.loc[ok, "kl_exact"].all() and not bound.loc[ok, "kl_exact"].any()
    assert (bound.loc[ok, "kl"] >= 0).all()
    assert (bound.loc[ok, "kl"] <= exact.loc[ok, "kl"] + 1e-9).all()
    # with full rows, every log-prob of the other side's token is known
    assert exact.loc[ok, "logprob_a_of_b"].notna().all()


def test_reprocess_own_settings_reproduces_recorded_stages(tiny_model):
    torch.manual_seed(0)
    t = _tiny_trace(tiny_model, **SAMPLING)
    for step in (0, 3, t.num_steps - 1):
        r = tracer.reprocess(t, step)
        assert r.full_row and r.note == ""
        rec = t.steps[step].stages
        assert [s.name for s in r.stages] == [s.name for s in rec]
        for got, want in zip(r.stages, rec):
            for f in ("n_masked", "chosen_rank", "chosen_logprob", "kl", "entropy"):
                np.testing.assert_array_equal(getattr(got, f), getattr(want, f), err_msg=f"{want.name}.{f}")
            np.testing.assert_array_equal(got.top.ids, want.top.ids)
            np.testing.assert_array_equal(got.top.values, want.top.values)
            np.testing.assert_array_equal(got.top.logsumexp, want.top.logsumexp)
            assert dict(got.params) == dict(want.params)


def test_reprocess_other_settings_match_hf_processors_by_hand(tiny_model):
    from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    t = _tiny_trace(tiny_model, **SAMPLING)
    step = 4
    r = tracer.reprocess(t, step, top_p=0.5, temperature=1.2)
    assert [s.name for s in r.stages] == ["logits", "RepetitionPenaltyLogitsProcessor", "TemperatureLogitsWarper",
                                          "TopKLogitsWarper", "TopPLogitsWarper"]
    ids = torch.from_numpy(t.sequences[:, : t.prompt_len + step])
    scores = torch.from_numpy(np.array(t.full_logits(step)))
    pad = torch.from_numpy(t.prompt_mask).ne(0).int().argmax(1)
    try:  # as generate builds it: transformers 5.20+ skips each row's left padding, 5.19 cannot
        penalty = RepetitionPenaltyLogitsProcessor(1.1, prompt_ignore_length=pad)
    except ValueError:
        penalty = RepetitionPenaltyLogitsProcessor(1.1)
    by_hand = [scores]
    for proc in (penalty, TemperatureLogitsWarper(1.2),
                 TopKLogitsWarper(50), TopPLogitsWarper(0.5)):
        by_hand.append(proc(ids, by_hand[-1]))
    for stage, want in zip(r.stages, by_hand):
        np.testing.assert_array_equal(stage.n_masked, torch.isneginf(want).sum(-1).numpy())
    assert r.stages[-1].n_masked.min() > r.stages[-2].n_masked.max()  # top_p=0.5 masks more than top_k
    df = r.table()
    assert list(df[df.seq == 0]["n_masked"]) == [int(s.n_masked[0]) for s in r.stages]


def test_reprocess_from_top_k_says_so(tiny_model):
    t = _strip_blobs(_tiny_trace(tiny_model))
    r = tracer.reprocess(t, 2, do_sample=True, top_k=3)
    assert not r.full_row and "full logits were not recorded" in r.note
    assert r.stages[-1].name == "TopKLogitsWarper"
    assert (r.stages[-1].n_masked == tiny_model.config.vocab_size - 3).all()
    with pytest.raises(TypeError, match="unknown generation setting"):
        tracer.reprocess(t, 2, top_q=0.5)
    with pytest.raises(IndexError):
        tracer.reprocess(t, 99)


def test_incremental_replay_tiny_reproduces_every_stage(tiny_model):
    torch.manual_seed(0)
    t = _tiny_trace(tiny_model, **SAMPLING)
    r = tracer.replay(tiny_model, None, t)
    assert [s.name for s in r.steps[0].stages] == [s.name for s in t.steps[0].stages] + ["ForceTokens"]
    assert np.array_equal(r.sequences, t.sequences)
    for sr, st in zip(r.steps, t.steps):
        for got, want in zip(sr.stages, st.stages):
            np.testing.assert_array_equal(got.top.values, want.top.values)
            np.testing.assert_array_equal(got.chosen_logprob, want.chosen_logprob)
    d = compare(t, r, stage="final")
    assert d.stage_b == len(t.steps[0].stages) - 1 and d.first_divergence == [None, None]
    assert (d.table()["abs_dlogprob"] == 0).all()


def test_trace_table(tiny_model):
    torch.manual_seed(0)
    t = _tiny_trace(tiny_model, **SAMPLING)
    df = t.table()
    assert df.equals(trace_table(t))
    assert len(df) == sum(t.num_new_tokens)
    row = df[(df.seq == 1)].iloc[2]
    assert row.token == t.steps[2].chosen[1] and row.kind == "decode"
    assert row.logprob == float(t.steps[2].stages[0].chosen_logprob[1])  # raw logits
    assert row.final_logprob == float(t.steps[2].stages[-1].chosen_logprob[1])  # after the warpers
    assert row.logprob != row.final_logprob
    assert row.n_masked == int(t.steps[2].stages[-1].n_masked[1]) > 0


# ----------------------------------------------------------------------------------------
# embedded model: the done-when checks
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def greedy(embedded):
    model, tok = embedded
    return tracer.trace_generate(model, tok, PROMPTS, max_new_tokens=24, record=RecordConfig(full_logits=True))


def test_trace_vs_itself_and_incremental_replay(embedded, greedy):
    model, tok = embedded
    assert compare(greedy, greedy).table()["abs_dlogprob"].max() == 0
    r = tracer.replay(model, tok, greedy, mode="incremental")
    d = compare(greedy, r)
    assert d.first_divergence == [None, None]
    df = d.table()
    assert df["same"].all() and (df["abs_dlogprob"] == 0).all()
    assert df["kl_exact"].all() and (df["kl"] == 0).all()
    for a, b in zip(greedy.steps, r.steps):  # the raw logits are bit-identical, not just close
        np.testing.assert_array_equal(a.stages[0].top.values, b.stages[0].top.values)
        np.testing.assert_array_equal(greedy.full_logits(a.index), r.full_logits(b.index))


def test_forward_replay_is_within_1e_4(embedded, greedy):
    model, tok = embedded
    f = tracer.replay(model, tok, greedy, mode="forward")
    assert f.num_steps == greedy.num_steps and np.array_equal(f.sequences, greedy.sequences)
    d = compare(greedy, f)
    assert d.first_divergence == [None, None]
    df = d.table()
    assert df["abs_dlogprob"].max() < 1e-4
    assert df["kl"].max() < 1e-6
    assert "forward" in f.meta.notes[0]


def test_branch(embedded, greedy):
    model, tok = embedded
    k, seq = 3, 0
    orig = greedy.generated_ids(seq)
    forced = int(greedy.steps[k].stages[0].top.ids[seq, 1])  # the runner-up token
    b = tracer.branch(model, tok, greedy, step=k, token=forced, max_new_tokens=12)
    for s in range(k):
        np.testing.assert_array_equal(b.steps[s].chosen, greedy.steps[s].chosen)
        np.testing.assert_array_equal(b.steps[s].stages[0].top.values, greedy.steps[s].stages[0].top.values)
    assert int(b.steps[k].chosen[seq]) == forced
    assert b.generated_ids(seq)[k] != orig[k]
    # the continuation equals a plain greedy generate from the same prefix
    prefix = np.concatenate([greedy.prompt_tokens(seq), orig[:k], [forced]])
    plain = model.generate(torch.from_numpy(prefix)[None], attention_mask=torch.ones(1, prefix.size, dtype=torch.long),
                           max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                           eos_token_id=greedy.meta.generation_config["eos_token_id"])
    want = plain[0, prefix.size:].numpy()
    got = b.generated_ids(seq)[k + 1:]
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="pass one token"):
        tracer.branch(model, tok, greedy, step=1, token=" the capital")
    # an id outside the vocabulary: one clear error before any forward, not torch's index error
    with pytest.raises(ValueError, match=r"token 1000000 is not a token id of this model \(ids 0\.\.49151\)"):
        tracer.branch(model, tok, greedy, step=1, token=10**6)
    with pytest.raises(ValueError, match="not a token id"):
        tracer.branch(model, tok, greedy, step=1, token=-1)


# ----------------------------------------------------------------------------------------
# the comparison view and `tracer compare`
# ----------------------------------------------------------------------------------------


def _diverging_pair():
    a = make_trace(batch=2, steps=6, attention=False, text="<b>&'x")
    b = _with_token(a, seq=0, step=2, token=7)
    return a, b


def test_view_static_html_marks_divergence_and_escapes():
    from tracer.viz.compare import aligned_tokens_html, compare_html, topk_pair_html

    a, b = _diverging_pair()
    d = compare(a, b)
    page = compare_html(d)
    assert "<b>&'x" not in page and "&lt;b&gt;&amp;&#x27;x" in page
    aligned = aligned_tokens_html(d, 0)
    assert aligned.count("tc-div") == 2  # one outlined cell per side, at step 2
    assert aligned.count("tc-after") == 2 * (len(d.ids_a[0]) - 3)
    assert "first divergence at step 2" in aligned and "no divergence" in aligned_tokens_html(d, 1)
    table = topk_pair_html(d, 0, 2, k=5)
    top = a.steps[2].stages[0].top
    assert f"{float(top.probs[0, 0]):.4f}" in table  # a's best candidate with its recorded probability
    assert "<svg" in page and page.count("<polyline") == 4  # |Δlp| and KL, per sequence


def test_view_widget_slider_switches_topk():
    pytest.importorskip("ipywidgets")
    import tracer.viz

    a, b = _diverging_pair()
    d = compare(a, b)
    box = tracer.viz.compare(d, seq=0)
    assert box.slider.value == 2 and "step 2" in box.tables.value
    box.slider.value = 4
    assert "step 4" in box.tables.value
    fig = next(c for c in box.children if hasattr(c, "data"))
    np.testing.assert_array_equal(np.asarray(fig.data[0].y, dtype=float), d.arrays(0)["abs_dlogprob"].astype(float))


def _cli_args(tmp_path, a, b, **kw):
    import argparse

    from tracer.analysis.cli import add_compare_parser

    parser = argparse.ArgumentParser(prog="tracer")
    add_compare_parser(parser.add_subparsers(dest="command"))
    pa, pb = tmp_path / "a.trace", tmp_path / "b.trace"
    if a is not None:
        a.save(pa)
    if b is not None:
        b.save(pb)
    extra = [x for k, v in kw.items() for x in (f"--{k}", str(v))]
    return parser.parse_args(["compare", str(pa), str(pb), *extra])


def test_cli_compare_prints_and_writes_html(tmp_path, capsys):
    from tracer.analysis.cli import cmd_compare

    a, b = _diverging_pair()
    args = _cli_args(tmp_path, a, b, html=tmp_path / "out" / "c.html")
    assert cmd_compare(args) == 0
    out = capsys.readouterr().out
    assert "sequence 0: first divergence at step 2" in out and "sequence 1: no divergence" in out
    assert ">>   2  no" in out  # the divergence row is marked
    page = (tmp_path / "out" / "c.html").read_text(encoding="utf-8")
    assert "first divergence at step 2" in page and "<b>&'x" not in page


def test_cli_compare_names_the_sides_apart():
    from tracer.analysis.cli import side_names

    assert side_names("runs/hf/prompt_001.trace", "runs/vllm/prompt_001.trace") == (
        "hf/prompt_001.trace", "vllm/prompt_001.trace")
    assert side_names("a.trace", "x/b.trace") == ("a.trace", "b.trace")


def test_cli_compare_errors(tmp_path):
    from tracer.analysis.cli import cmd_compare

    a, _ = _diverging_pair()
    args = _cli_args(tmp_path, a, None)
    with pytest.raises(FileNotFoundError, match="no such trace"):
        cmd_compare(args)
    other = make_trace(batch=2, steps=6, attention=False, seed=3)
    with pytest.raises(CompareError, match="different prompts") as err:
        cmd_compare(_cli_args(tmp_path, a, other))
    assert "\n" not in str(err.value)
    with pytest.raises(CompareError, match="stage 'bogus'"):
        cmd_compare(_cli_args(tmp_path, a, a, stage="bogus"))


def test_cli_compare_run_folder_says_what_to_pass(tmp_path, capsys):
    """A ``tracer run --trace-dir`` folder is not a trace: one line naming what compare takes and
    the traces inside it (was: "not a trace folder: manifest.json is missing")."""
    from tracer.cli import main

    for run in ("a", "b"):
        for i in range(2):
            make_trace(batch=1, steps=4, seed=i, attention=False).save(tmp_path / run / f"prompt_{i:03d}.trace")
            (tmp_path / run / f"prompt_{i:03d}.html").write_text("<p>view</p>", encoding="utf-8")
    wanted = ("compare takes two traces (NAME.trace folders holding manifest.json, as tracer run --trace-dir "
              "writes them) or two corpus datasets (folders holding corpus.json, from tracer run --dataset)")

    def error(*argv):
        assert main(["compare", *map(str, argv)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.endswith("\n") and err.count("\n") == 1, err
        return err.removesuffix("\n")

    a, b = tmp_path / "a", tmp_path / "b"
    assert error(a, b) == (
        f"tracer: error: {a} is a folder of 2 trace(s) (prompt_000.trace, prompt_001.trace), not one trace: "
        f"{wanted}; pass one trace from it, e.g. tracer compare {a}/prompt_000.trace {b}/prompt_000.trace")
    # the other side a trace: the example pairs the same prompt, in the order given
    assert error(b / "prompt_001.trace", a).endswith(
        f"e.g. tracer compare {b}/prompt_001.trace {a}/prompt_001.trace")
    # the folder of a run's predictions file, holding its --trace-dir
    out = tmp_path / "out"
    (out / "t").mkdir(parents=True)
    (a / "prompt_000.trace").rename(out / "t" / "prompt_000.trace")
    (out / "predictions.json").write_text("[]", encoding="utf-8")
    assert error(out, b / "prompt_000.trace") == (
        f"tracer: error: {out} is a folder of 1 trace(s) (t/prompt_000.trace), not one trace: {wanted}; "
        f"pass one trace from it, e.g. tracer compare {out}/t/prompt_000.trace {b}/prompt_000.trace")
    (tmp_path / "empty").mkdir()
    assert error(b / "prompt_000.trace", tmp_path / "empty") == (
        f"tracer: error: {tmp_path / 'empty'} is a folder that is neither a trace (no manifest.json) "
        f"nor a corpus dataset (no corpus.json): {wanted}")
    # the traces inside compare as before
    assert main(["compare", str(b / "prompt_000.trace"), str(out / "t" / "prompt_000.trace")]) == 0
    assert "no divergence" in capsys.readouterr().out


def test_compare_reads_a_logprob_stage_like_vllm():
    """A vLLM trace holds one stage of log-probs (log-sum-exp 0): compare reads stage 0 whatever
    it holds, so the same distribution recorded either way compares equal."""
    a = make_trace(batch=2, steps=5, attention=False)
    steps = []
    for rec in a.steps:
        raw = rec.stages[0]
        lp = (raw.top.values - raw.top.logsumexp[:, None]).astype(np.float32)
        top = dataclasses.replace(raw.top, values=lp, logsumexp=np.zeros_like(raw.top.logsumexp))
        steps.append(replace(rec, stages=(replace(raw, name="logprobs", top=top),)))
    v = dataclasses.replace(a, steps=steps)
    d = compare(a, v)
    df = d.table()
    assert d.first_divergence == [None, None] and (df["abs_dlogprob"] == 0).all()
    assert (df["topk_overlap"] == 1).all() and df["kl"].max() < 1e-6
    assert compare(a, v, stage="final").stage_b == 0


def test_benchmark_functions_on_tiny_model(tiny_model):
    """Smoke test of benchmarks/analysis.py (structure, not timing)."""
    import importlib.util
    import sys

    REPO_ROOT = Path(__file__).resolve().parents[1]  # not `from conftest`: by now that name may be tests/vllm_backend's

    spec = importlib.util.spec_from_file_location("tracer_benchmark_analysis", REPO_ROOT / "benchmarks" / "analysis.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    rep = bench.bench_replay(tiny_model, None, make_inputs(batch=1, seq=5), tokens=4, repeats=1)
    assert set(rep["median_s"]) == {"plain", "traced", "replay_incremental", "replay_forward"}
    assert rep["x_traced"]["traced"] == 1.0
    comp = bench.bench_compare(steps=64, repeats=1)
    assert comp["steps"] == 64 and comp["median_s"] > 0
    text = bench.report(rep, comp, "tiny")
    assert "× original (traced)" in text and "1,024-token pair" in text


def test_compare_and_tables_show_split_characters_whole():
    """A character split over two tokens (北 = e5 8c | 97): the comparison rows, its HTML and
    trace.table() show the first token's bytes and the character on the second, never U+FFFD."""
    from tracer.testing import make_trace
    from tracer.viz.compare import compare_html

    t = make_trace(batch=1, steps=4)
    first, second = (int(i) for i in t.generated_ids(0)[:2])
    assert first != second
    t.token_text[first], t.token_text[second] = "\ufffd", "\ufffd"  # what decoding one token at a time gives
    t.token_bytes[first], t.token_bytes[second] = b"\xe5\x8c", b"\x97"
    rows = tracer.compare(t, t).table()
    assert list(rows["text_a"][:2]) == ["\\xe5\\x8c→北", "北"] and list(rows["text_b"][:2]) == ["\\xe5\\x8c→北", "北"]
    assert not any("\ufffd" in str(x) for x in rows["text_a"])
    assert "\ufffd" not in compare_html(tracer.compare(t, t))
    table = t.table()
    assert list(table["text"][:2]) == ["\\xe5\\x8c→北", "北"]
    assert not any("\ufffd" in str(x) for x in list(table["text"]) + list(table["top_text"]))


def test_compare_answers_cut_mid_character_read_alike_on_every_backend():
    """HF's decode ends an answer cut mid-character in U+FFFD, vLLM's leaves the bytes out: the
    same tokens must not read as different texts. Both show the bytes escaped, no U+FFFD."""
    t = make_trace(batch=1, steps=5, attention=False)
    ids = [int(i) for i in t.generated_ids(0) if int(i) not in t.meta.terminators]
    raw = {**t.token_bytes, ids[-1]: b"\xe5\x8c"}
    head = b"".join(raw[i] for i in ids[:-1]).decode()
    hf = dataclasses.replace(t, token_bytes=raw, output_text=[head + "\ufffd"])
    vllm = dataclasses.replace(t, token_bytes=raw, output_text=[head])
    s = compare(hf, vllm).summary()["sequences"][0]
    assert s["text_a"] == s["text_b"] == head + "\\xe5\\x8c"
    assert "\ufffd" not in compare(hf, vllm)._repr_html_()


def test_compare_text_columns_align_with_wide_characters():
    t = make_trace(batch=1, steps=5, attention=False, text="北京是中国的首都也是一座古城")  # wider than the column
    lines = [ln for ln in compare(t, _with_token(t, 0, 1, 7)).text(context=5).splitlines() if ln[2:6].strip().isdigit()]
    assert any("北京是" in ln for ln in lines) and any("北京" not in ln for ln in lines)
    def column_starts(ln):  # display columns where "token b" begins and the right-aligned |Δlp| ends
        end_a = ln.index(")")
        end_b = ln.index(")", end_a + 1)
        dlp = ln[end_b + 1:].split()[0]
        return display_width(ln[: ln.index("'", end_a)]), display_width(ln[: ln.index(dlp, end_b) + len(dlp)])

    assert len({column_starts(ln) for ln in lines}) == 1, lines


def test_compare_text_shows_no_kl_after_the_divergence():
    t = make_trace(batch=1, steps=5, attention=False)
    lines = compare(t, _with_token(t, 0, 1, 7)).text(context=5).splitlines()
    rows = {int(ln[2:6]): ln for ln in lines if ln[2:6].strip().isdigit()}
    assert rows[0].rstrip()[-1] != "—" and all(rows[s].rstrip().endswith("—") for s in rows if s > 1)


def test_compare_text_shows_no_dlogprob_where_the_tokens_differ():
    """|Δ log-prob| is of a shared token: a row whose two tokens differ shows "—", never "nan"."""
    t = make_trace(batch=1, steps=5, attention=False)
    text = compare(t, _with_token(t, 0, 1, 7)).text(context=5)
    rows = {int(ln[2:6]): ln for ln in text.splitlines() if ln[2:6].strip().isdigit()}
    assert "nan" not in text
    assert rows[1].split()[-2] == "—" and rows[0].split()[-2] == "0"
