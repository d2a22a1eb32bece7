"""``tracer run --engine llama.cpp``: refusals and the missing extra before anything loads (fast),
then real runs on the embedded GGUF (slow; skipped without llama-cpp-python)."""

from __future__ import annotations

import importlib.util
import io
import json
import sys

import pytest

import tracer
from tracer.cli import main


def _fail_load(*a, **k):
    raise AssertionError("loaded a model before refusing")


@pytest.fixture
def no_load(monkeypatch):
    import tracer.backends.llamacpp_cli as lcli

    monkeypatch.setattr(lcli, "load", _fail_load)
    return lcli


@pytest.mark.parametrize("flags, says", [
    (["--load-in-4bit"], "--load-in-4bit"),
    (["--attn-implementation", "eager"], "--attn-implementation"),
    (["--dtype", "float16"], "--dtype"),
    (["--device", "cuda"], "--device"),
    (["--record-attention"], "--record-attention"),
    (["--use-vllm"], "--use-vllm"),
    (["--model", "x.gguf"], "--model"),
    (["--tokenizer", "llama-3"], "--tokenizer"),
])
def test_refused_flags_one_line(no_load, capsys, flags, says):
    assert main(["run", "--engine", "llama.cpp", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tracer: error: --engine llama.cpp cannot honour " + says)


def test_llama_default_seed_refused_when_sampling(no_load, capsys):
    """4294967295 is llama.cpp's "no seed": sampling would use a random seed, not the one given."""
    assert main(["run", "--engine", "llama.cpp", "--do-sample", "--seed", "4294967295"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tracer: error: --engine llama.cpp cannot honour --seed 4294967295: "
                                               "it is llama.cpp's LLAMA_DEFAULT_SEED")
    # greedy draws nothing, so that seed is harmless there: not refused for it (the run goes on to
    # load the model, or stops at a missing llama-cpp-python where it is not installed)
    main(["run", "--engine", "llama.cpp", "--seed", "4294967295", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert "--seed" not in err and ("loaded a model before refusing" in err or "needs llama-cpp-python" in err), err


@pytest.mark.parametrize("flags, says", [
    # --preset seed turns sampling on: that seed must be refused there too (it ran with a random seed)
    (["--preset", "seed", "--with-prompt", "--seed", "4294967295"], "--seed 4294967295: it is llama.cpp's"),
    # llama.cpp's top-k is an int32: 2**32 + 1 wrapped to 1 (greedy), recorded as asked
    (["--do-sample", "--top-k", str(2**32 + 1)], f"--top-k {2**32 + 1}: llama.cpp's top-k is a 32-bit integer"),
    (["--presence-penalty", "0.5"], "--presence-penalty (it runs generate's sampling chain"),
])
def test_sampling_llama_cpp_cannot_run_as_given_is_refused(no_load, capsys, flags, says):
    assert main(["run", "--engine", "llama.cpp", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tracer: error: --engine llama.cpp cannot honour " + says), err
    assert "--use-vllm)" not in err[0] or "without --engine llama.cpp" in err[0]


@pytest.mark.parametrize("engine", [[], ["--engine", "llama.cpp"]])
def test_a_temperature_float32_cannot_hold_is_refused(no_load, capsys, engine):
    """1e-40 divides the logits to infinity (generate: NaN probabilities late; llama.cpp: every
    pick one token), 1e-50 is 0 in float32 (llama.cpp: greedy, recorded as sampling)."""
    for value in ("1e-40", "1e-50"):
        assert main(["run", *engine, "--do-sample", "--temperature", value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tracer: error: --temperature must be at least 1e-30"), err


def test_missing_extra_one_line_before_loading(no_load, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    assert main(["run", "--engine", "llama.cpp", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'tracer[llamacpp]' (builds llama.cpp from source, ~6 min)" in err[0]
    assert err[0].startswith("tracer: error: --engine llama.cpp needs llama-cpp-python")


def test_gguf_checks(no_load, tmp_path, capsys):
    assert main(["run", "--gguf", str(tmp_path / "m.gguf")]) == 2
    assert "--gguf is for --engine llama.cpp" in capsys.readouterr().err
    assert main(["run", "--engine", "llama.cpp", "--gguf", str(tmp_path / "none.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a .gguf file" in err[0]


# ------------------------------------------------------------------------------------------
# Real runs (the embedded GGUF)
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_writes_traces_and_matches_create_completion(tmp_path, capsys):
    llama_cpp = pytest.importorskip("llama_cpp")
    from tracer.backends.llamacpp import default_gguf
    from tracer.backends.llamacpp_cli import prompt_ids
    from tracer.models import embedded_model_path

    data = tmp_path / "prompts.txt"
    data.write_text("What is the capital of France?\n", encoding="utf-8")
    preds = tmp_path / "out" / "predictions.json"
    code = main(["run", "--engine", "llama.cpp", "--with-prompt", "--max-new-tokens", "8", "--data-file", str(data),
                 "--trace-dir", str(tmp_path / "traces"), "--predictions-file", str(preds)])
    assert code == 0, capsys.readouterr().err
    [row] = json.loads(preds.read_text(encoding="utf-8"))
    config = json.loads((preds.parent / "generation_config.json").read_text(encoding="utf-8"))
    assert config["engine"] == "llama.cpp" and config["temperature"] == 0.0 and config["max_tokens"] == 8
    trace = tracer.load_trace(tmp_path / "traces" / "prompt_000.trace")
    assert trace.meta.backend == "llama.cpp" and trace.num_steps == 8
    assert (tmp_path / "traces" / "prompt_000.html").exists()
    # greedy with no penalty: the same text as untraced create_completion on the same ids
    tok = tracer.load_tokenizer(str(embedded_model_path()))
    _, ids = prompt_ids(tok, "What is the capital of France?", chat=True, system=None)
    assert trace.prompt_ids[0].tolist() == ids
    llm = llama_cpp.Llama(model_path=str(default_gguf()), n_ctx=1024, verbose=False)
    plain = llm.create_completion(ids, temperature=0.0, max_tokens=8)["choices"][0]["text"]
    llm.close()
    assert row["Output"] == plain.strip() == "L'Étoile, la Cit"  # 8 tokens end inside 'é'
    # --no-trace: the same loop without recording, the same answer
    plain_preds = tmp_path / "plain.json"
    assert main(["run", "--engine", "llama.cpp", "--with-prompt", "--max-new-tokens", "8", "--data-file", str(data),
                 "--no-trace", "--predictions-file", str(plain_preds)]) == 0
    assert json.loads(plain_preds.read_text(encoding="utf-8"))[0]["Output"] == row["Output"]


@pytest.mark.slow
def test_multi_turn_reuses_the_evaluated_prefix(tmp_path, monkeypatch, capsys):
    pytest.importorskip("llama_cpp")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi!\nWhat is 2+2?\n\n"))
    code = main(["run", "--engine", "llama.cpp", "--interactive", "--multi-turn", "--max-new-tokens", "16",
                 "--trace-dir", str(tmp_path)])
    out = capsys.readouterr()
    assert code == 0, out.err
    first = tracer.load_trace(tmp_path / "turn_000.trace")
    second = tracer.load_trace(tmp_path / "turn_001.trace")
    info = second.meta.backend_info
    # turn 1 keeps every evaluated token of turn 0 (its prompt and answer, <|im_end|> not yet fed)
    evaluated0 = first.prompt_len + first.num_steps - 1
    assert info["reused_tokens"] == evaluated0 == second.cache.reused_len
    assert second.prompt_ids[0, :evaluated0].tolist() == first.sequences[0, :evaluated0].tolist()
    assert info["evaluated_prompt_tokens"] == second.prompt_len - evaluated0
    assert second.steps[0].inputs.cache_len_before == evaluated0
    assert f"{evaluated0} of {second.prompt_len} prompt tokens reused" in out.err
    assert "Hello! How can I assist you today?" in out.out


@pytest.mark.slow
def test_compare_cli_between_the_engines(tmp_path, embedded, monkeypatch, capsys):
    pytest.importorskip("llama_cpp")
    import tracer.models

    monkeypatch.setattr(tracer.models, "load_model", lambda *a, **k: embedded)
    data = tmp_path / "prompts.txt"
    data.write_text("What is the capital of France?\n", encoding="utf-8")
    for engine in ("transformers", "llama.cpp"):
        assert main(["run", "--engine", engine, "--with-prompt", "--max-new-tokens", "4", "--data-file", str(data),
                     "--trace-dir", str(tmp_path / engine)]) == 0
    capsys.readouterr()
    a, b = (str(tmp_path / e / "prompt_000.trace") for e in ("transformers", "llama.cpp"))
    assert main(["compare", a, b]) == 0
    out = capsys.readouterr().out
    assert "[transformers, stage 0 (logits)]" in out and "[llama.cpp, stage 0 (logits)]" in out
    assert "sequence 0: first divergence at step 0" in out  # the near-tie: "The" vs "L"


@pytest.mark.slow
def test_model_name_terminators_and_seed_against_generate(tmp_path, embedded, monkeypatch, capsys):
    """The same flags on both engines: the same model name, the model's terminators among llama.cpp's
    (which says where it stops on more), and the seed the flags give in generation_config.json,
    the trace and its report, never llama.cpp's LLAMA_DEFAULT_SEED."""
    pytest.importorskip("llama_cpp")
    import re

    import tracer.models

    monkeypatch.setattr(tracer.models, "load_model", lambda *a, **k: embedded)
    data = tmp_path / "prompts.txt"
    data.write_text("Hi!\n", encoding="utf-8")
    traces = {}
    for engine in ("transformers", "llama.cpp"):
        out = tmp_path / engine
        assert main(["run", "--engine", engine, "--with-prompt", "--max-new-tokens", "3", "--seed", "7",
                     "--data-file", str(data), "--trace-dir", str(out),
                     "--predictions-file", str(out / "predictions.json")]) == 0, capsys.readouterr().err
        traces[engine] = tracer.load_trace(out / "prompt_000.trace")
    hf, lc = traces["transformers"], traces["llama.cpp"]
    assert hf.prompt_ids[0].tolist() == lc.prompt_ids[0].tolist()
    assert lc.meta.model_name == hf.meta.model_name == tracer.models.EMBEDDED_MODEL_NAME
    assert lc.meta.backend_info["gguf_name"] == "Smollm2 135M 8k Lc100K Mix1 Ep2"  # the GGUF's own name, kept
    assert hf.meta.terminators == {2: "<|im_end|>"}
    assert {k: v for k, v in lc.meta.terminators.items() if k in hf.meta.terminators} == hf.meta.terminators
    assert lc.meta.terminators == {0: "<|endoftext|>", 2: "<|im_end|>", 4: "<reponame>"}
    assert any(n.startswith("terminators: llama.cpp ends the run on every end-of-generation token") and
               "0 '<|endoftext|>', 2 '<|im_end|>', 4 '<reponame>'" in n for n in lc.meta.notes)
    html = (tmp_path / "llama.cpp" / "prompt_000.html").read_text(encoding="utf-8")
    rows = dict(re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", html))
    assert rows["model"] == f"{tracer.models.EMBEDDED_MODEL_NAME} (llama)"
    config = json.loads((tmp_path / "llama.cpp" / "generation_config.json").read_text(encoding="utf-8"))
    assert config["seed"] == 7 == lc.meta.generation_config["seed"] == lc.meta.backend_info["sampling"]["seed"]
    assert rows["seed"] == "7" and "4294967295" not in html and lc.meta.backend_info["llama_seed"] is None
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "llama.cpp" / "prompt_000.trace")]) == 0
    assert f"model: {tracer.models.EMBEDDED_MODEL_NAME}  (llama, Q4_1 on cpu" in capsys.readouterr().out


@pytest.mark.slow
def test_ctrl_c_names_the_partial_trace(tmp_path, monkeypatch, capsys):
    """As the transformers engine: the one line says where the interrupted prompt's trace is."""
    pytest.importorskip("llama_cpp")
    import tracer.backends.llamacpp as lc

    real, calls = lc.Sampler.sample, []

    def sample(self, raw):
        calls.append(1)
        if len(calls) == 3 + 3:  # the second prompt's third step
            raise KeyboardInterrupt
        return real(self, raw)

    monkeypatch.setattr(lc.Sampler, "sample", sample)
    data = tmp_path / "prompts.txt"
    data.write_text("What is the capital of France?\nName a colour.\n", encoding="utf-8")
    traces = tmp_path / "traces"
    code = main(["run", "--engine", "llama.cpp", "--with-prompt", "--max-new-tokens", "3", "--data-file", str(data),
                 "--trace-dir", str(traces), "--predictions-file", str(tmp_path / "p.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and len(err) == 1, err
    assert err[0].startswith("tracer: interrupted: 1 answer(s) finished, saved in"), err
    assert err[0].endswith(f"; the partial trace of prompt 1 is in {traces / 'prompt_001.trace'}"), err
    partial = tracer.load_trace(traces / "prompt_001.trace")
    assert partial.meta.status == "interrupted" and partial.num_steps == 2


@pytest.mark.slow
def test_progress_draws_a_bar_and_changes_nothing(tmp_path, capsys):
    """--progress on llama.cpp draws the per-token bar on stderr (it was accepted and did
    nothing); the answers are the same with and without it, traced or not."""
    pytest.importorskip("llama_cpp")
    data = tmp_path / "prompts.txt"
    data.write_text("What is the capital of France?\n", encoding="utf-8")
    outputs = {}
    for flags in (["--progress"], ["--no-progress"], ["--progress", "--no-trace"]):
        preds = tmp_path / f"{len(outputs)}.json"
        assert main(["run", "--engine", "llama.cpp", "--with-prompt", "--max-new-tokens", "5", "--data-file", str(data),
                     "--predictions-file", str(preds), *flags]) == 0
        err = capsys.readouterr().err
        assert ("prompt 0:" in err and "tok" in err) == ("--progress" in flags), err
        outputs[tuple(flags)] = json.loads(preds.read_text(encoding="utf-8"))[0]["Output"]
    assert len(set(outputs.values())) == 1, outputs
