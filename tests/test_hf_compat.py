"""One test per private transformers touch (``tracer/_hf_compat.py``): each fails naming the
installed transformers version when an upgrade moves or renames what tracer relies on."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from transformers import GenerationConfig, GenerationMixin, LogitsProcessorList, StoppingCriteriaList

from tracer import _hf_compat as hf
from tracer.errors import NotSupportedError

from conftest import make_inputs, make_tiny_llama

V = transformers.__version__


def _need(cond: bool, what: str) -> None:
    if not cond:
        pytest.fail(f"transformers {V}: {what} moved or changed; update tracer/_hf_compat.py", pytrace=False)


def _params(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def test_get_logits_processor_signature():
    fn = getattr(GenerationMixin, hf.LOGITS_PROCESSOR_METHOD, None)
    _need(fn is not None, f"GenerationMixin.{hf.LOGITS_PROCESSOR_METHOD}")
    _need({"generation_config", "input_ids_seq_length", "model_kwargs"} <= _params(fn),
          f"{hf.LOGITS_PROCESSOR_METHOD}(generation_config, input_ids_seq_length, model_kwargs)")


def test_get_stopping_criteria_signature():
    fn = getattr(GenerationMixin, hf.STOPPING_CRITERIA_METHOD, None)
    _need(fn is not None, f"GenerationMixin.{hf.STOPPING_CRITERIA_METHOD}")
    _need("generation_config" in _params(fn), f"{hf.STOPPING_CRITERIA_METHOD}(generation_config, ...)")


def test_bind_reads_arguments_by_name_and_refuses_unknown_ones():
    model = make_tiny_llama()
    method = getattr(model, hf.LOGITS_PROCESSOR_METHOD)
    gc = GenerationConfig(do_sample=False)
    bound = hf.bind(method, (gc, 7), {"model_kwargs": {"a": 1}})
    _need(bound["generation_config"] is gc and bound["input_ids_seq_length"] == 7 and bound["model_kwargs"] == {"a": 1},
          "binding _get_logits_processor's arguments by name")
    with pytest.raises(NotSupportedError, match=f"transformers {V}"):
        hf.bind(method, (), {"no_such_argument": 1})


def test_auto_compile_check():
    fn = getattr(GenerationMixin, "_valid_auto_compile_criteria", None)
    _need(fn is not None and {"model_kwargs", "generation_config"} <= _params(fn),
          "GenerationMixin._valid_auto_compile_criteria(model_kwargs, generation_config)")
    model = make_tiny_llama()
    assert hf.auto_compiles(model, {}, GenerationConfig()) is False  # CPU, dynamic cache


def test_generation_modes():
    _need(hf.generation_mode_supported(GenerationConfig(do_sample=False)) is None, "GenerationMode.GREEDY_SEARCH")
    _need(hf.generation_mode_supported(GenerationConfig(do_sample=True)) is None, "GenerationMode.SAMPLE")
    _need(hf.generation_mode_supported(GenerationConfig(num_beams=2)) == "beam_search", "GenerationMode.BEAM_SEARCH")


def test_attn_implementation_attribute():
    model = make_tiny_llama()
    _need(hasattr(model.config, "_attn_implementation"), "PretrainedConfig._attn_implementation")
    assert hf.attn_implementation(model) == "sdpa"


def test_attention_registry_and_mask_functions():
    _need(callable(hf.registered_attention_function("sdpa")), "AttentionInterface()['sdpa']")
    _need(hf.mask_function("sdpa") is not None, "masking_utils.ALL_MASK_ATTENTION_FUNCTIONS['sdpa']")
    with pytest.raises(NotSupportedError, match="AttentionInterface"):
        hf.registered_attention_function("no-such-kernel")


def test_eager_attention_function_of_llama():
    model = make_tiny_llama()
    module = hf.attention_module(model.model.layers[0])
    _need(module is not None, "LlamaDecoderLayer.self_attn")
    fn = hf.eager_attention_function(module)
    _need({"module", "query", "key", "value", "attention_mask"} <= _params(fn),
          "modeling_llama.eager_attention_forward(module, query, key, value, attention_mask, ...)")


def test_recording_lists_call_each_processor_and_criterion():
    model = make_tiny_llama()
    seen, stops = [], []
    gc = GenerationConfig(do_sample=True, temperature=0.5, top_k=5, max_length=9)
    processors = getattr(model, hf.LOGITS_PROCESSOR_METHOD)(gc, 4)
    _need(isinstance(processors, LogitsProcessorList), "_get_logits_processor returns a LogitsProcessorList")
    wrapped = hf.make_processor_list(type(processors), lambda p, s: seen.append((p, s.clone())))(processors)
    ids, scores = torch.tensor([[3, 4, 5, 6]]), torch.randn(1, 256)
    out = wrapped(ids, scores.clone())
    _need(torch.equal(out, processors(ids, scores.clone())), "LogitsProcessorList.__call__ on one-element lists")
    assert [type(p).__name__ if p else None for p, _ in seen] == [None, "TemperatureLogitsWarper", "TopKLogitsWarper"]
    from transformers import MaxLengthCriteria

    criteria = StoppingCriteriaList([MaxLengthCriteria(max_length=9)])
    crit = hf.make_criteria_list(type(criteria), lambda i, d, f: stops.append((d.clone(), f)))(criteria)
    done = crit(torch.zeros(1, 9, dtype=torch.long), scores)
    _need(done.tolist() == [True] and stops[0][1][0][1].tolist() == [True], "MaxLengthCriteria at max_length")


def test_recording_criteria_list_adds_no_ops_and_normalises_results():
    """The wrapped stopping list runs the same tensor ops as the installed one (on a GPU each is a
    kernel launch per step) and gives the same ``is_done``; a criterion answering a plain bool is
    reported as a ``(batch,)`` bool tensor, as the list itself would make it."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import EosTokenCriteria, MaxLengthCriteria, StoppingCriteria

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    class Never(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return False

    ids, scores = torch.tensor([[3, 4, 5, 2], [3, 4, 5, 6]]), torch.randn(2, 256)
    criteria = StoppingCriteriaList([MaxLengthCriteria(max_length=9), EosTokenCriteria(eos_token_id=[2, 7])])
    stops = []
    crit = hf.make_criteria_list(type(criteria), lambda i, d, f: stops.append((d, f)))(criteria)
    with Count() as untraced:
        want = criteria(ids, scores)
    with Count() as traced:
        got = crit(ids, scores)
    assert torch.equal(got, want) and got.tolist() == [True, False]
    assert traced.ops == untraced.ops, (traced.ops, untraced.ops)
    fired = stops[0][1]
    assert [type(c).__name__ for c, _ in fired] == ["MaxLengthCriteria", "EosTokenCriteria"]
    assert [r.tolist() for _, r in fired] == [[False, False], [True, False]]
    crit = hf.make_criteria_list(type(criteria), lambda i, d, f: stops.append((d, f)))(StoppingCriteriaList([Never()]))
    assert crit(ids, scores).tolist() == [False, False]
    (_, never), = stops[-1][1]
    assert isinstance(never, torch.Tensor) and never.dtype == torch.bool and never.tolist() == [False, False]


def test_recording_criteria_list_keeps_each_steps_result_of_an_in_place_criterion():
    """The recorder reads the results after generation: a criterion that returns one tensor it
    updates in place must not have every step show its last value (found by review: a sticky
    criterion took the stop reason of another one)."""
    from transformers import StoppingCriteria

    class Sticky(StoppingCriteria):
        def __init__(self):
            self.done = torch.zeros(2, dtype=torch.bool)

        def __call__(self, input_ids, scores, **kwargs):
            self.done |= input_ids[:, -1] == 0
            return self.done

    stops = []
    crit = hf.make_criteria_list(StoppingCriteriaList, lambda i, d, f: stops.append(f))(StoppingCriteriaList([Sticky()]))
    scores = torch.randn(2, 8)
    crit(torch.tensor([[5, 1], [5, 2]]), scores)
    crit(torch.tensor([[5, 1, 0], [5, 2, 3]]), scores)
    assert [f[0][1].tolist() for f in stops] == [[False, False], [True, False]]


def test_decoder_parts_is_the_one_support_rule():
    from tracer import models

    model = make_tiny_llama()
    parts = hf.decoder_parts(model)
    _need(len(parts.layers) == 2 and parts.final_norm is model.model.norm, "model.get_decoder().layers / .norm")

    class NoLayers(torch.nn.Module):
        pass

    for check in (hf.decoder_parts, models._check_layers):
        with pytest.raises((NotSupportedError, models.ModelLoadError), match=r"NoLayers has no `model.model`"):
            check(NoLayers())


def test_traced_generate_runs_on_this_version():
    import tracer

    model = make_tiny_llama()
    inputs = make_inputs(batch=2, seq=5, left_pad=1)
    ref = model.generate(**inputs, do_sample=False, max_new_tokens=3, pad_token_id=0)
    with tracer.trace(model, record=tracer.RecordConfig(attention=True)) as t:
        out = model.generate(**inputs, do_sample=False, max_new_tokens=3, pad_token_id=0)
    _need(torch.equal(ref, out) and t.trace.num_steps == 3, "a traced greedy generate")


def test_beam_search_helpers():
    """``tracer.beam`` wraps these three ``_beam_search`` helpers and reads these arguments."""
    need = {
        "_get_top_k_continuations": {"accumulated_log_probs", "cur_len", "decoder_prompt_len", "num_beams",
                                     "batch_size", "do_sample"},
        "_get_running_beams_for_next_iteration": {"topk_log_probs", "next_token_hits_stopping_criteria", "num_beams"},
        "_update_finished_beams": {"beam_scores", "topk_log_probs", "is_early_stop_heuristic_unsatisfied",
                                   "is_sent_finished", "next_token_hits_stopping_criteria", "top_num_beam_mask",
                                   "num_beams", "cur_len", "decoder_prompt_len", "length_penalty", "early_stopping"},
    }
    _need(tuple(need) == hf.BEAM_METHODS, "the beam helpers tracer wraps")
    for name, params in need.items():
        fn = getattr(GenerationMixin, name, None)
        _need(fn is not None and params <= _params(fn), f"GenerationMixin.{name}({', '.join(sorted(params))})")
    src = inspect.getsource(GenerationMixin._beam_search)
    _need(all(f"self.{name}(" in src for name in need), "_beam_search calls the helpers through self")


def test_candidate_generator_factory():
    """``tracer.assisted`` wraps ``_get_candidate_generator`` and the generator's two methods."""
    from transformers.generation.candidate_generator import CandidateGenerator

    fn = getattr(GenerationMixin, hf.CANDIDATE_GENERATOR_METHOD, None)
    _need(fn is not None and "generation_config" in _params(fn), f"GenerationMixin.{hf.CANDIDATE_GENERATOR_METHOD}")
    def names(f):
        return list(inspect.signature(f).parameters)

    _need(names(CandidateGenerator.get_candidates)[:2] == ["self", "input_ids"], "CandidateGenerator.get_candidates")
    _need(names(CandidateGenerator.update_candidate_strategy) == ["self", "input_ids", "scores", "num_matches"],
          "CandidateGenerator.update_candidate_strategy(input_ids, scores, num_matches)")


def test_attention_interface_detection():
    """A family dispatching through ALL_ATTENTION_FUNCTIONS is seen as such; Bloom's is not."""
    from transformers import BloomConfig, BloomForCausalLM

    _need(hf.routes_attention_interface(hf.attention_module(make_tiny_llama().model.layers[0])),
          "modeling_llama.ALL_ATTENTION_FUNCTIONS")
    bloom = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    _need(not hf.routes_attention_interface(hf.attention_module(bloom.transformer.h[0])), "Bloom's own attention")


def test_generate_prepares_inputs_right_before_each_of_its_forwards():
    """tracer tells generate's own forward from a model call between its steps by the
    `prepare_inputs_for_generation` call generate makes right before each forward."""
    model = make_tiny_llama()
    events: list[str] = []
    original = getattr(model, hf.PREPARE_INPUTS_METHOD)

    def prepare(*args, **kwargs):
        events.append("prepare")
        callers.append(hf.called_by_generate())
        return original(*args, **kwargs)

    def wrapper(*args, **kwargs):  # (called_by_generate looks at a wrapper's caller)
        return prepare(*args, **kwargs)

    callers: list[bool] = []
    prepare.__wrapped__ = original
    setattr(model, hf.PREPARE_INPUTS_METHOD, prepare)
    handle = model.register_forward_pre_hook(lambda *a: events.append("forward"))
    try:
        model.generate(**make_inputs(batch=1, seq=5), do_sample=False, max_new_tokens=4, min_new_tokens=4,
                       pad_token_id=0)
    finally:
        handle.remove()
        del model.__dict__[hf.PREPARE_INPUTS_METHOD]
    _need(events == ["prepare", "forward"] * 4,
          f"generate calling {hf.PREPARE_INPUTS_METHOD} right before each of its forwards (saw {events})")
    _need(callers == [True] * 4, f"generate calling {hf.PREPARE_INPUTS_METHOD} from {hf.GENERATE_PACKAGE}* code")
    callers.clear()
    wrapper(torch.tensor([[1, 2]]))  # called from here (tests/), not transformers
    assert callers == [False]


def test_generate_positional_parameters():
    """hf.generate_argument reads generate's own parameters by position as well as by keyword."""
    import inspect

    from transformers import GenerationMixin

    names = [p.name for p in inspect.signature(GenerationMixin.generate).parameters.values()
             if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD][1:]  # (after self)
    _need(tuple(names[:len(hf.GENERATE_POSITIONAL)]) == hf.GENERATE_POSITIONAL,
          f"generate's parameters in the order {hf.GENERATE_POSITIONAL} (saw {names})")
