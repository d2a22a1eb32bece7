"""bitsandbytes 4-/8-bit loading with the seed script's settings (CPU from bitsandbytes 0.49, or CUDA)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
from typing import Any, Iterator

__all__ = ["BNB_MIN_VERSION", "HUB_KERNEL_MESSAGE", "check_quantization", "quantization_config",
           "quiet_hub_kernel_message", "quiet_int8_cast_message", "OnceFilter"]

#: What bitsandbytes (0.50, on a CPU with AVX512-bf16) logs when importing its CPU backend: it
#: tries to fetch an optional faster 4-bit kernel from the Hugging Face hub
#: (``kernels-community/quantization-bitsandbytes``, needs the ``kernels`` package and the
#: network) and, failing, uses its own CPU kernel.  Harmless, but it reads like a failure.
HUB_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
#: (logger, message) of that attempt: bitsandbytes' warning, and the ``kernels`` package's own
#: line when the hub is offline (``HF_HUB_OFFLINE=1``).
_HUB_KERNEL_RECORDS = (
    ("bitsandbytes.backends.cpu.ops", HUB_KERNEL_MESSAGE),
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"),
)

#: bitsandbytes runs 4-bit and 8-bit layers on CPU from this version on.
BNB_MIN_VERSION = (0, 49)


def check_quantization(load_in_4bit: bool, load_in_8bit: bool, device: Any) -> None:
    """Refuse a quantized load that cannot work, before anything is loaded (one-line errors)."""
    from .models import ModelLoadError, resolve_device

    if not (load_in_4bit or load_in_8bit):
        return
    if load_in_4bit and load_in_8bit:
        raise ModelLoadError("choose one of load_in_4bit and load_in_8bit, not both")
    flag = "load_in_4bit" if load_in_4bit else "load_in_8bit"
    kind = resolve_device(device).type
    if kind not in ("cpu", "cuda"):
        raise ModelLoadError(f"{flag} uses bitsandbytes, which runs on CPU or CUDA, not on {kind!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(f"{flag} needs bitsandbytes>=0.49: pip install 'tracer[quant]'")
    version = importlib.metadata.version("bitsandbytes")
    parts = tuple(int(p) if p.isdigit() else 0 for p in version.split(".")[:2])
    if parts < BNB_MIN_VERSION:
        raise ModelLoadError(f"{flag} needs bitsandbytes>=0.49 (4-/8-bit on CPU); bitsandbytes {version} is installed")


class OnceFilter:
    """Logging filter: let a message through the first time only."""

    def __init__(self, fragment: str):
        self.fragment = fragment
        self.seen = False

    def filter(self, record: Any) -> bool:
        if self.fragment not in record.getMessage():
            return True
        shown, self.seen = self.seen, True
        return not shown


class _DropFilter(logging.Filter):
    """Drop the records whose message contains ``fragment`` (counted in ``dropped``)."""

    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.fragment in record.getMessage():
            self.dropped += 1
            return False
        return True


@contextlib.contextmanager
def quiet_hub_kernel_message() -> Iterator[_DropFilter]:
    """While a quantized model loads, drop bitsandbytes' :data:`HUB_KERNEL_MESSAGE` record (those
    records of those loggers only; everything else they log still shows).  bitsandbytes is
    imported inside, so the record, logged once at import, falls within."""
    drops = [(logging.getLogger(name), _DropFilter(fragment)) for name, fragment in _HUB_KERNEL_RECORDS]
    for log, drop in drops:
        log.addFilter(drop)
    try:
        with contextlib.suppress(ImportError):
            import bitsandbytes  # noqa: F401
        yield drops[0][1]
    finally:
        for log, drop in drops:
            log.removeFilter(drop)


def quiet_int8_cast_message() -> None:
    """bitsandbytes' int8 matmul on CPU logs that it casts fp32 inputs to fp16 on every call
    (hundreds of lines per answer): show it once per process."""
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, OnceFilter) for f in log.filters):
        log.addFilter(OnceFilter("inputs will be cast from"))


def quantization_config(load_in_4bit: bool, torch_dtype: Any):
    """The seed script's settings: nf4 with double quantization, computing in the load dtype."""
    from transformers import BitsAndBytesConfig

    if load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch_dtype)
    quiet_int8_cast_message()
    return BitsAndBytesConfig(load_in_8bit=True)
