"""Record attention probabilities while the model keeps its fast kernel.

A recording function is registered in transformers' ``AttentionInterface`` (and the original
implementation's mask builder in ``AttentionMaskInterface``, so padded batches get the very same
mask) under ``"tracer_<original>"``.  It calls the original implementation unchanged, so the
model output is the same, then — for the selected layers, heads and steps only — computes
``softmax(Q·Kᵀ·scaling + mask)`` in float32 from the post-RoPE query and the full cached keys it
received.  The registered function holds no reference to any recorder: it finds the active one
through a weak map from attention module to recorder, filled and emptied by ``tracer.trace``.
"""

from __future__ import annotations

import math
import sys
import weakref
from typing import Callable

import torch

from .records import NotSupportedError

_ACTIVE: "weakref.WeakKeyDictionary[torch.nn.Module, AttentionRecorder]" = weakref.WeakKeyDictionary()
PREFIX = "tracer_"


def _inner_function(name: str, module: torch.nn.Module) -> Callable:
    from transformers import AttentionInterface

    if name == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise NotSupportedError(
                f"{type(module).__name__} has no module-level eager_attention_forward; record attention with sdpa"
            )
        return fn
    registry = AttentionInterface()
    if name not in registry:
        raise NotSupportedError(f"attention implementation {name!r} is not in transformers' AttentionInterface")
    return registry[name]


def _make_recording_function(original: str) -> Callable:
    def recording_attention(module, query, key, value, attention_mask, *args, **kwargs):
        inner = _inner_function(original, module)
        output = inner(module, query, key, value, attention_mask, *args, **kwargs)
        recorder = _ACTIVE.get(module)
        if recorder is not None:
            recorder.observe(module, query, key, attention_mask, output, kwargs)
        return output

    recording_attention.__name__ = f"{PREFIX}{original}"
    return recording_attention


def install(model: torch.nn.Module, recorder: "AttentionRecorder") -> str:
    """Route the model's attention through the recording function; returns the original name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    original = model.config._attn_implementation
    if original.startswith(PREFIX):
        raise NotSupportedError("this model is already being traced (nested tracer.trace on one model)")
    name = f"{PREFIX}{original}"
    AttentionInterface.register(name, _make_recording_function(original))
    mask_fn = ALL_MASK_ATTENTION_FUNCTIONS[original] if original in ALL_MASK_ATTENTION_FUNCTIONS else None
    if mask_fn is not None:
        AttentionMaskInterface.register(name, mask_fn)
    for module in recorder.modules.values():
        _ACTIVE[module] = recorder
    model.set_attn_implementation(name)
    return original


def uninstall(model: torch.nn.Module, recorder: "AttentionRecorder", original: str) -> None:
    for module in list(recorder.modules.values()):
        _ACTIVE.pop(module, None)
    if model.config._attn_implementation != original:
        model.set_attn_implementation(original)


class AttentionRecorder:
    """Collects attention rows per (step, layer) for the selected layers/heads/steps."""

    def __init__(
        self,
        modules: dict[int, torch.nn.Module],
        *,
        heads: list[int],
        num_heads: int,
        num_kv_heads: int,
        store_maps: bool,
        dtype: torch.dtype,
        steps: set[int] | None,
    ):
        self.modules = modules  # layer index -> attention module
        self.heads = heads
        self.groups = max(num_heads // max(num_kv_heads, 1), 1)
        self.store_maps = store_maps
        self.dtype = dtype
        self.steps = steps
        self.step = -1  # set by the step recorder before each forward
        self.cache_len_before = 0
        self.enabled = True
        self.maps: dict[int, torch.Tensor] = {}  # layer -> (B, H_rec, Q, T) for the current step
        self.stats: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._head_index: dict[torch.device, torch.Tensor] = {}
        self._layer_of = {id(m): i for i, m in modules.items()}

    def begin_step(self, step: int, cache_len_before: int) -> None:
        self.step = step
        self.cache_len_before = cache_len_before
        self.maps = {}
        self.stats = {}

    def wanted(self) -> bool:
        return self.enabled and self.step >= 0 and (self.steps is None or self.step in self.steps)

    def observe(self, module, query, key, attention_mask, output, kwargs) -> None:
        if not self.wanted():
            return
        layer = self._layer_of.get(id(module))
        if layer is None:
            return
        with torch.no_grad():
            probs, allowed = self._probabilities(module, query, key, attention_mask, output, kwargs)
            last = probs[:, :, -1, :]
            first = allowed[:, :, -1, :].int().argmax(dim=-1)  # (B, 1|H): first attended key
            entropy = -(last * torch.log(last.clamp_min(1e-30))).sum(-1)
            sink = last.gather(-1, first.expand(last.shape[0], last.shape[1]).unsqueeze(-1)).squeeze(-1)
            self.stats[layer] = (entropy, sink, last.argmax(dim=-1))
            if self.store_maps:
                self.maps[layer] = _to_host(probs.to(self.dtype))

    def _probabilities(self, module, query, key, attention_mask, output, kwargs):
        b, _, q_len, _ = query.shape
        k_len = key.shape[-2]
        heads = self._heads(query.device)
        valid = min(k_len, self.cache_len_before + q_len)  # static caches are preallocated
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        allowed = _allowed(attention_mask, b, q_len, k_len, query.device)
        if weights is not None and weights.dim() == 4 and weights.shape[-1] == k_len:
            probs = weights.index_select(1, heads).float()
        else:
            scaling = kwargs.get("scaling")
            if scaling is None:
                scaling = getattr(module, "scaling", 1.0 / math.sqrt(query.shape[-1]))
            q = query.index_select(1, heads).float()
            k = key.index_select(1, torch.div(heads, self.groups, rounding_mode="floor")).float()
            scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
            softcap = kwargs.get("softcap")
            if softcap:
                scores = torch.tanh(scores / softcap) * softcap
            if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype != torch.bool:
                scores = scores + attention_mask[..., :k_len].float()
            scores = scores.masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
        probs = torch.nan_to_num(probs, nan=0.0) * allowed
        return probs[..., :valid], allowed[..., :valid]

    def _heads(self, device: torch.device) -> torch.Tensor:
        idx = self._head_index.get(device)
        if idx is None:
            idx = self._head_index[device] = torch.tensor(self.heads, device=device, dtype=torch.long)
        return idx


def _allowed(mask: torch.Tensor | None, b: int, q_len: int, k_len: int, device) -> torch.Tensor:
    """`(B, 1, Q, T)` bool: which keys each query may attend to, whatever form the mask has."""
    causal = (
        torch.arange(k_len, device=device)[None, :] <= (k_len - q_len + torch.arange(q_len, device=device))[:, None]
    )[None, None]
    if mask is None:
        return causal.expand(b, 1, q_len, k_len)
    if mask.dim() == 2:  # flash-style padding mask (B, T)
        return causal & mask[:, None, None, -k_len:].bool()
    m = mask[..., -q_len:, :k_len]
    if m.dtype == torch.bool:
        return m.expand(b, m.shape[1], q_len, k_len)
    return (m > torch.finfo(m.dtype).min / 2).expand(b, m.shape[1], q_len, k_len)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu":
        return t.clone()
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.device.type == "cuda")
    out.copy_(t, non_blocking=True)
    return out
