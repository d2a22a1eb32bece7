"""The llama.cpp converter without llama.cpp: hand-made captures → records (fast tier)."""

from __future__ import annotations

import numpy as np
import pytest

from tracer import RecordConfig
from tracer.backends.llamacpp_convert import LlamaCppFacts, Snapshot, StepCapture, stages_of, trace_from_steps
from tracer.records import StopReason

V = 12
FACTS = LlamaCppFacts(version="0.3.36", model_name="toy", architecture="llama", n_vocab=V, n_ctx=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, hidden_size=32, file_type="Q4_1", eog_ids=(11,))


def _logp(x):
    x = np.asarray(x, np.float64)
    m = x[np.isfinite(x)].max()
    return x - (m + np.log(np.exp(x[np.isfinite(x)] - m).sum()))


def _capture(raw, snaps, chosen, fed=(1, 2, 3), before=0, selector="dist"):
    return StepCapture(fed=list(fed), cache_len_before=before, kv_cells=before + len(fed), raw=np.asarray(raw, np.float32),
                       snapshots=snaps, chosen=chosen, selector=selector, eval_s=0.01, sample_s=0.001)


def test_stages_match_dense_arithmetic():
    rng = np.random.default_rng(0)
    raw = rng.normal(size=V).astype(np.float32)
    pen = raw.copy()
    pen[3] /= 1.3
    keep = np.argsort(-pen, kind="stable")[:4]
    temp = pen[keep] / 0.5
    snaps = [Snapshot("penalties", {"repeat_penalty": 1.3}, np.arange(V), pen),
             Snapshot("top-k", {"top_k": 4}, keep[::-1].copy(), pen[keep[::-1]]),  # any order: llama.cpp may sort
             Snapshot("temp", {"temperature": 0.5}, keep.copy(), temp),
             Snapshot("dist", {"seed": 1}, keep.copy(), temp)]
    chosen = int(keep[1])
    stages = stages_of(_capture(raw, snaps, chosen), V, top_k=3)
    assert [s.name for s in stages] == ["logits", "penalties", "top-k", "temp"]  # the selector is no stage
    dense = [raw, pen, np.where(np.isin(np.arange(V), keep), pen, -np.inf),
             np.where(np.isin(np.arange(V), keep), pen / 0.5, -np.inf)]
    for stage, row in zip(stages, dense):
        lp = _logp(row)
        assert stage.top.ids[0].tolist() == np.argsort(-row, kind="stable")[:3].tolist()
        np.testing.assert_allclose(stage.top.probs[0], np.exp(lp[stage.top.ids[0]]), rtol=1e-5)
        assert stage.n_masked[0] == int(np.isneginf(row).sum())
        assert stage.chosen_rank[0] == int((lp > lp[chosen]).sum())
        np.testing.assert_allclose(stage.chosen_logprob[0], lp[chosen], rtol=1e-5)
    lp1, lp2 = _logp(dense[1]), _logp(dense[2])
    p2 = np.exp(lp2)
    with np.errstate(invalid="ignore"):
        kl = np.nansum(np.where(p2 > 0, p2 * (lp2 - lp1), 0.0))
    np.testing.assert_allclose(stages[2].kl[0], kl, rtol=1e-4)
    assert stages[0].kl[0] == 0


def test_top_k_tie_across_the_kth_place_goes_to_the_lowest_ids():
    """Five ids share the 2nd-best value and top-3 keeps two of them: the lowest ids, whatever
    order the array holds them in (a partial sort may keep any two)."""
    raw = np.full(V, -3.0, np.float32)
    raw[9] = 2.0
    raw[[10, 7, 2, 5, 8]] = 1.0
    ids = np.array([9, 10, 7, 2, 5, 8, 0, 1, 3, 4, 6, 11], np.int32)  # a sampler reordered it
    snaps = [Snapshot("penalties", {}, ids, raw[ids])]
    stages = stages_of(_capture(raw, snaps, 9), V, top_k=3)
    assert [s.top.ids[0].tolist() for s in stages] == [[9, 2, 5], [9, 2, 5]]
    assert stages[1].top.values[0].tolist() == [2.0, 1.0, 1.0]
    assert stages[0].top.ids.dtype == np.int64


def test_identity_sampler_reuses_previous_stage():
    raw = np.linspace(-1, 1, V, dtype=np.float32)
    snaps = [Snapshot("penalties", {}, np.arange(V), raw.copy(), same_as_previous=True)]
    stages = stages_of(_capture(raw, snaps, 11), V, top_k=2)
    assert stages[1].kl[0] == 0 and stages[1].top is stages[0].top


