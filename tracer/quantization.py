"""bitsandbytes 4-/8-bit loading with the seed script's settings (CPU from bitsandbytes 0.49, or CUDA)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Any

__all__ = ["BNB_MIN_VERSION", "check_quantization", "quantization_config", "quiet_int8_cast_message", "OnceFilter"]

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


def quiet_int8_cast_message() -> None:
    """bitsandbytes' int8 matmul on CPU logs that it casts fp32 inputs to fp16 on every call
    (hundreds of lines per answer): show it once per process."""
    import logging

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
