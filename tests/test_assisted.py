"""Assisted / speculative decoding: traced output identical to untraced; drafted and accepted
counts checked against the verifier's own logits (a separate full forward)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tracer
from tracer.assisted_records import AssistedTrace
from tracer.errors import NotSupportedError
from tracer.viz.assisted import acceptance_per_round, assisted_html, assisted_text

from conftest import make_tiny_llama

PROMPT = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]])


@pytest.fixture(scope="module")
def models():
    target = make_tiny_llama(seed=0)
    draft = make_tiny_llama(seed=1)
    gc = draft.generation_config
    gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, gc.assistant_confidence_threshold = 4, "constant", 0.0
    return target, draft


def _traced(model, seed=0, **kw):
    kw = {"input_ids": PROMPT, "max_new_tokens": 12, "pad_token_id": 0, **kw}
    torch.manual_seed(seed)
    ref = model.generate(**kw)
    torch.manual_seed(seed)
    with tracer.trace(model) as t:
        out = model.generate(**kw)
    assert torch.equal(out, ref), "traced output differs"
    return out, t.assisted


def _check_against_verifier(model, out, at: AssistedTrace):
    """Greedy: each accepted draft is the verifier's arg-max, the first rejected one is not."""
    with torch.no_grad():
        logits = model(input_ids=out).logits[0]
    probs = logits.softmax(-1)
    assert at.sequences.tolist() == out.tolist()
    pieces = [PROMPT[0].tolist()]
    for r in at.rounds:
        pieces.append(r.appended.tolist())
        pos = r.cur_len - 1  # logits at pos predict token cur_len
        for i, tok in enumerate(r.drafted):
            row = probs[pos + i]
            assert float(r.verifier_p_drafted[i]) == pytest.approx(float(row[tok]), abs=1e-4)
            if i < r.accepted:
                assert int(row.argmax()) == tok
            elif i == r.accepted and len(r.appended) > i:
                assert int(row.argmax()) != tok and int(row.argmax()) == r.appended[i]
                assert "arg-max" in r.reason
                break
    assert sum(pieces, []) == out[0].tolist()


def test_prompt_lookup_greedy(models):
    target, _ = models
    out, at = _traced(target, prompt_lookup_num_tokens=3, do_sample=False)
    assert at.source == "prompt_lookup" and at.drafted_total > 0
    assert any(r.accepted > 0 for r in at.rounds) and any(r.accepted < r.num_drafted for r in at.rounds)
    _check_against_verifier(target, out, at)
    assert at.acceptance_rate == pytest.approx(at.accepted_total / at.drafted_total)
    assert acceptance_per_round(at) == [(r.accepted, r.num_drafted) for r in at.rounds]


def test_assistant_model_greedy_and_draft_trace(models):
    target, draft = models
    kw = {"input_ids": PROMPT, "max_new_tokens": 12, "pad_token_id": 0, "do_sample": False, "assistant_model": draft}
    ref = target.generate(**kw)
    with tracer.trace(target) as t, tracer.trace(draft) as d:
        out = target.generate(**kw)
    assert torch.equal(out, ref)
    at = t.assisted
    assert at.source == "assistant_model:LlamaForCausalLM" and at.drafted_total > 0
    assert any(r.accepted < r.num_drafted for r in at.rounds), "a different draft model must be rejected somewhere"
    _check_against_verifier(target, out, at)
    # the draft model's own steps: one trace of its session per drafting round, generating the drafts
    drafting = [r for r in at.rounds if r.num_drafted]
    assert len(d.traces) == len(drafting)
    for r, tr in zip(drafting, d.traces):
        assert tr.generated_ids(0).tolist()[: r.num_drafted] == r.drafted.tolist()
        # the draft model's probability of each drafted token, from its own trace
        for i, tok in enumerate(r.drafted):
            top = tr.steps[i].final
            assert int(top.ids[0, 0]) == tok
            assert float(r.draft_p_drafted[i]) == pytest.approx(float(top.probs[0, 0]), abs=1e-5)


def test_speculative_sampling_identical(models):
    target, draft = models
    out, at = _traced(target, seed=7, do_sample=True, assistant_model=draft, top_k=50)
    assert at.do_sample and at.drafted_total > 0
    assert sum([PROMPT[0].tolist()] + [r.appended.tolist() for r in at.rounds], []) == out[0].tolist()
    for r in at.rounds:
        if r.num_drafted == 0:  # the last round, with no room left to draft
            assert r.draft_p_drafted is None and len(r.appended) == 1
            continue
        assert r.draft_p_drafted is not None and r.draft_p_drafted.shape == r.drafted.shape
        if r.accepted < r.num_drafted and len(r.appended) > r.accepted:
            assert "min(1, p/q)" in r.reason


def test_views_and_round_trip(models, tmp_path):
    target, _ = models
    out, at = _traced(target, prompt_lookup_num_tokens=3, do_sample=False)
    at.token_text[int(at.rounds[0].drafted[0])] = "<b>&中文🙂"
    page = assisted_html(at, tmp_path / "a.html")
    assert "&lt;b&gt;&amp;中文🙂" in page and "<b>&" not in page
    assert page.count("<tr>") == at.num_rounds + 1
    text = assisted_text(at)
    assert f"{at.accepted_total}/{at.drafted_total} drafted tokens accepted" in text
    loaded = AssistedTrace.load(at.save(tmp_path / "a.json"))
    assert loaded.summary() == at.summary() and loaded.table() == at.table()


