"""The vLLM backend's conversion, on hand-made outputs shaped like vLLM's (no vLLM needed).

These run in both environments: they pin the RequestOutput -> Trace mapping (top-k order,
0-based ranks, stop reasons, prefix-cache inputs, prompt log-probs) without an engine.
"""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace as NS

import numpy as np
import pytest

from tracer import RecordConfig, load_trace
from tracer.backends.vllm import (
    EngineFacts,
    VLLMNotInstalledError,
    backend_info,
    check_record,
    prompt_logprobs,
    stop_reason_text,
    traces_from_outputs,
    with_logprobs,
)
from tracer.records import NotSupportedError


class FakeTokenizer:
    eos_token_id = 2
    pad_token_id = None
    special_tokens_map = {"eos_token": "<|im_end|>"}
    all_special_ids = [2]

    def batch_decode(self, rows, **kw):
        return [self.decode(r) for r in rows]

    def decode(self, ids, skip_special_tokens=False, **kw):
        return "".join("" if (skip_special_tokens and i == 2) else ("<|im_end|>" if i == 2 else f"t{i}") for i in ids)

    def convert_tokens_to_ids(self, text):
        return 2

    def convert_ids_to_tokens(self, ids):
        return ["<|im_end|>" if i == 2 else f"t{i}" for i in ids]


def lp(value, rank):
    return NS(logprob=value, rank=rank, decoded_token=None)


def row(chosen, chosen_value, chosen_rank, top):
    """vLLM's per-token dict: the chosen token first, then the top entries (rank 1..k)."""
    out = {chosen: lp(chosen_value, chosen_rank)}
    for r, (tid, value) in enumerate(top, start=1):
        out.setdefault(tid, lp(value, r))
    return out


