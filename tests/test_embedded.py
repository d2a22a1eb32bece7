"""The recorder, cache inspector and attention recording on the real embedded SmolLM2-135M."""

from __future__ import annotations

import inspect
import numpy as np
import pytest
import torch

import tracer
from tracer import RecordConfig
from tracer.hooks import encode_prompts

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea and the wind over it.",
    "Hi",
]
SAMPLING = dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.1)


def _encode(tokenizer, prompts):
    _, enc = encode_prompts(tokenizer, prompts, chat=True)
    return enc


def _pair(model, tokenizer, prompts, record=None, seed=None, **kw):
    """(untraced output, traced output, trace) for the same call."""
    enc = _encode(tokenizer, prompts)
    kw = {"max_new_tokens": 24, "pad_token_id": tokenizer.pad_token_id, **kw}
    if seed is not None:
        torch.manual_seed(seed)
    ref = model.generate(**enc, **kw)
    with tracer.trace(model, tokenizer, record=record) as t:
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(**enc, **kw)
    return ref, out, t.trace


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["single", "batch3"])
def test_greedy_identical(embedded, prompts):
    model, tok = embedded
    ref, out, trace = _pair(model, tok, prompts, do_sample=False)
    assert torch.equal(ref, out)
    assert trace.batch_size == len(prompts)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["single", "batch3"])
def test_sampling_identical_with_all_four_processors(embedded, prompts):
    model, tok = embedded
    ref, out, trace = _pair(model, tok, prompts, seed=1234, **SAMPLING)
    assert torch.equal(ref, out)
    names = [p.name for p in trace.steps[0].processors]
    assert names == ["RepetitionPenaltyLogitsProcessor", "TemperatureLogitsWarper", "TopKLogitsWarper",
                     "TopPLogitsWarper"]
    masked = np.array([next(p for p in s.processors if p.name == "TopPLogitsWarper").newly_masked for s in trace.steps])
    assert (masked > 0).any()


