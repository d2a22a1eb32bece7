"""MoE routing records: the experts and weights each token got, checked against the router
computed by hand from the hidden states the MoE block received (tiny random Mixtral,
Qwen3-MoE, gpt-oss, OLMoE); traced output identical to untraced; saved and loaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tracer
from tracer import RecordConfig
from tracer import routing as rt
from tracer.errors import NotSupportedError

from test_families import ATTENTION_FAMILIES, _inputs, make_family

MOE = {"mixtral": "softmax_renorm", "qwen3_moe": "softmax", "gpt_oss": "topk_softmax", "olmoe": "softmax"}


def _by_hand(kind: str, gate: torch.nn.Module, hidden: torch.Tensor, k: int, norm: bool):
    """(experts, weights) of the router, from its weights and the block's input."""
    h = hidden.reshape(-1, hidden.shape[-1]).float()
    gate_w = gate.weight.detach()
    logits = torch.nn.functional.linear(h, gate_w.float(), None if getattr(gate, "bias", None) is None
                                        else gate.bias.detach().float())
    if kind == "topk_softmax":  # gpt-oss: top-k of the logits, softmax over those
        top, idx = torch.topk(logits, k, dim=-1)
        return idx, torch.softmax(top, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    top, idx = torch.topk(probs, k, dim=-1)
    if kind == "softmax_renorm" or norm:
        top = top / top.sum(-1, keepdim=True)
    return idx, top


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_routing_matches_the_router_by_hand(model_type, tmp_path):
    model = make_family(model_type, ATTENTION_FAMILIES[model_type], impl="eager")
    inputs = _inputs()
    kw = {"do_sample": False, "max_new_tokens": 4, "pad_token_id": 0, "eos_token_id": None}
    ref = model.generate(**inputs, **kw)
    layers = model.get_decoder().layers
    blocks = [getattr(layer, "block_sparse_moe", None) or layer.mlp for layer in layers]
    gates = [getattr(b, "gate", None) if hasattr(b, "gate") else b.router for b in blocks]
    seen: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach().clone()))
               for i, b in enumerate(blocks)]
    try:
        with tracer.trace(model, record=RecordConfig(routing=True)) as t:
            out = model.generate(**inputs, **kw)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(out, ref)
    trace = t.trace
    assert rt.routing_layers(trace) == [0, 1]
    k = model.config.num_experts_per_tok
    norm = bool(getattr(model.config, "norm_topk_prob", False))
    for step in range(trace.num_steps):
        for layer in (0, 1):
            experts, weights = rt.routing(trace, step, layer)
            q = 6 if step == 0 else 1
            assert experts.shape == weights.shape == (2, q, k)
            idx, w = _by_hand(MOE[model_type], gates[layer], seen[layer][step], k, norm)
            np.testing.assert_array_equal(np.sort(experts.reshape(-1, k), -1), np.sort(idx.numpy(), -1))
            order_mine = np.argsort(experts.reshape(-1, k), -1)
            order_want = np.argsort(idx.numpy(), -1)
            np.testing.assert_allclose(np.take_along_axis(weights.reshape(-1, k), order_mine, -1),
                                       np.take_along_axis(w.numpy(), order_want, -1), atol=1e-5)
    # saved and loaded: the same records
    path = trace.save(tmp_path / "moe.trace")
    back = tracer.load_trace(path)
    for step in range(trace.num_steps):
        a, b = rt.routing(trace, step, 1), rt.routing(back, step, 1)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    # summaries: 2 layers x (10 real tokens prompt+decoded per layer ... ) slots
    layers_, counts = rt.expert_load(back)
    real = int(trace.prompt_mask.sum()) + 2 * (trace.num_steps - 1)
    assert layers_ == [0, 1] and counts.shape[1] >= 2 and counts.sum(axis=1).tolist() == [real * k] * 2
    ls, ex, we = rt.token_layer_map(back, seq=1)
    assert ex.shape == (4 + trace.num_steps - 1, 2, k)  # 4 real prompt tokens then 3 fed tokens
    assert np.all(np.diff(we, axis=-1) <= 0)


def test_routing_refused_on_a_dense_model():
    model = make_family("llama", ATTENTION_FAMILIES["llama"])
    with pytest.raises(NotSupportedError, match="no mixture-of-experts router"):
        tracer.trace(model, record=RecordConfig(routing=True))


