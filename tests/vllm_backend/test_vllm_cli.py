"""``run_vllm`` (what ``tracer run --use-vllm`` calls) on the shared engine (.venv-vllm only)."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest

pytest.importorskip("vllm")

from tracer import load_trace  # noqa: E402
from tracer.backends.vllm import backend_info  # noqa: E402
from tracer.backends.vllm_cli import run_vllm  # noqa: E402


def cli_args(tmp_path, **kw):
    base = dict(model=None, tokenizer=None, dtype="float32", device="auto", gpus=None, seed=0, max_new_tokens=24, do_sample=False,
                temperature=None, top_k=None, top_p=None, repetition_penalty=None, with_prompt=True,
                predictions_file=tmp_path / "out" / "p.json", trace_dir=tmp_path / "out" / "t", no_trace=False,
                record_attention=False, load_in_4bit=False, load_in_8bit=False, attn_implementation=None)
    base.update(kw)
    return Namespace(**base)


def test_run_vllm_writes_predictions_generation_config_and_traces(llm, tmp_path):
    args = cli_args(tmp_path)
    prompts = ["What is the capital of France?", "Name three colors of the rainbow."]
    results = run_vllm(args, prompts, llm=llm)
    assert [r["prompt"] for r in results] == prompts
    preds = json.loads((tmp_path / "out" / "p.json").read_text(encoding="utf-8"))
    assert preds == [{"Input": p, "Output": r["output"]} for p, r in zip(prompts, results)]
    assert "Paris" in results[0]["output"]
    config = json.loads((tmp_path / "out" / "generation_config.json").read_text(encoding="utf-8"))
    tok = llm.get_tokenizer()
    # the embedded tokenizer ends turns with <|im_end|> and has neither Llama-3 stop string
    assert config == {"max_tokens": 24, "temperature": 0.0, "seed": 0, "stop_token_ids": [tok.eos_token_id]}
    for i, r in enumerate(results):
        trace = load_trace(tmp_path / "out" / "t" / f"prompt_{i:03d}.trace")
        assert trace.generated_text[0].strip() == r["output"]
        assert str(trace.stop_reasons[0]) == r["stop_reason"] and trace.num_new_tokens[0] == r["new_tokens"]
        assert backend_info(trace)["sampling_params"]["stop_token_ids"] == [tok.eos_token_id]
        assert (tmp_path / "out" / "t" / f"prompt_{i:03d}.html").is_file()
        assert (tmp_path / "out" / "t" / f"prompt_{i:03d}.perfetto.json").is_file()  # as every engine writes
        assert r["time_s"] > 0
    # --no-trace: the same outputs, no traces
    plain = run_vllm(cli_args(tmp_path / "plain", no_trace=True, trace_dir=None), prompts, llm=llm)
    assert [r["output"] for r in plain] == [r["output"] for r in results]
    assert [r["stop_reason"] for r in plain] == [r["stop_reason"] for r in results]
