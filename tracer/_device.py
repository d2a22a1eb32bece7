"""Device helpers shared by the recorder and the attention recorder (torch only)."""

from __future__ import annotations

import torch


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of ``t``; from CUDA into pinned memory without blocking (read after a sync)."""
    if t.device.type == "cpu":
        return t.clone()
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.device.type == "cuda")
    out.copy_(t, non_blocking=True)
    return out


def sync(device: torch.device) -> None:
    """Wait for the device (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
