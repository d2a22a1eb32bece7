"""Reference traces: every value a trace holds, fingerprinted, for "nothing recorded changes".

``tests/data/reference_traces.json`` was written by this module with the recorder as it was
before the step-cost work (issue 19):

    PYTHONPATH=$PWD python tests/reference_traces.py --write [--slow]

Each scenario generates with the tracer and flattens the trace into ``{path: fingerprint}``:
arrays become ``dtype shape sha256(bytes)`` (bit-for-bit), scalars and strings their ``repr``.
Only what varies from run to run is left out (step and wall times, creation date, versions,
the model's local path).  ``plain`` is the fingerprint of an untraced ``generate`` with
``output_logits``: where the model's own numbers differ (another CPU, another torch), the
reference does not apply and the test skips with that reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
DATA = HERE / "data" / "reference_traces.json"
SKIP_KEYS = {"time_s", "wall_time_s", "created", "versions", "backend_info", "_name_or_path", "transformers_version"}


def fingerprint(value: Any) -> str:
    a = np.ascontiguousarray(np.asarray(value))
    return f"{a.dtype} {a.shape} {hashlib.sha256(a.tobytes()).hexdigest()[:24]}"


def flatten(trace: Any) -> dict[str, str]:
    out: dict[str, str] = {}

    def walk(x: Any, path: str) -> None:
        if isinstance(x, np.ndarray):
            out[path] = fingerprint(x)
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            out[path + ".__class__"] = type(x).__name__
            for f in dataclasses.fields(x):
                if f.name not in SKIP_KEYS and f.name != "blobs":
                    walk(getattr(x, f.name), f"{path}.{f.name}")
        elif isinstance(x, dict):
            out[path + ".__keys__"] = repr(sorted(map(str, x)))
            for k, v in x.items():
                if k not in SKIP_KEYS:
                    walk(v, f"{path}[{k!r}]")
        elif isinstance(x, (list, tuple)):
            out[path + ".__len__"] = repr(len(x))
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")
        else:
            out[path] = repr(x)

    walk(trace, "trace")
    blobs = trace.blobs
    out["blobs.__keys__"] = repr(sorted(blobs.keys()))
    for key in sorted(blobs.keys()):
        out[f"blobs[{key}]"] = fingerprint(blobs.get(key))
    return out


# ----------------------------------------------------------------------------------------
# Scenarios: (model factory name, inputs, generate kwargs, RecordConfig kwargs, seed)
# ----------------------------------------------------------------------------------------


def _tiny():
    from conftest import make_tiny_llama

    return make_tiny_llama(), None


def _sliding():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                           max_position_embeddings=256)
    torch.manual_seed(0)
    return MistralForCausalLM(config).eval(), None


def _hybrid():
    """Full-attention and sliding-window layers in one model (two kinds of cache layer)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                         max_window_layers=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval(), None


def _embedded():
    from tracer.models import load_model

    return load_model()


def _tiny_inputs(batch=1, seq=6, left_pad=0):
    from conftest import make_inputs

    return make_inputs(batch=batch, seq=seq, left_pad=left_pad)


def _chat(tokenizer, prompts):
    from tracer.hooks import encode_prompts

    return encode_prompts(tokenizer, prompts, chat=True)[1]


SAMPLING = dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.1)
EVERYTHING = dict(modules=True, logit_lens=True, attention=True, hidden_layers=[0, -1], kv_layers=[-1],
                  kv_steps=[0, 3], full_logits=True)

