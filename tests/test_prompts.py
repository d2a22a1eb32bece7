"""One prompt builder for both engines (``tracer.prompts``): the ids ``tracer run`` feeds
``generate`` and the ids ``--use-vllm`` sends vLLM are the same for every prompt-shaping flag,
and ``--preset seed`` gives each engine the seed's own settings.

The vLLM side is checked here without vLLM through :func:`prompt_requests` and
:func:`generation_config` (what ``llm.generate``/``SamplingParams`` receive);
``tests/vllm_backend/test_vllm_prompts.py`` checks the real engine in ``.venv-vllm``."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tracer
from tracer.backends.vllm_cli import generation_config as vllm_generation_config
from tracer.backends.vllm_cli import prompt_requests
from tracer.cli import SEED_SYSTEM_PROMPT, CliError, build_parser, main
from tracer.cli.common import DEFAULT_PROMPTS, SEED_STOP_STRINGS
from tracer.cli.run import Runner, _validate
from tracer.prompts import build_prompt, chat_messages

#: Every prompt-shaping flag set the CLI has (with and without the template, system, preset).
FLAG_SETS = [
    (),
    ("--with-prompt",),
    ("--with-prompt", "--system", "Always answer in French."),
    ("--preset", "seed"),
    ("--preset", "seed", "--with-prompt"),
    ("--preset", "seed", "--with-prompt", "--system", "Réponds en français. 用中文回答。"),
]


def _args(*argv: str):
    args = build_parser().parse_args(["run", *argv])
    prompts = list(_validate(args))
    return args, prompts


def _hf_ids(model, tokenizer, argv) -> list[list[int]]:
    """What ``tracer run`` (the generate path) feeds ``generate``, prompt by prompt."""
    args, prompts = _args(*argv)
    runner = Runner.__new__(Runner)  # the loaded model, without loading: prepare needs only these
    runner.args, runner.model, runner.tokenizer = args, model, tokenizer
    runner.settings = tracer.cli.run.generation_settings(args)
    out = []
    for prompt in prompts:
        _, inputs, _ = runner.prepare(prompt, chat=args.with_prompt, system=args.system)
        out.append(inputs["input_ids"][0][inputs["attention_mask"][0].bool()].tolist())
    return out


def _vllm_ids(tokenizer, argv) -> list[list[int]]:
    args, prompts = _args(*argv, "--use-vllm")
    return [r["prompt_token_ids"] for r in prompt_requests(tokenizer, prompts, args)]


@pytest.mark.parametrize("argv", FLAG_SETS, ids=lambda a: " ".join(a) or "plain")
def test_both_engines_get_the_same_prompt_ids(argv, tiny_model, llama3_tokenizer):
    hf = _hf_ids(tiny_model, llama3_tokenizer, argv)
    assert hf == _vllm_ids(llama3_tokenizer, argv)
    bos = llama3_tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    assert all(ids[0] == bos and ids[1] != bos for ids in hf)  # one <|begin_of_text|>, never two
    text = llama3_tokenizer.decode(hf[0])
    chat = "--with-prompt" in argv
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") == chat
    system = argv[argv.index("--system") + 1] if "--system" in argv else (SEED_SYSTEM_PROMPT if "seed" in argv else None)
    if chat and system:
        assert f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>" in text
    assert text.count(DEFAULT_PROMPTS[0]) == 1


def test_the_system_prompt_reaches_vllm(llama3_tokenizer):
    """The bug of issue 23: the vLLM path built the chat with the user's message only."""
    args, prompts = _args("--use-vllm", "--with-prompt", "--system", "Always answer in French.")
    (request, *_) = prompt_requests(llama3_tokenizer, prompts, args)
    assert "Always answer in French." in request["prompt"]
    assert llama3_tokenizer.decode(request["prompt_token_ids"]) == request["prompt"]