def test_refusals(models):
    target, _ = models
    with tracer.trace(target) as t:
        with pytest.raises(NotSupportedError, match="the traced model itself"):
            target.generate(input_ids=PROMPT, assistant_model=target, max_new_tokens=2, pad_token_id=0)
        with pytest.raises(NotSupportedError, match="assistant_early_exit"):
            target.generate(input_ids=PROMPT, assistant_early_exit=1, prompt_lookup_num_tokens=2, max_new_tokens=2)
    assert t.assisted_traces == []


def test_settings_that_change_what_is_accepted_or_run_are_refused(models):
    """assistant_ensemble_weight accepts by a mix of the verifier's and the draft's probabilities
    (the rounds' reasons would be wrong); with num_beams > 1 transformers runs beam search and
    ignores the assistant. Refused before any forward, by keyword or through a generation config."""
    from transformers import GenerationConfig

    target, draft = models
    calls = []
    handle = target.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with tracer.trace(target) as t:
            with pytest.raises(NotSupportedError, match="assistant_ensemble_weight"):
                target.generate(input_ids=PROMPT, assistant_model=draft, assistant_ensemble_weight=0.5,
                                max_new_tokens=2, pad_token_id=0)
            with pytest.raises(NotSupportedError, match="assistant_ensemble_weight"):
                target.generate(PROMPT, GenerationConfig(assistant_ensemble_weight=0.5, max_new_tokens=2),
                                assistant_model=draft, pad_token_id=0)
            with pytest.raises(NotSupportedError, match="ignores the assistant"):
                target.generate(input_ids=PROMPT, assistant_model=draft, num_beams=2, max_new_tokens=2, pad_token_id=0)
            with pytest.raises(NotSupportedError, match="ignores the assistant"):
                target.generate(input_ids=PROMPT, prompt_lookup_num_tokens=2, max_new_tokens=2, pad_token_id=0,
                                generation_config=GenerationConfig(num_beams=2))
    finally:
        handle.remove()
    assert calls == [] and t.assisted_traces == [] and t.beam_traces == []


def test_prompt_lookup_through_a_generation_config_is_recorded(models):
    """Prompt lookup set in a GenerationConfig (passed, or the model's own) runs assisted decoding:
    recorded as such, not refused as an unknown mode."""
    from transformers import GenerationConfig

    target, _ = models
    out, at = _traced(target, generation_config=GenerationConfig(prompt_lookup_num_tokens=3, do_sample=False))
    assert at.source == "prompt_lookup" and at.drafted_total > 0
    _check_against_verifier(target, out, at)
    target.generation_config.prompt_lookup_num_tokens = 3
    try:
        out, at = _traced(target, do_sample=False)
    finally:
        target.generation_config.prompt_lookup_num_tokens = None
    assert at.source == "prompt_lookup" and at.drafted_total > 0
    _check_against_verifier(target, out, at)


@pytest.mark.slow
def test_embedded_prompt_lookup(embedded):
    """The real model verifying n-gram drafts from its own prompt: identical output, acceptance
    checked against a separate full forward."""
    model, tok = embedded
    text = "Repeat exactly: the quick brown fox jumps over the lazy dog. the quick brown fox jumps over the lazy dog."
    _, encoded, kw = tracer.prepare_generate(model, tok, text, max_new_tokens=24, do_sample=False)
    kw["prompt_lookup_num_tokens"] = 4
    ref = model.generate(**encoded, **kw)
    with tracer.trace(model, tok) as t:
        out = model.generate(**encoded, **kw)
    assert torch.equal(out, ref)
    at = t.assisted
    assert at.accepted_total > 0 and at.tokens_per_round > 1.0
    with torch.no_grad():
        probs = model(input_ids=out).logits[0].float().softmax(-1)
    for r in at.rounds:
        for i, tok_id in enumerate(r.drafted):
            row = probs[r.cur_len - 1 + i]
            if i < r.accepted:
                assert int(row.argmax()) == tok_id
            elif len(r.appended) > i:
                assert int(row.argmax()) == r.appended[i] != tok_id
                break


def test_unseen_rounds_warn_and_generation_unchanged(models, monkeypatch):
    """If transformers stopped calling the generator methods tracer wraps, the run still returns
    the untraced output and the trace says it recorded nothing (a TracerWarning, never silence)."""
    from tracer import assisted

    target, _ = models
    kw = {"input_ids": PROMPT, "max_new_tokens": 6, "pad_token_id": 0, "prompt_lookup_num_tokens": 3}
    ref = target.generate(**kw)
    monkeypatch.setattr(assisted.AssistedRecorder, "wrap_factory", lambda self, original: original)
    with tracer.trace(target) as t:
        with pytest.warns(tracer.TracerWarning, match="no draft/verify round"):
            out = target.generate(**kw)
    assert torch.equal(out, ref) and t.assisted.status.startswith("recording stopped")