FACTS = EngineFacts(version="0.32.0", logprobs_mode="raw_logprobs", model="/x/SmolLM2",
                    hf_config={"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "hidden_size": 64, "vocab_size": 100},
                    dtype="torch.float32", device="cpu", eos_token_id=2)


def completion(index=0, finish="stop", stop=None):
    # step 0 chose 7 (rank 2 of the raw distribution), step 1 chose 9 (rank 1), step 2 the eos
    rows = [
        row(7, -1.5, 2, [(5, -0.5), (7, -1.5), (8, -2.0)]),
        row(9, -0.1, 1, [(9, -0.1), (4, -3.0), (3, -4.0)]),
        row(2, -0.2, 1, [(2, -0.2), (11, -2.5)]),  # only two entries: padded to k=3
    ]
    return NS(index=index, text="t7t9", token_ids=[7, 9, 2], logprobs=rows, cumulative_logprob=-1.8,
              finish_reason=finish, stop_reason=stop)


def request(n=1, cached=0, prompt_lps=None, **kw):
    return NS(request_id="r0", prompt="p", prompt_token_ids=[1, 20, 21, 22], prompt_logprobs=prompt_lps,
              outputs=[completion(i, **kw) for i in range(n)], num_cached_tokens=cached, metrics=None)


def sp(**kw):
    base = dict(n=1, temperature=0.0, top_p=1.0, top_k=0, max_tokens=16, stop=None, stop_token_ids=None, logprobs=3,
                prompt_logprobs=None, seed=None)
    base.update(kw)
    return NS(**base)


def test_steps_hold_vllms_tokens_logprobs_ranks_and_topk():
    (t,) = traces_from_outputs([request()], sp(), facts=FACTS, tokenizer=FakeTokenizer(), record=RecordConfig(top_k=3))
    assert t.generated_ids(0).tolist() == [7, 9, 2]
    assert t.sequences.tolist() == [[1, 20, 21, 22, 7, 9, 2]]
    s0, s1, s2 = (s.stages[0] for s in t.steps)
    assert s0.name == "raw_logprobs"
    assert s0.top.ids.tolist() == [[5, 7, 8]] and s0.top.values.tolist() == [[-0.5, -1.5, -2.0]]
    assert s0.chosen_rank.tolist() == [1] and s1.chosen_rank.tolist() == [0]  # vLLM ranks are 1-based
    assert s0.chosen_logprob[0] == pytest.approx(-1.5)
    np.testing.assert_allclose(s0.top.probs[0], np.exp([-0.5, -1.5, -2.0]), rtol=1e-6)  # exact: logsumexp 0
    assert s2.top.ids.tolist() == [[2, 11, -1]] and np.isneginf(s2.top.values[0, 2])
    assert [bool(s.finished[0]) for s in t.steps] == [False, False, True]
    assert str(t.stop_reasons[0]) == "eos:<|im_end|>"
    assert t.generated_text == ["t7t9"] and t.token_text[7] == "t7" and -1 not in t.token_text
    assert not t.steps[0].sampled
    # inputs: the whole prompt at step 0 (nothing cached), then the previous token at its slot
    assert t.steps[0].inputs.input_ids.tolist() == [[1, 20, 21, 22]] and t.steps[0].inputs.cache_len_before == 0
    assert t.steps[2].inputs.input_ids.tolist() == [[9]] and t.steps[2].inputs.cache_len_before == 5
    assert t.steps[2].inputs.position_ids.tolist() == [[5]]
    info = backend_info(t)
    assert info["engine"] == "vllm" and info["traced_logprobs"] == 3 and info["finish_reason"] == "stop"
    assert t.meta.model_class == "LlamaForCausalLM" and t.meta.head_dim == 16 and t.meta.model_name == "SmolLM2"


def test_prefix_cache_hit_feeds_only_the_uncached_prompt():
    (t,) = traces_from_outputs([request(cached=2)], sp(), facts=FACTS, tokenizer=None, record=RecordConfig(top_k=3))
    inp = t.steps[0].inputs
    assert inp.input_ids.tolist() == [[21, 22]] and inp.cache_len_before == 2
    assert inp.position_ids.tolist() == [[2, 3]]
    assert backend_info(t)["num_cached_tokens"] == 2
    assert any("2 of 4 prompt tokens reused" in n for n in t.meta.notes)
    assert t.token_text[7] == "<7>"  # no tokenizer: ids shown as ids


def test_n_samples_flatten_in_request_order_and_stop_reasons_map():
    outs = [request(n=2), request(n=1, finish="length")]
    ts = traces_from_outputs(outs, sp(n=2, temperature=0.8), facts=FACTS, tokenizer=FakeTokenizer(),
                             record=RecordConfig(top_k=3))
    assert len(ts) == 3 and [backend_info(t)["sample_index"] for t in ts] == [0, 1, 0]
    assert ts[0].steps[0].sampled
    assert [str(t.stop_reasons[0]) for t in ts] == ["eos:<|im_end|>", "eos:<|im_end|>", "max_length"]
    tok = FakeTokenizer()
    assert stop_reason_text("stop", None, [5, 2], 2, tok) == "eos:<|im_end|>"
    assert stop_reason_text("stop", 9, [5, 9], 2, tok) == "stop_token:t9"
    assert stop_reason_text("stop", "Paris", [5], 2, tok) == "stop_string:Paris"
    assert stop_reason_text("length", None, [5], 2, tok) == "max_length"
    assert stop_reason_text("abort", None, [5], 2, tok) == "abort"
    assert stop_reason_text(None, None, [5], 2, tok) is None


def test_unfinished_request_is_marked_interrupted():
    (t,) = traces_from_outputs([request(finish=None)], sp(), facts=FACTS, tokenizer=None, record=RecordConfig(top_k=3))
    assert not any(s.finished[0] for s in t.steps) and t.meta.status == "interrupted"
    assert str(t.stop_reasons[0]) == "interrupted"


def test_logits_mode_leaves_probabilities_unknown():
    facts = EngineFacts(**{**FACTS.__dict__, "logprobs_mode": "processed_logits"})
    (t,) = traces_from_outputs([request()], sp(), facts=facts, tokenizer=None, record=RecordConfig(top_k=3))
    st = t.steps[0].stages[0]
    assert st.name == "processed_logits" and math.isnan(st.top.logsumexp[0]) and math.isnan(st.chosen_logprob[0])
    assert st.top.values.tolist() == [[-0.5, -1.5, -2.0]]  # the values are what vLLM returned
    assert any("logits mode" in n for n in t.meta.notes)


def test_prompt_logprobs_are_kept_as_blobs_and_survive_save(tmp_path):
    plp = [None, row(20, -5.0, 9, [(30, -1.0), (31, -2.0)]), row(21, -0.3, 1, [(21, -0.3), (40, -2.0)]),
           row(22, -0.7, 2, [(50, -0.6), (22, -0.7)])]
    (t,) = traces_from_outputs([request(prompt_lps=plp)], sp(), facts=FACTS, tokenizer=FakeTokenizer(),
                               record=RecordConfig(top_k=3))
    got = prompt_logprobs(t)
    assert math.isnan(got["logprobs"][0]) and got["logprobs"][1:].tolist() == pytest.approx([-5.0, -0.3, -0.7])
    assert got["top_ids"].tolist() == [[-1, -1], [30, 31], [21, 40], [50, 22]]
    back = load_trace(t.save(tmp_path / "p.trace"))
    np.testing.assert_array_equal(prompt_logprobs(back)["top_ids"], got["top_ids"])
    assert backend_info(back) == backend_info(t)
    assert [str(r) for r in back.stop_reasons] == ["eos:<|im_end|>"]


def test_mismatched_logprobs_raise():
    bad = request()
    bad.outputs[0].logprobs = bad.outputs[0].logprobs[:2]
    with pytest.raises(ValueError, match="2 log-prob rows for 3 tokens"):
        traces_from_outputs([bad], sp(), facts=FACTS, record=RecordConfig(top_k=3))


def test_record_options_and_logprob_requests():
    check_record(RecordConfig(top_k=20))  # the default light config is fine (cache=True is ignored)
    with pytest.raises(NotSupportedError, match="attention maps"):
        check_record(RecordConfig(attention=True))
    with pytest.raises(NotSupportedError, match="key/value snapshots"):
        check_record(RecordConfig(kv_layers=[0]))
    given = NS(logprobs=None, prompt_logprobs=None, clone=lambda: NS(logprobs=None, prompt_logprobs=None))
    asked = with_logprobs(given, 10, 3)
    assert (asked.logprobs, asked.prompt_logprobs) == (10, 3) and given.logprobs is None  # a copy
    more = NS(logprobs=15, prompt_logprobs=None, clone=lambda: NS(logprobs=15, prompt_logprobs=None))
    assert with_logprobs(more, 10).logprobs == 15


def test_without_vllm_the_error_names_the_extra(monkeypatch):
    import tracer

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(VLLMNotInstalledError, match=r"tracer\[vllm\]"):
        tracer.vllm_generate(object(), ["hi"])


def test_run_vllm_without_vllm_is_one_cli_error(monkeypatch, tmp_path):
    from argparse import Namespace

    from tracer.backends.vllm_cli import run_vllm
    from tracer.cli import CliError

    monkeypatch.setitem(sys.modules, "vllm", None)
    args = Namespace(record_attention=False, no_trace=False, trace_dir=None, predictions_file=tmp_path / "p.json")
    with pytest.raises(CliError, match=r"--use-vllm needs vLLM.*pip install 'tracer\[vllm\]'"):
        run_vllm(args, ["hi"])
    assert not (tmp_path / "p.json").exists()


def cli_args(tmp_path, **kw):
    from argparse import Namespace

    base = dict(model=None, tokenizer=None, dtype="float32", device="auto", gpus=None, seed=0, max_new_tokens=24,
                do_sample=False, temperature=None, top_k=None, top_p=None, repetition_penalty=None, with_prompt=True,
                predictions_file=tmp_path / "p.json", trace_dir=None, no_trace=False, record_attention=False,
                load_in_4bit=False, load_in_8bit=False, attn_implementation=None)
    base.update(kw)
    return Namespace(**base)


def test_cli_flags_map_to_llm_and_sampling_params(tmp_path, llama3_tokenizer):
    from tracer.backends.vllm_cli import generation_config, llm_kwargs, run_vllm, stop_settings
    from tracer.cli import CliError

    kw = llm_kwargs(cli_args(tmp_path, gpus="0,1", dtype="bfloat16"))
    assert kw["tensor_parallel_size"] == 2 and kw["dtype"] == "bfloat16" and kw["model"].endswith("SmolLM2-135M-Instruct")
    assert not kw["enforce_eager"]  # GPUs: vLLM's compiled graphs
    kw = llm_kwargs(cli_args(tmp_path, dtype="auto", device="cpu"))  # the transformers path's rule: fp32 on CPU
    assert (kw["dtype"], kw["tensor_parallel_size"], kw["enforce_eager"]) == ("float32", 1, True)
    args = cli_args(tmp_path, do_sample=True, temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.1, seed=3)
    config = generation_config(args, llama3_tokenizer)
    assert config == {"max_tokens": 24, "temperature": 0.7, "seed": 3, "stop_token_ids": [128001, 128009],
                      "stop": ["<|eot_id|>", "<|end_of_text|>"], "top_k": 50, "top_p": 0.9,
                      "repetition_penalty": 1.1}
    # a ChatML vocabulary has neither Llama-3 stop string: none is passed
    smol = NS(eos_token_id=2, get_vocab=lambda: {"<|im_end|>": 2, "a": 3})
    assert stop_settings(smol) == ([2], [])
    assert "stop" not in generation_config(cli_args(tmp_path), smol)
    with pytest.raises(CliError, match="record-attention"):
        run_vllm(cli_args(tmp_path, record_attention=True), ["x"], llm=object())
    with pytest.raises(CliError, match="bitsandbytes"):
        llm_kwargs(cli_args(tmp_path, load_in_4bit=True))


def test_token_bytes_rebuild_multibyte_text(embedded_tokenizer):
    from tracer.backends.vllm_convert import token_bytes

    tok = embedded_tokenizer
    text = "为什么 café"
    ids = tok.encode(text, add_special_tokens=False)
    raw = token_bytes(tok, ids)
    assert b"".join(raw[i] for i in ids).decode("utf-8") == text
    assert token_bytes(tok, [tok.eos_token_id]) == {tok.eos_token_id: b"<|im_end|>"}
    assert token_bytes(None, ids) is None


@pytest.fixture(scope="module")
def embedded_tokenizer():
    from tracer.models import embedded_model_path, load_tokenizer

    return load_tokenizer(embedded_model_path())