def test_build_prompt_rules(llama3_tokenizer):
    tok = llama3_tokenizer
    plain = build_prompt(tok, "Hi", chat=False)
    assert plain.text == "Hi" and plain.ids == tuple(tok("Hi")["input_ids"])
    chat = build_prompt(tok, "Hi", chat=True, system="S")
    assert chat.ids == tuple(tok.apply_chat_template(chat_messages("Hi", "S"), add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"])
    assert chat.vllm() == {"prompt_token_ids": list(chat.ids), "prompt": chat.text}
    # a message list keeps its own system message
    own = build_prompt(tok, [{"role": "system", "content": "Mine"}, {"role": "user", "content": "Hi"}], chat=True, system="S")
    assert "Mine" in own.text and "S<|eot_id|>" not in own.text
    with pytest.raises(ValueError, match="system prompt needs the chat template"):
        build_prompt(tok, "Hi", chat=False, system="S")


def test_encode_prompts_pads_left_with_the_builders_ids(llama3_tokenizer):
    texts, enc = tracer.encode_prompts(llama3_tokenizer, ["Hi", "A longer question here?"], chat=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    for row, prompt in enumerate(["Hi", "A longer question here?"]):
        assert ids[row][mask[row].bool()].tolist() == list(build_prompt(llama3_tokenizer, prompt, chat=True).ids)
    assert mask[0, 0] == 0 and mask[1].all()  # the shorter prompt is padded on the left


# ------------------------------------------------------------------------------------------
# --preset seed: each engine the seed's own settings
# ------------------------------------------------------------------------------------------


def test_preset_seed_gives_vllm_the_seeds_vllm_settings(llama3_tokenizer):
    args, _ = _args("--preset", "seed", "--use-vllm", "--with-prompt")
    config = vllm_generation_config(args, llama3_tokenizer)
    eot = llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert config == {"max_tokens": 400, "temperature": 0.2, "top_k": 40, "top_p": 0.9, "presence_penalty": 1.0,
                      "seed": 0, "stop_token_ids": [llama3_tokenizer.eos_token_id, eot],
                      "stop": list(SEED_STOP_STRINGS)}


def test_preset_seed_gives_generate_the_seeds_generation_config():
    args, _ = _args("--preset", "seed")
    assert tracer.cli.run.generation_settings(args) == {
        "max_new_tokens": 400, "do_sample": True, "temperature": 0.2, "top_k": 40, "top_p": 0.9,
        "repetition_penalty": 1.1}
    assert args.presence_penalty is None


def test_explicit_penalties_win_over_the_preset_on_vllm(llama3_tokenizer):
    args, _ = _args("--preset", "seed", "--use-vllm", "--repetition-penalty", "1.1", "--presence-penalty", "0")
    config = vllm_generation_config(args, llama3_tokenizer)
    assert (config["repetition_penalty"], config["presence_penalty"]) == (1.1, 0.0)


def test_presence_penalty_on_generate_is_refused_before_the_model_loads(capsys):
    assert main(["run", "--presence-penalty", "1.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("tracer: error: --presence-penalty is a vLLM option")
    with pytest.raises(CliError, match=r"must be in \[-2, 2\]"):
        _args("--use-vllm", "--presence-penalty", "3")


# ------------------------------------------------------------------------------------------
# The real CLI on the embedded model: the recorded prompt ids
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [FLAG_SETS[2], FLAG_SETS[4]], ids=["system", "preset-seed"])
def test_recorded_prompt_ids_equal_the_vllm_request(argv, embedded, monkeypatch, tmp_path):
    import tracer.models

    monkeypatch.setattr(tracer.models, "load_model", lambda *a, **k: embedded)
    out = tmp_path / "run"
    assert main(["run", *argv, "--max-new-tokens", "2", "--data-file", str(_one_prompt(tmp_path)),
                 "--trace-dir", str(out), "--predictions-file", str(out / "p.json")]) == 0
    trace = tracer.load_trace(out / "prompt_000.trace")
    (request,) = prompt_requests(embedded[1], ["为什么要减少污染，保护环境？"], _args(*argv, "--use-vllm")[0])
    np.testing.assert_array_equal(trace.prompt_tokens(0), request["prompt_token_ids"])
    assert trace.prompts[0] == request["prompt"]
    config = json.loads((out / "generation_config.json").read_text(encoding="utf-8"))
    if "seed" in argv:  # what generate got, as the seed's save_pretrained writes it
        assert {k: config[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens",
                                       "do_sample")} == {"temperature": 0.2, "top_k": 40, "top_p": 0.9,
                                                          "repetition_penalty": 1.1, "max_new_tokens": 2,
                                                          "do_sample": True}
    assert json.loads((out / "p.json").read_text(encoding="utf-8"))[0].keys() == {"Input", "Output"}


def _one_prompt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("为什么要减少污染，保护环境？\n", encoding="utf-8")
    return path