def test_routing_views(tmp_path):
    model = make_family("qwen3_moe", ATTENTION_FAMILIES["qwen3_moe"])
    with tracer.trace(model, record=RecordConfig(routing=True)) as t:
        model.generate(**_inputs(), do_sample=False, max_new_tokens=3, pad_token_id=0)
    trace = t.trace
    from tracer.viz.routing import expert_load_figure, routing_html, routing_tokens, token_layer_figure
    html = routing_html(trace, seq=1)
    layers, counts = rt.expert_load(trace)
    assert html.count("<tr>") == 1 + len(layers) + 1 + 4 + 2  # load header+rows, map header+tokens
    assert f"<td style='background:rgba(228,87,46,0.80)'>{int(counts[0].max())}</td>" in html
    assert len(routing_tokens(trace, 1)) == 6
    report = trace.to_html()
    assert "<h2>MoE routing</h2>" in report and "e3" in report
    assert len(expert_load_figure(trace).axes) == 2 and token_layer_figure(trace).axes
    # a dense trace has no routing section
    dense = make_family("llama", ATTENTION_FAMILIES["llama"])
    with tracer.trace(dense) as t2:
        dense.generate(**_inputs(), do_sample=False, max_new_tokens=2, pad_token_id=0)
    assert "MoE routing" not in t2.trace.to_html()


def test_routing_views_leave_out_what_a_finished_sequence_is_fed():
    """After a sequence stops (eos) the batch goes on and it is fed padding: those routings are
    not its tokens (as the prompt's padding is left out): k slots per real token."""
    from tracer.viz.routing import routing_tokens

    model = make_family("mixtral", ATTENTION_FAMILIES["mixtral"])
    inputs = _inputs()
    first = model.generate(**inputs, do_sample=False, max_new_tokens=2, pad_token_id=0)
    eos = int(first[0, inputs["input_ids"].shape[1] + 1])  # sequence 0 stops at step 1
    with tracer.trace(model, record=RecordConfig(routing=True)) as t:
        out = model.generate(**inputs, do_sample=False, max_new_tokens=5, pad_token_id=0, eos_token_id=eos)
    trace = t.trace
    assert trace.stop_reasons[0].startswith("eos") and trace.num_steps == 5
    k = model.config.num_experts_per_tok
    for seq in range(trace.batch_size):
        real = int(trace.prompt_mask[seq].sum()) + sum(1 for s in trace.steps[1:] if s.active[seq])
        layers, experts, _ = rt.token_layer_map(trace, seq)
        assert experts.shape[0] == real == len(routing_tokens(trace, seq))
        assert rt.expert_load(trace, seq=seq)[1].sum(axis=1).tolist() == [k * real] * len(layers)
    assert int(trace.prompt_mask[0].sum()) + 1 == rt.token_layer_map(trace, 0)[1].shape[0]  # the prompt, then step 1's input
    assert out.shape[0] == trace.batch_size

#: more MoE families (their own default expert counts): recorded == the router module's own
#: output recomputed afterwards from the inputs it received
MORE_MOE = ["qwen2_moe", "ernie4_5_moe", "phimoe", "glm4_moe", "afmoe", "flex_olmo", "minimax", "granitemoe",
            "granitemoeshared"]


