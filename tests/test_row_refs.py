"""Score rows held uncopied (issue 19): the recorder keeps a reference to a stage's scores row
when what receives it next only reads it (one of transformers' own read-only processors, or
``generate`` after the last), and a copy otherwise; a row written after all is caught by its
version counter and stops the recording at its step, never records wrong values."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation import logits_process as lp

import tracer
from tracer import RecordConfig
from tracer import _hf_compat as hf
from tracer.recorder import StepRecorder

from conftest import make_inputs
from test_recorder_events import _gen_config, _plan

V = 32

#: a constructor per class of READ_ONLY_PROCESSORS, set so that each one acts on the rows below
READ_ONLY = {
    "MinLengthLogitsProcessor": lambda: lp.MinLengthLogitsProcessor(10, 2),
    "MinNewTokensLengthLogitsProcessor": lambda: lp.MinNewTokensLengthLogitsProcessor(1, 10, 2),
    "TemperatureLogitsWarper": lambda: lp.TemperatureLogitsWarper(0.7),
    "RepetitionPenaltyLogitsProcessor": lambda: lp.RepetitionPenaltyLogitsProcessor(1.3),
    "TopKLogitsWarper": lambda: lp.TopKLogitsWarper(5),
    "TopPLogitsWarper": lambda: lp.TopPLogitsWarper(0.5),
    "MinPLogitsWarper": lambda: lp.MinPLogitsWarper(0.2),
    "TypicalLogitsWarper": lambda: lp.TypicalLogitsWarper(0.5),
    "EpsilonLogitsWarper": lambda: lp.EpsilonLogitsWarper(0.05),
    "EtaLogitsWarper": lambda: lp.EtaLogitsWarper(0.05),
    "NoRepeatNGramLogitsProcessor": lambda: lp.NoRepeatNGramLogitsProcessor(2),
    "SequenceBiasLogitsProcessor": lambda: lp.SequenceBiasLogitsProcessor([[[7], -4.0], [[5, 6], 3.0]]),
    "NoBadWordsLogitsProcessor": lambda: lp.NoBadWordsLogitsProcessor([[9], [5, 6]], eos_token_id=2),
    "ForcedBOSTokenLogitsProcessor": lambda: lp.ForcedBOSTokenLogitsProcessor(1),
    "ForcedEOSTokenLogitsProcessor": lambda: lp.ForcedEOSTokenLogitsProcessor(6, 2),
    "InfNanRemoveLogitsProcessor": lambda: lp.InfNanRemoveLogitsProcessor(),
    "ExponentialDecayLengthPenalty": lambda: lp.ExponentialDecayLengthPenalty((1, 1.5), 2, 1),
    "LogitNormalization": lambda: lp.LogitNormalization(),
    "SuppressTokensLogitsProcessor": lambda: lp.SuppressTokensLogitsProcessor([4, 8]),
    "SuppressTokensAtBeginLogitsProcessor": lambda: lp.SuppressTokensAtBeginLogitsProcessor([4, 8], 5),
}


def test_every_read_only_processor_is_checked_here():
    assert set(READ_ONLY) == set(hf.READ_ONLY_PROCESSORS)


@pytest.mark.parametrize("name", sorted(READ_ONLY))
@pytest.mark.parametrize("length", [1, 5])
def test_read_only_processor_never_writes_its_scores(name, length):
    """Against the installed transformers: on generate's 2-D scores (with -inf and nan entries,
    a sequence that repeats a bigram, at the first step and at the length that triggers the
    length-bound ones) the scores given stay as they were, version counter included."""
    processor = READ_ONLY[name]()
    assert hf.reads_scores_only(processor)
    ids = torch.tensor([[5, 6, 3, 5, 6], [1, 4, 4, 9, 7]])[:, -length:]
    g = torch.Generator().manual_seed(length)
    scores = torch.randn(2, V, generator=g) * 3
    scores[0, 11] = float("-inf")
    if name == "InfNanRemoveLogitsProcessor":
        scores[1, 12] = float("nan")
    before, version = scores.clone(), scores._version
    out = processor(ids, scores)
    assert scores._version == version
    assert torch.equal(scores.nan_to_num(), before.nan_to_num()) and torch.equal(scores.isnan(), before.isnan())
    assert out.shape == scores.shape


def test_a_subclass_defined_elsewhere_is_not_trusted():
    class Mine(lp.TemperatureLogitsWarper):
        pass

    assert not hf.reads_scores_only(Mine(0.5))
    assert not hf.reads_scores_only(object())


class _User:
    """A processor of the user's (not transformers'): may write what it is given."""


def test_rows_are_held_uncopied_only_before_read_only_processors():
    temp, user = lp.TemperatureLogitsWarper(0.7), _User()
    rec = StepRecorder(_plan(vocab_size=V), RecordConfig(cache=False))
    rec.configure(_gen_config(max_length=6), [temp, user], input_len=3)
    ids = torch.arange(3).view(1, 3)
    rec.forward_start((), {"input_ids": ids})
    rec.forward_end(types.SimpleNamespace(cache=None), {})
    logits = torch.randn(1, V)
    warped = logits / 0.7
    last = warped.clone()
    last[:, 0] = float("-inf")
    for processor, scores in ((None, logits), (temp, warped), (user, last)):
        rec.scores(processor, scores)
    held = [t for t, _ in rec.pool.held]
    assert held[0] is logits  # goes to Temperature, which only reads it
    assert held[1] is not warped and torch.equal(held[1], warped)  # goes to the user's: a copy
    assert held[2] is last  # the last: generate only reads it
    rec.stop_check(torch.cat([ids, torch.tensor([[4]])], 1), torch.zeros(1, dtype=torch.bool), [])
    trace = rec.finish(None, None)
    assert [s.name for s in trace.steps[0].stages] == ["logits", "TemperatureLogitsWarper", "_User"]
    assert list(trace.steps[0].stages[2].n_masked) == [1]


class _WritesFrom(LogitsProcessor):
    """Writes the scores it is given in place from step ``start`` on (step = calls so far)."""

    def __init__(self, start: int):
        self.start, self.calls = start, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls > self.start:
            scores[:, 3:7] = float("-inf")
        return scores


class _Identity(LogitsProcessor):
    def __call__(self, input_ids, scores):
        return scores


def test_a_row_written_after_its_stage_stops_the_recording_at_that_step(tiny_model, monkeypatch):
    """Were a processor trusted as read-only to write its input after all, the row kept uncopied
    changes under the recorder: the version counter finds it, recording stops at that step (the
    steps before kept, the generation unchanged), and no statistics of a changed row are kept."""
    monkeypatch.setattr(hf, "reads_scores_only", lambda p: True)  # trust everything, wrongly
    inputs = make_inputs(seq=5)
    gen = dict(max_new_tokens=5, pad_token_id=0, do_sample=False)  # no processors of generate's own
    plain = tiny_model.generate(**inputs, logits_processor=LogitsProcessorList([_WritesFrom(2)]), **gen)
    with pytest.warns(tracer.TracerWarning, match=r"recording stopped at step 2: RuntimeError: the logits scores "
                                                  r"of step 2 were written in place"):
        with tracer.trace(tiny_model, record=RecordConfig(cache=False)) as session:
            out = tiny_model.generate(**inputs, logits_processor=LogitsProcessorList([_WritesFrom(2)]), **gen)
    assert torch.equal(out, plain)
    trace = session.trace
    assert trace.num_steps == 2 and "written in place" in trace.meta.error
    assert all(int(step.stages[0].n_masked[0]) == 0 for step in trace.steps)


def test_an_unchanged_row_going_to_a_writer_is_copied_then(tiny_model, monkeypatch):
    """A trusted processor returning its input unchanged hands the very row held uncopied to the
    next processor: when that one may write, the row is copied first, and every value stays."""
    monkeypatch.setattr(hf, "reads_scores_only", lambda p: isinstance(p, _Identity))
    inputs = make_inputs(seq=5)
    gen = dict(max_new_tokens=4, pad_token_id=0, do_sample=False)
    with tracer.trace(tiny_model, record=RecordConfig(cache=False, full_logits=True)) as session:
        tiny_model.generate(**inputs, logits_processor=LogitsProcessorList([_Identity(), _WritesFrom(0)]), **gen)
    trace = session.trace
    assert trace.num_steps == 4 and trace.meta.error is None
    for step in trace.steps:
        logits, same, written = step.stages
        assert [s.name for s in step.stages] == ["logits", "_Identity", "_WritesFrom"]
        assert int(logits.n_masked[0]) == 0 and int(same.n_masked[0]) == 0 and int(written.n_masked[0]) == 4
        raw = trace.full_logits(step.index)[0]
        np.testing.assert_array_equal(logits.top.values[0], np.sort(raw)[::-1][: len(logits.top.values[0])])