def test_trace_from_steps_fields_and_round_trip(tmp_path):
    raw = np.arange(V, dtype=np.float32)
    caps = [_capture(raw, [Snapshot("greedy", {}, np.arange(V), raw)], 5, fed=(1, 2, 3), before=0, selector="greedy"),
            _capture(raw, [Snapshot("greedy", {}, np.arange(V), raw)], 11, fed=(5,), before=3, selector="greedy")]
    trace = trace_from_steps(caps, facts=FACTS, prompt_ids=[1, 2, 3], prompt_text="abc", settings={"temperature": 0.0},
                             stop=StopReason("eos", 11, "<11>"), output_text="x",
                             token_piece=lambda i: f"<{i}>".encode(), record=RecordConfig(top_k=3, full_logits=True),
                             reused=0)
    assert trace.meta.backend == "llama.cpp" and "attention" in trace.meta.backend_info["not_recorded"]
    assert trace.sequences[0].tolist() == [1, 2, 3, 5, 11]
    assert trace.stop_reasons[0] == "eos:<11>" and trace.meta.terminators == {11: "<11>"}
    assert trace.steps[1].inputs.cache_len_before == 3 and trace.steps[1].inputs.cache_slots.tolist() == [3]
    assert trace.cache.seq_len[:, 0].tolist() == [3, 4]
    np.testing.assert_array_equal(trace.full_logits(1)[0], raw)
    assert not trace.steps[0].sampled
    path = tmp_path / "t.trace"
    trace.save(path)
    import tracer

    back = tracer.load_trace(path)
    assert back.meta.backend == "llama.cpp" and back.sequences.tolist() == trace.sequences.tolist()
    assert [s.name for s in back.steps[0].stages] == ["logits"]


def test_chosen_outside_final_support_is_minus_inf():
    raw = np.arange(V, dtype=np.float32)
    snaps = [Snapshot("top-k", {"top_k": 2}, np.array([11, 10]), raw[[11, 10]])]
    stages = stages_of(_capture(raw, snaps, 3), V, top_k=4)
    assert np.isneginf(stages[1].chosen_logprob[0]) and stages[1].chosen_rank[0] == 2
    assert stages[1].top.ids[0].tolist() == [11, 10, -1, -1]


@pytest.mark.parametrize("flag", ["attention", "modules", "logit_lens"])
def test_unsupported_record_refused(flag):
    from tracer.backends.llamacpp import check_record
    from tracer.records import NotSupportedError

    with pytest.raises(NotSupportedError, match="llama.cpp backend cannot record"):
        check_record(RecordConfig(**{flag: True}))


def test_notes_names_and_terminators_beyond_the_eos():
    raw = np.linspace(-1, 1, V).astype(np.float32)
    cap = _capture(raw, [Snapshot("greedy", {}, np.zeros(0, np.int32), np.zeros(0, np.float32))], 11,
                   selector="greedy")
    facts = LlamaCppFacts(**{**FACTS.__dict__, "model_name": "SmolLM2-135M-Instruct", "gguf_name": "Smollm2 135M",
                             "eog_ids": (0, 11), "eos_id": 11})
    trace = trace_from_steps([cap], facts=facts, prompt_ids=[1, 2], prompt_text=None, settings={"seed": None},
                             stop=StopReason("eos", 11, "<11>"), output_text="", token_piece=lambda i: f"<{i}>".encode(),
                             notes=["greedy: the seed does not apply"])
    m = trace.meta
    assert m.model_name == "SmolLM2-135M-Instruct" and m.backend_info["gguf_name"] == "Smollm2 135M"
    assert m.terminators == {0: "<0>", 11: "<11>"} and m.generation_config["eos_token_id"] == [0, 11]
    assert "greedy: the seed does not apply" in m.notes
    assert ("terminators: llama.cpp ends the run on every end-of-generation token of the GGUF vocabulary "
            "(llama_vocab_is_eog): 0 '<0>', 11 '<11>'; the GGUF's eos token is 11 '<11>'") in m.notes
    # only the eos: nothing to say
    alone = trace_from_steps([cap], facts=LlamaCppFacts(**{**facts.__dict__, "eog_ids": (11,)}), prompt_ids=[1, 2],
                             prompt_text=None, settings={}, stop=StopReason("eos", 11, "<11>"), output_text="",
                             token_piece=lambda i: f"<{i}>".encode())
    assert not any(n.startswith("terminators:") for n in alone.meta.notes)