#: name -> (model, inputs(tokenizer), generate kwargs, record kwargs, seed, slow)
SCENARIOS: dict[str, tuple] = {
    "tiny_greedy_light": ("tiny", lambda t: _tiny_inputs(2, 6, 2), dict(max_new_tokens=8), {}, None, False),
    "tiny_sampling_light": ("tiny", lambda t: _tiny_inputs(2, 5, 1),
                            dict(max_new_tokens=8, min_new_tokens=4, **SAMPLING), {}, 3, False),
    "tiny_greedy_everything": ("tiny", lambda t: _tiny_inputs(2, 6, 2), dict(max_new_tokens=6), EVERYTHING, None,
                               False),
    "tiny_static_attention": ("tiny", lambda t: _tiny_inputs(1, 5), dict(max_new_tokens=6, cache_implementation="static"),
                              dict(attention=True, modules=True), None, False),
    "tiny_sampling_stats_only": ("tiny", lambda t: _tiny_inputs(1, 5), dict(max_new_tokens=6, **SAMPLING),
                                 dict(attention=True, attention_maps=False, logit_lens=True), 5, False),
    "sliding_dynamic": ("sliding", lambda t: {"input_ids": torch.arange(3, 9)[None]}, dict(max_new_tokens=6, min_new_tokens=6),
                        {}, None, False),
    "sliding_static": ("sliding", lambda t: {"input_ids": torch.arange(3, 9)[None]},
                       dict(max_new_tokens=6, min_new_tokens=6, cache_implementation="static"), dict(attention=True),
                       None, False),
    "hybrid_dynamic": ("hybrid", lambda t: {"input_ids": torch.arange(3, 9)[None]},
                       dict(max_new_tokens=6, min_new_tokens=6), dict(modules=True), None, False),
    "hybrid_static": ("hybrid", lambda t: {"input_ids": torch.arange(3, 9)[None]},
                      dict(max_new_tokens=6, min_new_tokens=6, cache_implementation="static"), {}, None, False),
    "embedded_greedy_light": ("embedded", lambda t: _chat(t, ["What is the capital of France?", "Hi"]),
                              dict(max_new_tokens=10), {}, None, True),
    "embedded_sampling_light": ("embedded", lambda t: _chat(t, ["Write one sentence about the sea."]),
                                dict(max_new_tokens=10, **SAMPLING), {}, 7, True),
    "embedded_greedy_everything": ("embedded", lambda t: _chat(t, ["Hi"]), dict(max_new_tokens=5), EVERYTHING,
                                   None, True),
}

_MODELS: dict[str, Callable] = {"tiny": _tiny, "sliding": _sliding, "hybrid": _hybrid, "embedded": _embedded}


def run_scenario(name: str, models: dict[str, Any]) -> dict[str, Any]:
    """{"plain": fingerprint of untraced sequences + logits, "trace": flattened trace}."""
    import tracer
    from tracer import RecordConfig

    kind, make_inputs, gen, rec, seed, _ = SCENARIOS[name]
    if kind not in models:
        models[kind] = _MODELS[kind]()
    model, tok = models[kind]
    inputs = make_inputs(tok)
    gen = {"pad_token_id": tok.pad_token_id if tok is not None else 0, **gen}
    if seed is not None:
        torch.manual_seed(seed)
    plain = model.generate(**inputs, **gen, output_logits=True, return_dict_in_generate=True)
    plain_fp = fingerprint(plain.sequences.numpy()) + " " + fingerprint(torch.stack(plain.logits).numpy())
    if seed is not None:
        torch.manual_seed(seed)
    with tracer.trace(model, tok, record=RecordConfig(**rec)) as session:
        out = model.generate(**inputs, **gen)
    assert torch.equal(out, plain.sequences), f"{name}: traced output differs from untraced"
    return {"plain": plain_fp, "trace": flatten(session.trace)}


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    slow = "--slow" in argv
    models: dict[str, Any] = {}
    data = json.loads(DATA.read_text()) if DATA.exists() else {}
    for name, spec in SCENARIOS.items():
        if spec[-1] and not slow:
            continue
        data[name] = run_scenario(name, models)
        print(name, len(data[name]["trace"]), "values")
    if "--write" in argv:
        DATA.parent.mkdir(parents=True, exist_ok=True)
        DATA.write_text(json.dumps(data, indent=0, sort_keys=True) + "\n")
        print("wrote", DATA, DATA.stat().st_size, "bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