def test_batch_inputs_steps_and_stop(embedded):
    model, tok = embedded
    enc = _encode(tok, PROMPTS)
    lengths = enc["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3  # three different prompt lengths, left padded
    _, out, trace = _pair(model, tok, PROMPTS, do_sample=False, max_new_tokens=40)
    p = enc["input_ids"].shape[1]
    assert np.array_equal(trace.steps[0].inputs.input_ids, enc["input_ids"].numpy())
    for i, step in enumerate(trace.steps[1:], start=1):
        assert step.inputs.input_ids.shape == (3, 1)
        assert step.inputs.cache_slots.tolist() == [p + i - 1]
    # the short greeting ends its turn with <|im_end|>; that terminator is named
    assert trace.stop_reasons[2] == "eos:<|im_end|>"
    done = trace.steps.index(next(s for s in trace.steps if s.finished[2]))
    assert all(not s.active[2] for s in trace.steps[done + 1:])
    assert trace.generated_text[0].count("Paris") >= 1


def test_trace_generate_chat_and_paris(embedded):
    model, tok = embedded
    trace = tracer.trace_generate(model, tok, "What is the capital of France?", max_new_tokens=20, do_sample=False)
    assert "Paris" in trace.generated_text[0]
    assert trace.prompts[0].startswith("<|im_start|>")
    assert trace.stop_reasons[0] in ("eos:<|im_end|>", "max_length")
    assert trace.meta.terminators[tok.convert_tokens_to_ids("<|im_end|>")] == "<|im_end|>"


def test_dynamic_cache_growth_and_memory_model(embedded):
    model, tok = embedded
    enc = _encode(tok, PROMPTS[:1])
    p = enc["input_ids"].shape[1]
    with tracer.trace(model, tok) as t:
        model.generate(**enc, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    cache = t.trace.cache
    assert cache.cache_class == "DynamicCache" and cache.num_layers == 30
    assert {info.kv_heads for info in cache.layers} == {3} and {info.head_dim for info in cache.layers} == {64}
    assert cache.seq_len.shape == (32, 30)
    expected = p + np.arange(32)  # the last token chosen is never fed back
    assert np.array_equal(cache.seq_len, np.repeat(expected[:, None], 30, axis=1))
    assert np.array_equal(cache.total_bytes, cache.predicted_bytes())
    # 2 × 30 layers × 3 kv heads × 64 × tokens × 4 bytes (fp32)
    assert cache.total_bytes[-1] == 2 * 30 * 3 * 64 * (p + 31) * 4
    assert cache.predicted_bytes(query_heads=9)[-1] == 3 * cache.total_bytes[-1]


def test_static_cache_allocated_fixed(embedded):
    model, tok = embedded
    enc = _encode(tok, PROMPTS[:1])
    p = enc["input_ids"].shape[1]
    ref = model.generate(**enc, max_new_tokens=10, do_sample=False, cache_implementation="static")
    with tracer.trace(model, tok) as t:
        out = model.generate(**enc, max_new_tokens=10, do_sample=False, cache_implementation="static")
    assert torch.equal(ref, out)
    cache = t.trace.cache
    assert cache.cache_class == "StaticCache" and cache.layers[0].kind == "StaticLayer"
    assert len(set(cache.allocated_len.ravel().tolist())) == 1  # allocated never changes
    used = cache.seq_len[:, 0]
    assert used.tolist() == [p + i for i in range(len(used))]
    assert (cache.allocated_len[:, 0] > used).all()
    assert np.all(cache.total_bytes == cache.total_bytes[0])


def test_multi_turn_reuses_first_turn_cache(embedded):
    model, tok = embedded
    messages = [{"role": "user", "content": "Name a colour."}]
    _, enc = encode_prompts(tok, [messages], chat=True)
    with tracer.trace(model, tok) as t:
        first = model.generate(**enc, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        reused = cache.get_seq_length()
        answer = tok.decode(first.sequences[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And another?"}]
        _, enc2 = encode_prompts(tok, [messages], chat=True)
        # transformers >= 5.2x names the argument `cache`; 5.17 `past_key_values`
        cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        model.generate(**enc2, **{cache_kw: cache}, max_new_tokens=8, do_sample=False)
    turn1, turn2 = t.traces
    assert turn1.cache.reused_len == 0
    assert turn2.cache.reused_len == reused > 0
    s0 = turn2.steps[0]
    assert s0.inputs.cache_len_before == reused
    assert s0.inputs.cache_slots[0] == reused  # new positions start after the reused ones
    assert s0.inputs.input_ids.shape[1] == enc2["input_ids"].shape[1] - reused


def test_attention_all_layers_identical_and_matches_eager(embedded):
    model, tok = embedded
    enc = _encode(tok, PROMPTS)
    record = RecordConfig(attention=True, attention_dtype="float32")
    ref, out, trace = _pair(model, tok, PROMPTS, record=record, do_sample=False, max_new_tokens=12)
    assert torch.equal(ref, out)
    assert model.config._attn_implementation == "sdpa"
    assert trace.attention_layers == tuple(range(30)) and trace.attention_heads == tuple(range(9))
    assert trace.kv_head_of == (0, 0, 0, 1, 1, 1, 2, 2, 2)
    # eager attention of the same full sequences, for comparison
    seqs = out[:, :-1]
    mask = torch.cat([enc["attention_mask"], torch.ones(3, seqs.shape[1] - enc["attention_mask"].shape[1],
                                                         dtype=torch.long)], dim=1)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager = model(input_ids=seqs, attention_mask=mask, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    for layer in (0, 11, 29):
        for b in range(3):
            valid = mask[b].bool().numpy()
            for h in (0, 4, 8):
                mine = trace.head_map(layer, h, seq=b)
                theirs = eager[layer][b, h].numpy()
                # every recorded row of a real query sums to 1 and is 0 above the diagonal
                rows = mine[valid]
                np.testing.assert_allclose(rows.sum(-1), 1.0, atol=1e-5)
                assert np.all(np.triu(mine, 1) == 0)
                assert np.all(mine[:, ~valid] == 0)  # left padding gets no weight
                assert np.all(mine[~valid] == 0)  # padding queries record zero rows
                np.testing.assert_allclose(rows, theirs[valid], atol=1e-5)


def test_llama3_terminator_named(llama3_tokenizer):
    """Stop reasons name whichever Llama-3 terminator fired (<|eot_id|> vs <|end_of_text|>)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

    tok = llama3_tokenizer
    eot, eos = tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()

    class Force(LogitsProcessor):
        def __init__(self, token, at):
            self.token, self.at = token, at

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - prompt_len == self.at:
                scores = scores.clone()
                scores[:, self.token] = 1e4
            return scores

    _, enc = encode_prompts(tok, "Hello", chat=True)
    prompt_len = enc["input_ids"].shape[1]
    assert enc["input_ids"][0, 0] == tok.convert_tokens_to_ids("<|begin_of_text|>")
    for token, at in ((eot, 2), (eos, 3)):
        with tracer.trace(model, tok) as t:
            model.generate(**enc, max_new_tokens=6, do_sample=False, eos_token_id=[eos, eot], pad_token_id=eos,
                           logits_processor=LogitsProcessorList([Force(token, at)]))
        assert t.trace.stop_reasons == [f"eos:{tok.decode([token])}"]
        assert t.trace.num_new_tokens == [at + 1]
