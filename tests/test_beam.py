"""Beam search (``num_beams > 1``): traced output identical to untraced, and the records checked
against transformers' own ``output_scores`` / ``sequences_scores`` / ``beam_indices``."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import tracer
from tracer.beam_records import EMPTY_SCORE, BeamTrace
from tracer.viz.beam import beam_report_html, beam_tree, beam_tree_svg, beam_tree_text

from conftest import make_inputs, make_tiny_llama

P = 5
CASES = {
    "plain": dict(num_beams=3, num_return_sequences=2),
    "eos_early": dict(num_beams=4, num_return_sequences=3, eos="early"),
    "length_penalty_early_stopping": dict(num_beams=3, length_penalty=2.0, early_stopping=True, eos="early"),
    "never": dict(num_beams=3, early_stopping="never", length_penalty=-0.5, eos="early"),
    "sampling": dict(num_beams=3, do_sample=True, num_return_sequences=3, top_k=20, temperature=1.3),
}


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama()


def _run(model, case):
    inputs = make_inputs(batch=2, seq=P, left_pad=1, seed=3)
    kw = {"max_new_tokens": 7, "pad_token_id": 0, "output_scores": True, "return_dict_in_generate": True,
          **CASES[case]}
    if kw.pop("eos", None) == "early":  # a token the best beam picks early, so hypotheses finish mid-run
        torch.manual_seed(0)
        first = model.generate(**inputs, **{**kw, "eos_token_id": None})
        kw["eos_token_id"] = int(first.sequences[0, P + 1])
    else:
        kw["eos_token_id"] = None
    torch.manual_seed(1)
    ref = model.generate(**inputs, **kw)
    torch.manual_seed(1)
    with tracer.trace(model) as t:
        out = model.generate(**inputs, **kw)
    return ref, out, t.beam, kw


@pytest.mark.parametrize("case", sorted(CASES))
def test_beam_records_match_transformers(model, case):
    ref, out, bt, kw = _run(model, case)
    assert torch.equal(out.sequences, ref.sequences), "traced output differs"
    assert torch.equal(out.sequences_scores, ref.sequences_scores)
    assert bt.status == "complete" and bt.num_steps == len(out.scores)
    nb, nrs = kw["num_beams"], kw.get("num_return_sequences", 1)
    assert bt.num_beams == nb and bt.num_return_sequences == nrs
    for b in range(2):
        ranking = bt.ranking(b)
        assert len(ranking) == nb
        returned = [h for h in ranking if h.returned]
        assert len(returned) == nrs
        for r, h in enumerate(returned):
            row = b * nrs + r
            assert h.score == pytest.approx(float(out.sequences_scores[row]), abs=1e-6)
            n = len(h.tokens)
            assert out.sequences[row, P:P + n].tolist() == list(h.tokens)
            assert out.beam_indices[row, :n].tolist() == [b * nb + p for p in h.beams]
            assert int((out.beam_indices[row] >= 0).sum()) == n
        # the ranking is sorted and the scores are length-penalised cumulative log-probs
        scores = [h.score for h in ranking]
        assert scores == sorted(scores, reverse=True)
        for h in ranking:
            s, k = h.step, h.candidate
            raw = float(bt.steps[s].cand_scores[b, k])
            assert h.score == pytest.approx(raw / (len(h.tokens) ** bt.length_penalty), rel=1e-5)
            assert bt.steps[s].cand_stop[b, k] or s == bt.num_steps - 1
    # every kept candidate: its score = the parent's running score + output_scores[step][parent, token]
    for s, step in enumerate(bt.steps):
        scores = out.scores[s].view(2, nb, -1).numpy()
        for b in range(2):
            for k in range(step.cand_ids.shape[1]):
                p, tok = step.cand_parent[b, k], step.cand_ids[b, k]
                want = scores[b, p, tok] + step.running_before[b, p]
                if want > EMPTY_SCORE:
                    assert step.cand_scores[b, k] == pytest.approx(want, abs=1e-4)
            # each beam's best candidate is the arg-max of its processed log-probs
            best = scores[b].max(-1) + step.running_before[b]
            np.testing.assert_allclose(step.beam_top_scores[b, :, 0], best, rtol=1e-5)
        if s + 1 < bt.num_steps:  # the survivors' scores are what runs into the next step
            np.testing.assert_allclose(bt.steps[s + 1].running_before, step.survivor_scores)


def test_finished_hypotheses_recorded_mid_run(model):
    _, out, bt, _ = _run(model, "eos_early")
    finished_early = [h for b in range(2) for h in bt.ranking(b) if h.step < bt.num_steps - 1]
    assert finished_early, "the eos case must finish a hypothesis before max_length"
    tree = beam_tree(bt, 0)
    states = {n["state"] for n in tree["nodes"]}
    assert {"survivor", "finished", "pruned"} <= states


def test_beam_tree_views_and_round_trip(model, tmp_path):
    _, out, bt, _ = _run(model, "plain")
    bt.token_text[int(bt.steps[0].cand_ids[0, 0])] = "<b>&\"中文🙂"
    svg = beam_tree_svg(bt, 0)
    assert svg.startswith("<svg") and "&lt;b&gt;&amp;" in svg and "<b>" not in svg and "中文🙂" in svg
    tree = beam_tree(bt, 0)
    assert svg.count("<rect") == len(tree["nodes"])
    best = bt.ranking(0)[0]
    assert [bt.steps[s].cand_ids[0, k] for s, k in tree["best"]] == list(best.tokens)
    text = beam_tree_text(bt, 0)
    assert "ranking:" in text and f"#0 {best.score:.4f}" in text
    page = beam_report_html(bt, tmp_path / "beam.html")
    assert (tmp_path / "beam.html").read_text(encoding="utf-8") == page and page.count("<svg") == 2
    loaded = BeamTrace.load(bt.save(tmp_path / "beam.json"))
    assert loaded.ranking(1) == bt.ranking(1) and loaded.token_text == bt.token_text
    for a, b in zip(loaded.steps, bt.steps):
        for name in ("cand_ids", "cand_parent", "cand_scores", "cand_stop", "survivors", "finished_from"):
            assert np.array_equal(getattr(a, name), getattr(b, name))


def test_greedy_still_recorded_by_the_step_recorder(model):
    inputs = make_inputs(batch=1, seq=P)
    with tracer.trace(model) as t:
        model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0, num_beams=1)
    assert t.trace.num_steps == 3 and t.beam_traces == []



def test_beam_search_set_in_a_generation_config_is_recorded_with_its_settings(model):
    """num_beams and the other settings from a GenerationConfig passed by position (or the
    model's own): recorded as beam search with the values generate used, not refused or
    recorded with the defaults."""
    from transformers import GenerationConfig

    inputs = make_inputs(batch=1, seq=P, seed=3)
    gc = GenerationConfig(num_beams=3, num_return_sequences=2, length_penalty=2.0, max_new_tokens=4,
                          pad_token_id=0, eos_token_id=None)
    ref = model.generate(inputs["input_ids"], gc, attention_mask=inputs["attention_mask"])
    with tracer.trace(model) as t:
        out = model.generate(inputs["input_ids"], gc, attention_mask=inputs["attention_mask"])
    assert torch.equal(out, ref)
    bt = t.beam
    assert (bt.num_beams, bt.num_return_sequences, bt.length_penalty) == (3, 2, 2.0)
    assert bt.num_steps == 4 and bt.sequences.tolist() == out.tolist()
    kept = model.generation_config.num_beams
    model.generation_config.num_beams = 2
    try:
        with tracer.trace(model) as t:
            model.generate(**inputs, max_new_tokens=2, pad_token_id=0, eos_token_id=None)
    finally:
        model.generation_config.num_beams = kept
    assert t.beam.num_beams == 2 and t.traces == []

@pytest.mark.slow
def test_embedded_beam_search(embedded):
    """The real model: beam search with 2 prompts, eos, length penalty; traced == untraced and the
    ranking matches sequences_scores / beam_indices."""
    model, tok = embedded
    texts, encoded, kw = tracer.prepare_generate(model, tok, ["What is the capital of France?", "Name a colour."],
                                                 max_new_tokens=12)
    kw.update(num_beams=4, num_return_sequences=2, length_penalty=1.2, do_sample=False, output_scores=True,
              return_dict_in_generate=True)
    ref = model.generate(**encoded, **kw)
    with tracer.trace(model, tok) as t:
        out = model.generate(**encoded, **kw)
    assert torch.equal(out.sequences, ref.sequences) and torch.equal(out.sequences_scores, ref.sequences_scores)
    bt, p = t.beam, encoded["input_ids"].shape[1]
    for b in range(2):
        returned = [h for h in bt.ranking(b) if h.returned]
        for r, h in enumerate(returned):
            row = b * 2 + r
            assert h.score == pytest.approx(float(out.sequences_scores[row]), abs=1e-5)
            assert out.sequences[row, p:p + len(h.tokens)].tolist() == list(h.tokens)
            assert out.beam_indices[row, :len(h.tokens)].tolist() == [b * 4 + x for x in h.beams]
    assert "Paris" in "".join(bt.text(x) for x in bt.ranking(0)[0].tokens)
    assert "<svg" in beam_tree_svg(bt, 0)


@pytest.mark.slow
def test_embedded_beam_search_chinese_text_whole(embedded, tmp_path):
    """A Chinese prompt: characters split over byte-level tokens come out whole in the
    hypotheses' text (as the tokenizer decodes them), a token holding part of a character
    shows its bytes escaped, and no view shows "\ufffd"."""
    model, tok = embedded
    texts, encoded, kw = tracer.prepare_generate(model, tok, ["用一句话介绍北京。"], max_new_tokens=10)
    kw.update(num_beams=3, num_return_sequences=2, do_sample=False)
    with tracer.trace(model, tok) as t:
        model.generate(**encoded, **kw)
    bt = t.beam
    tokens = [t for h in bt.ranking(0) for t in h.tokens]
    partial = [x for x in tokens if "\ufffd" in tok.decode([x])]
    assert partial, "expected the answer to hold tokens with part of a character"
    for h in bt.ranking(0):  # an answer cut mid-character ends with that character's bytes, escaped
        shown, decoded = bt.text_of(h.tokens), tok.decode(list(h.tokens))
        assert "\ufffd" not in shown
        assert re.sub(r"(\\x[0-9a-f]{2})+$", "", shown) == decoded.rstrip("\ufffd")
    assert all("\\x" in bt.text(x) and "\ufffd" not in bt.text(x) for x in partial)
    page = beam_report_html(bt, tmp_path / "beam.html")
    assert "\ufffd" not in page and "\ufffd" not in beam_tree_text(bt, 0)
    loaded = BeamTrace.load(bt.save(tmp_path / "beam.json"))
    assert loaded.token_bytes == bt.token_bytes and loaded.text_of(tokens) == bt.text_of(tokens)


def test_per_step_extras_refused_in_beam_and_assisted_modes(model):
    inputs = make_inputs(batch=1, seq=P)
    for record in (tracer.RecordConfig(attention=True), tracer.RecordConfig(hidden_layers=[0])):
        with tracer.trace(model, record=record) as t:
            with pytest.raises(tracer.NotSupportedError, match="cannot be recorded in this mode"):
                model.generate(**inputs, num_beams=2, max_new_tokens=2, pad_token_id=0)
            with pytest.raises(tracer.NotSupportedError, match="cannot be recorded in this mode"):
                model.generate(**inputs, prompt_lookup_num_tokens=2, max_new_tokens=2, pad_token_id=0)
        assert t.beam_traces == [] and t.assisted_traces == [] and t.traces == []


def test_interrupted_beam_search_keeps_the_steps(model):
    """Ctrl-C in the middle: the error propagates, the steps recorded so far stay, hooks are gone."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Interrupt(StoppingCriteria):
        def __init__(self):
            self.calls = 0

        def __call__(self, input_ids, scores, **kwargs):
            self.calls += 1
            if self.calls == 4:
                raise KeyboardInterrupt
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    inputs = make_inputs(batch=1, seq=P)
    with tracer.trace(model) as t:
        with pytest.raises(KeyboardInterrupt):
            model.generate(**inputs, num_beams=2, max_new_tokens=8, pad_token_id=0,
                           stopping_criteria=StoppingCriteriaList([Interrupt()]))
    bt = t.beam
    assert bt.num_steps == 3 and bt.status.startswith("error: KeyboardInterrupt")
    assert not any(name in model.__dict__ for name in ("_get_top_k_continuations", "_update_finished_beams"))
