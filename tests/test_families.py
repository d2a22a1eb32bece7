"""The family matrix: every decoder-only layout tracer supports, from tiny random configs.

For each family: traced ids == untraced ids (sdpa, and eager where the family has both), the
recorded attention == eager's ``output_attentions`` (padded batch, GQA/MQA included), the
measured cache bytes == the bytes of the cache ``generate`` returned, and the stop reasons
(one sequence stops on eos, the other on max_length).  Families whose attention does not go
through transformers' ``AttentionInterface`` trace everything else and refuse ``attention=True``
in one line."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import tracer
from tracer import RecordConfig
from tracer import _hf_compat as hf
from tracer.errors import NotSupportedError

VOCAB = 256
BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=VOCAB,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=128)
GQA = dict(num_key_value_heads=2)
#: model_type -> config overrides (beyond BASE) for a tiny model of the family
ATTENTION_FAMILIES = {
    "llama": GQA,
    "mistral": {**GQA, "sliding_window": 4},
    "qwen2": GQA,
    "qwen3": {**GQA, "head_dim": 16},
    "gemma": {**GQA, "head_dim": 16},
    "gemma2": {**GQA, "head_dim": 16, "sliding_window": 4},
    "gemma3_text": {**GQA, "head_dim": 16, "sliding_window": 4},
    "phi3": GQA,
    "olmo": GQA,
    "olmo2": GQA,
    "granite": GQA,
    "cohere": GQA,
    "stablelm": GQA,
    "starcoder2": GQA,
    "helium": {**GQA, "head_dim": 16},
    "persimmon": {},
    "phi": GQA,
    "gpt2": {},
    "gpt_neox": {},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "gptj": {"rotary_dim": 8},
    "codegen": {"rotary_dim": 8},
    "falcon": {"new_decoder_architecture": True, "num_kv_heads": 2},
    "gpt_bigcode": {"multi_query": True},
    "biogpt": {},
    "qwen2_moe": {**GQA, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 32},
    "qwen3_moe": {**GQA, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16},
    "mixtral": {**GQA, "num_local_experts": 4, "num_experts_per_tok": 2},
    "olmoe": {**GQA, "num_experts": 4, "num_experts_per_tok": 2},
    "gpt_oss": {**GQA, "num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16, "sliding_window": 4},
    # more model.layers families (GQA 4/2, the family's own defaults otherwise)
    "smollm3": GQA,
    "glm": GQA,
    "glm4": GQA,
    "exaone4": GQA,
    "nemotron": GQA,
    "seed_oss": GQA,
    "arcee": GQA,
    "apertus": GQA,
    "ernie4_5": GQA,
    "ernie4_5_moe": GQA,
    "bitnet": GQA,
    "granitemoe": GQA,
    "jetmoe": GQA,
    "phimoe": GQA,
    "olmo3": GQA,
    "doge": GQA,
    "cohere2": GQA,
    "vaultgemma": GQA,
    "mellum": GQA,
    "nanochat": GQA,
    "glm4_moe": GQA,
    "afmoe": GQA,
    "granitemoeshared": GQA,
    "flex_olmo": GQA,
    "ministral3": GQA,
    "solar_open": GQA,
}
#: layouts tracer finds whose attention is not routed through AttentionInterface
OTHER_ATTENTION = {"bloom": {}, "mpt": {"n_heads": 4, "d_model": 64, "n_layers": 2}, "xglm": {"ffn_dim": 128}}


def make_family(model_type: str, overrides: dict, impl: str = "eager"):
    config = AutoConfig.for_model(model_type, **{**BASE, **overrides})
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config, attn_implementation=impl).to(torch.float32).eval()


def _inputs():
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, 6), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def _cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _impls(model) -> list[str]:
    out = []
    for impl in ("sdpa", "eager"):
        try:
            model.set_attn_implementation(impl)
        except Exception:  # noqa: BLE001 - the family has no such implementation
            continue
        out.append(impl)
    return out


@pytest.mark.parametrize("model_type", sorted(ATTENTION_FAMILIES))
def test_family_parity(model_type):
    model = make_family(model_type, ATTENTION_FAMILIES[model_type])
    if not hf.routes_attention_interface(hf.attention_module(hf.decoder_parts(model).layers[0])):
        # older transformers releases (5.19: CodeGen, Falcon, GPT-J) still compute attention in the
        # family's own code: everything but attention is traced, attention=True is refused
        from packaging.version import Version

        assert Version(hf.transformers_version()) < Version("5.25"), f"{model_type}: its attention left AttentionInterface"
        _check_without_interface(model)
        return
    inputs = _inputs()
    kw = {"do_sample": False, "max_new_tokens": 4, "pad_token_id": 0}
    first = model.generate(**inputs, **kw)
    eos = int(first[0, 6 + 1])  # sequence 0 stops on eos at its second new token
    kw["eos_token_id"] = eos
    ref = model.generate(**inputs, **kw, return_dict_in_generate=True)
    seqs = ref.sequences
    n_new = seqs.shape[1] - 6
    for impl in _impls(model):
        model.set_attn_implementation(impl)
        ref_impl = model.generate(**inputs, **kw, return_dict_in_generate=True)
        with tracer.trace(model, record=RecordConfig(attention=True, attention_dtype="float32")) as t:
            out = model.generate(**inputs, **kw)
        assert torch.equal(out, ref_impl.sequences), f"{model_type}/{impl}: traced ids differ"
        trace = t.trace
        # stop reasons: 0 on eos (unless 1 hit it too, still eos), 1 on eos or max_length
        reasons = trace.stop_reasons
        assert reasons[0].kind == "eos" and reasons[0].token_id == eos, (model_type, impl, reasons)
        gen1 = out[1, 6:].tolist()
        assert reasons[1].kind == ("eos" if eos in gen1 else "max_length"), (model_type, impl, reasons)
        # cache bytes: the last recorded step holds what generate returned
        assert int(trace.cache.total_bytes[-1]) == _cache_bytes(ref_impl.past_key_values), (model_type, impl)
    # attention == eager's own output_attentions, step by step (same incremental path)
    model.set_attn_implementation("eager")
    kw = {**kw, "eos_token_id": None, "min_new_tokens": n_new, "max_new_tokens": n_new}
    eager = model.generate(**inputs, **kw, output_attentions=True, return_dict_in_generate=True).attentions
    impls = _impls(model)
    assert impls[-1] == "eager"
    for impl in impls:
        model.set_attn_implementation(impl)
        with tracer.trace(model, record=RecordConfig(attention=True, attention_dtype="float32")) as t:
            model.generate(**inputs, **kw)
        trace = t.trace
        assert trace.num_steps == len(eager) == n_new
        for step in range(n_new):
            for layer in range(2):
                want = eager[step][layer].float().numpy()  # (B, H, Q, T)
                mine = trace.attention(step, layer)
                k = mine.shape[-1]
                want = want[..., -mine.shape[2]:, :k].copy()
                if step == 0:  # padding query rows: zero in the trace, whatever eager made of them
                    want[1, :, :2] = 0
                np.testing.assert_allclose(mine, want, atol=2e-5,
                                           err_msg=f"{model_type}/{impl} step {step} layer {layer}")
                assert np.all(want[..., k:] == 0)


@pytest.mark.parametrize("model_type", sorted(OTHER_ATTENTION))
def test_family_without_attention_interface(model_type):
    _check_without_interface(make_family(model_type, OTHER_ATTENTION[model_type]))


def _check_without_interface(model):
    assert not hf.routes_attention_interface(hf.attention_module(hf.decoder_parts(model).layers[0]))
    inputs = _inputs()
    kw = {"do_sample": False, "max_new_tokens": 3, "pad_token_id": 0}
    ref = model.generate(**inputs, **kw)
    with tracer.trace(model, record=RecordConfig(hidden_layers="all")) as t:
        out = model.generate(**inputs, **kw)
    assert torch.equal(out, ref) and t.trace.num_steps == 3
    with pytest.raises(NotSupportedError, match="does not go through transformers' AttentionInterface"):
        tracer.trace(model, record=RecordConfig(attention=True))


def test_layouts_found():
    """The rule names the parts of each layout: layers, final norm, attention module."""
    expect = {"gpt2": ("h", "ln_f", "attn"), "gpt_neox": ("layers", "final_layer_norm", "attention"),
              "opt": ("layers", "final_layer_norm", "self_attn"), "falcon": ("h", "ln_f", "self_attention"),
              "phi": ("layers", "final_layernorm", "self_attn"), "llama": ("layers", "norm", "self_attn")}
    for model_type, (layers, norm, attn) in expect.items():
        model = make_family(model_type, ATTENTION_FAMILIES[model_type])
        parts = hf.decoder_parts(model)
        base = model.get_decoder()
        assert parts.layers is getattr(base, layers) and parts.final_norm is getattr(base, norm), model_type
        assert hf.attention_module(parts.layers[0]) is getattr(parts.layers[0], attn), model_type
        assert parts.embedding is model.get_input_embeddings()


def test_loader_accepts_the_matrix():
    """``tracer.load_model`` accepts exactly the families this matrix checks (plus SmolLM3)."""
    from tracer import models
    assert models.SUPPORTED_MODEL_TYPES == set(ATTENTION_FAMILIES) | {"smollm3"}


def test_hybrid_linear_attention_layers_refused_for_attention():
    """MiniMax mixes softmax and linear-attention layers: attention=True names the layers it cannot
    record and the ones it can; recording only those traces identically and fills every map."""
    model = make_family("minimax", {**GQA, "layer_types": ["full_attention", "linear_attention"]})
    with pytest.raises(NotSupportedError, match=r"layers \[1\] are linear_attention .* among \[0\]"):
        tracer.trace(model, record=RecordConfig(attention=True))
    inputs = _inputs()
    kw = {"do_sample": False, "max_new_tokens": 3, "pad_token_id": 0}
    ref = model.generate(**inputs, **kw)
    with tracer.trace(model, record=RecordConfig(attention=True, attention_layers=[0])) as t:
        out = model.generate(**inputs, **kw)
    assert torch.equal(out, ref)
    assert [t.trace.attention(s, 0).shape[0] for s in range(3)] == [2, 2, 2]


#: families whose logits are more than lm_head(final_norm(h)) (and plain ones beside them)
LENS_FAMILIES = {
    "llama": ("llama", ATTENTION_FAMILIES["llama"]),
    "gpt2": ("gpt2", ATTENTION_FAMILIES["gpt2"]),
    "cohere (logit_scale)": ("cohere", ATTENTION_FAMILIES["cohere"]),
    "cohere2 (logit_scale)": ("cohere2", ATTENTION_FAMILIES["cohere2"]),
    "granite (logits_scaling)": ("granite", {**GQA, "logits_scaling": 4.0}),
    "granitemoe (logits_scaling)": ("granitemoe", {**GQA, "logits_scaling": 4.0}),
    "gemma2 (softcap)": ("gemma2", {**ATTENTION_FAMILIES["gemma2"], "final_logit_softcapping": 0.5}),
    "gemma3_text (softcap)": ("gemma3_text", {**ATTENTION_FAMILIES["gemma3_text"], "final_logit_softcapping": 0.5}),
    "vaultgemma (softcap)": ("vaultgemma", {**GQA, "final_logit_softcapping": 0.5}),
    "nanochat (softcap)": ("nanochat", {**GQA, "final_logit_softcapping": 0.5}),
    "opt (project_out)": ("opt", {"ffn_dim": 128, "word_embed_proj_dim": 32}),
}


@pytest.mark.parametrize("name", sorted(LENS_FAMILIES))
def test_logit_lens_at_the_last_layer_is_the_models_own_distribution(name):
    """The lens applies the family's own steps around lm_head (OPT's project_out, Cohere's and
    Granite's scaling, soft-capping): at the last layer its probability of the chosen token is
    the model's own, at every step."""
    model_type, overrides = LENS_FAMILIES[name]
    model = make_family(model_type, overrides)
    kw = dict(do_sample=False, max_new_tokens=3, pad_token_id=0, eos_token_id=None)
    ref = model.generate(**_inputs(), output_logits=True, return_dict_in_generate=True, **kw)
    with tracer.trace(model, record=RecordConfig(logit_lens=True)) as t:
        out = model.generate(**_inputs(), **kw)
    assert torch.equal(out, ref.sequences)
    trace = t.trace
    assert trace.meta.status == "complete" and trace.num_steps == 3 and not trace.meta.notes
    for step, logits in zip(trace.steps, ref.logits):
        own = torch.softmax(logits.float(), -1).gather(1, torch.as_tensor(step.chosen).view(-1, 1))[:, 0]
        np.testing.assert_allclose(step.logit_lens.chosen_prob[-1], own.numpy(), rtol=1e-4, atol=1e-6)
        assert (step.logit_lens.chosen_rank[-1] == step.stages[0].chosen_rank).all()


def test_a_logit_transform_tracer_does_not_know_is_noted(monkeypatch):
    """Where the lens's last layer is not the model's own distribution (here: Cohere with the
    scaling left out), the trace says so instead of showing other probabilities as the model's."""
    from tracer import _hf_compat as hf

    monkeypatch.setattr(hf, "lens_head", lambda model: (None, None))
    model = make_family("cohere", ATTENTION_FAMILIES["cohere"])
    with tracer.trace(model, record=RecordConfig(logit_lens=True)) as t:
        model.generate(**_inputs(), do_sample=False, max_new_tokens=2, pad_token_id=0)
    assert any(n.startswith("the logit lens does not reproduce this model's own output") for n in t.trace.meta.notes)