@pytest.mark.parametrize("model_type", MORE_MOE)
def test_routing_other_moe_families(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    from test_families import BASE
    from tracer import _hf_compat as hf

    import transformers
    from packaging.version import Version

    if model_type.startswith("granitemoe") and Version(transformers.__version__) < Version("5.25"):
        pytest.skip("GraniteMoE's router returns another tuple before transformers 5.25 (seen on 5.19): "
                    "routing recording stops there with a TracerWarning, generation unchanged")
    config = AutoConfig.for_model(model_type, **{**BASE, "num_key_value_heads": 2,
                                                 **ATTENTION_FAMILIES.get(model_type, {})})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    routers = hf.router_modules(hf.decoder_parts(model).layers)
    assert routers, model_type
    inputs = _inputs()
    kw = {"do_sample": False, "max_new_tokens": 3, "pad_token_id": 0, "eos_token_id": None}
    ref = model.generate(**inputs, **kw)
    seen = {i: [] for i in routers}
    handles = [m.register_forward_pre_hook(
        lambda m, a, kw, i=i: seen[i].append(([x.detach().clone() for x in a], dict(kw))), with_kwargs=True)
        for i, m in routers.items()]
    try:
        with tracer.trace(model, record=RecordConfig(routing=True)) as t:
            out = model.generate(**inputs, **kw)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(out, ref), model_type
    trace = t.trace
    assert rt.routing_layers(trace) == sorted(routers)
    for layer, router in routers.items():
        for step in range(trace.num_steps):
            with torch.no_grad():
                args, kwargs = seen[layer][step]
                _, scores, idx = router(*args, **kwargs)
            e, w = rt.routing(trace, step, layer)
            k = idx.shape[-1]
            assert e.shape == (2, 6 if step == 0 else 1, k)
            np.testing.assert_array_equal(e.reshape(-1, k), idx.numpy())
            np.testing.assert_allclose(w.reshape(-1, k), scores.float().numpy(), atol=1e-6)


def test_routing_refused_where_the_router_is_not_the_top_k_triple():
    """JetMoE's gating returns grouped tokens, not (logits, scores, indices): not a router here."""
    model = make_family("jetmoe", {"num_key_value_heads": 2})
    with pytest.raises(NotSupportedError, match="no mixture-of-experts router"):
        tracer.trace(model, record=RecordConfig(routing=True))


def test_routing_stops_recording_not_generation_on_an_unknown_router_output(monkeypatch):
    """A router whose output is not the (logits, scores, indices) triple: recording stops with a
    TracerWarning naming the layer; the generation is unchanged."""
    from tracer import _hf_compat as hf
    from tracer.errors import TracerWarning

    model = make_family("mixtral", ATTENTION_FAMILIES["mixtral"])
    kw = {"do_sample": False, "max_new_tokens": 3, "pad_token_id": 0, "eos_token_id": None}
    ref = model.generate(**_inputs(), **kw)
    monkeypatch.setattr(hf, "router_output", lambda output: None)
    with pytest.warns(TracerWarning, match=r"recording stopped at step 0: RuntimeError: the router of layer 0"):
        with tracer.trace(model, record=RecordConfig(routing=True)) as t:
            out = model.generate(**_inputs(), **kw)
    assert torch.equal(out, ref)
    assert t.trace.meta.status != "complete" or t.trace.meta.notes


def test_show_has_a_routing_tab():
    pytest.importorskip("ipywidgets")
    from tracer.viz import show

    model = make_family("olmoe", ATTENTION_FAMILIES["olmoe"])
    with tracer.trace(model, record=RecordConfig(routing=True)) as t:
        model.generate(**_inputs(), do_sample=False, max_new_tokens=2, pad_token_id=0)
    tab = show(t.trace, seq=1)
    titles = [tab.get_title(i) for i in range(len(tab.children))]
    assert titles[-1] == "routing"
    box = tab.children[-1]
    assert len(box.children[0].children) == 2 and "<h" not in box.children[1].value[:3]
    assert "e0" in box.children[1].value


def test_routing_counts_in_the_memory_budget():
    """The estimate before generating includes the routing blobs (6 bytes x k per token and MoE layer)."""
    from tracer.errors import MemoryBudgetError
    from tracer.routing import routing_bytes

    model = make_family("mixtral", ATTENTION_FAMILIES["mixtral"])
    assert routing_bytes(2, 2, 2, 6, 4) == 2 * (6 + 3) * 2 * 2 * 6
    # without the cache every step re-routes the whole sequence: 6, 7, 8, 9 tokens
    assert routing_bytes(2, 2, 2, 6, 4, use_cache=False) == 2 * (6 + 7 + 8 + 9) * 2 * 2 * 6
    with tracer.trace(model, record=RecordConfig(routing=True, max_bytes=4096)) as t:
        with pytest.raises(MemoryBudgetError, match=r"routing 0\.\d MiB"):
            model.generate(**_inputs(), do_sample=False, max_new_tokens=200, pad_token_id=0)
    assert t.traces == []


def test_routing_blobs_of_the_wrong_shape_are_a_format_error(tmp_path):
    """A hand-edited trace file: the reader says what is wrong; the report notes it, never crashes."""
    from tracer.blobs import MemoryStore
    from tracer.errors import TraceFormatError

    model = make_family("mixtral", ATTENTION_FAMILIES["mixtral"])
    with tracer.trace(model, record=RecordConfig(routing=True)) as t:
        model.generate(**_inputs(), do_sample=False, max_new_tokens=2, pad_token_id=0)
    trace = t.trace
    data = {k: trace.blobs.get(k) for k in trace.blobs.keys()}
    data["router_weights/1/0"] = np.zeros((2, 1, 3), np.float32)
    trace.blobs = MemoryStore(data)
    with pytest.raises(TraceFormatError, match="router_experts/1/0"):
        rt.routing(trace, 1, 0)
    html = trace.to_html()
    assert "<h2>MoE routing</h2><p class='note'>not shown: " in html


def test_routing_recorded_without_the_cache_is_within_the_estimate():
    """use_cache=False: each step routes the whole sequence again; what is kept fits the estimate
    made before generating (a budget the estimate passes is not exceeded mid-run)."""
    model = make_family("mixtral", ATTENTION_FAMILIES["mixtral"])
    inputs = _inputs()
    n = 5
    with tracer.trace(model, record=RecordConfig(routing=True)) as t:
        model.generate(**inputs, do_sample=False, max_new_tokens=n, pad_token_id=0, eos_token_id=None, use_cache=False)
    trace = t.trace
    estimate = t.estimate_bytes(batch=2, prompt_len=inputs["input_ids"].shape[1], max_new_tokens=n, n_stages=1,
                                use_cache=False)["routing"]
    kept = 6 * sum(np.asarray(trace.blobs.get(key)).size for key in trace.blobs.keys()
                   if key.startswith(rt.EXPERTS + "/"))  # (int16 expert + float32 weight) per slot
    assert trace.num_steps == n and 0 < kept <= estimate
