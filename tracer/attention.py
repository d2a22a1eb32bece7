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
import threading
import weakref
from typing import Callable

import torch

from . import _hf_compat as hf
from ._device import to_host
from .errors import NotSupportedError

_ACTIVE: "weakref.WeakKeyDictionary[torch.nn.Module, AttentionRecorder]" = weakref.WeakKeyDictionary()
PREFIX = "tracer_"


def _inner_function(name: str, module: torch.nn.Module) -> Callable:
    return hf.eager_attention_function(module) if name == "eager" else hf.registered_attention_function(name)


def _make_recording_function(original: str) -> Callable:
    inner_by_class: dict[type, Callable] = {}  # resolved once per attention class

    def recording_attention(module, query, key, value, attention_mask, *args, **kwargs):
        inner = inner_by_class.get(type(module))
        if inner is None:
            inner = inner_by_class[type(module)] = _inner_function(original, module)
        output = inner(module, query, key, value, attention_mask, *args, **kwargs)
        recorder = _ACTIVE.get(module)
        if recorder is not None and recorder.error is None:
            try:
                recorder.observe(module, query, key, attention_mask, output, kwargs)
            except Exception as exc:  # noqa: BLE001 - reported by the step recorder, never raised here
                recorder.error = exc
        return output

    recording_attention.__name__ = f"{PREFIX}{original}"
    return recording_attention


def install(model: torch.nn.Module, recorder: "AttentionRecorder") -> str:
    """Route the model's attention through the recording function; returns the original name."""
    original = hf.attn_implementation(model)
    if original.startswith(PREFIX):
        raise NotSupportedError("this model is already being traced (nested tracer.trace on one model)")
    name = f"{PREFIX}{original}"
    hf.register_attention(name, _make_recording_function(original), hf.mask_function(original))
    for module in recorder.modules.values():
        _ACTIVE[module] = recorder
    model.set_attn_implementation(name)
    if hf.attn_implementation(model) != name:  # transformers only warns when it cannot switch
        raise NotSupportedError(f"{type(model).__name__} cannot switch its attention implementation to {name!r}")
    return original


def uninstall(model: torch.nn.Module, recorder: "AttentionRecorder", original: str) -> None:
    for module in list(recorder.modules.values()):
        _ACTIVE.pop(module, None)
    if hf.attn_implementation(model) != original:
        model.set_attn_implementation(original)


class AttentionRecorder:
    """Collects attention rows per (step, layer) for the selected layers/heads/steps."""

    def __init__(
        self,
        modules: dict[int, torch.nn.Module],
        *,
        heads: list[int],
        num_heads: int,
        store_maps: bool,
        dtype: torch.dtype,
        steps: set[int] | None,
    ):
        self.modules = modules  # layer index -> attention module
        self.heads = heads
        self.store_maps = store_maps
        self.dtype = dtype
        self.steps = steps
        self.step = -1  # set by the step recorder before each forward
        self.cache_len_before = 0
        self.enabled = True
        self.maps: dict[int, torch.Tensor] = {}  # layer -> (B, H_rec, Q, T) for the current step
        self.stats: list[tuple] = []  # (layers, entropy, sink, argmax) per batch of layers computed together
        self._head_index: dict[torch.device, torch.Tensor] = {}
        self._layer_of = {id(m): i for i, m in modules.items()}
        self._pending: list[tuple] = []  # decode-step rows computed for all layers at once
        self.error: Exception | None = None  # a failure inside observe, reported by the recorder
        self._mask_key: tuple | None = None
        self._mask_value: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        self.thread: int | None = None  # only calls from this thread are observed (set per step)

    def reset(self) -> None:
        """Forget the generation: no step, no pending references to model tensors."""
        self.step = -1
        self.enabled = False
        self.maps, self.stats, self._pending = {}, [], []
        self._mask_key, self._mask_value = None, (None, None)

    def begin_step(self, step: int, cache_len_before: int) -> None:
        self.thread = threading.get_ident()
        self.enabled = True
        if step == 0:
            self.error = None
        self.step = step
        self.cache_len_before = cache_len_before
        self.maps = {}
        self.stats = []
        self._pending = []
        self._mask_key: tuple | None = None  # every layer of a step gets the same mask: build once
        self._mask_value: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def wanted(self) -> bool:
        return (self.enabled and self.step >= 0 and (self.steps is None or self.step in self.steps)
                and threading.get_ident() == self.thread)

    def observe(self, module, query, key, attention_mask, output, kwargs) -> None:
        if not self.wanted():
            return
        layer = self._layer_of.get(id(module))
        if layer is None:
            return
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if query.shape[2] == 1 and weights is None:
            # a decode step: keep references (the query is fresh, the keys are the cache's own
            # tensor, neither is written before the step ends) and compute every layer in one
            # batched pass in `collect` — 1 matmul/softmax per step instead of one per layer
            scaling = kwargs.get("scaling")
            if scaling is None:
                scaling = getattr(module, "scaling", 1.0 / math.sqrt(query.shape[-1]))
            self._pending.append((layer, query, key, attention_mask, float(scaling), kwargs.get("softcap")))
            return
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", 1.0 / math.sqrt(query.shape[-1]))
        if weights is not None and not (weights.dim() == 4 and weights.shape[-1] == key.shape[-2]):
            weights = None
        with torch.no_grad():
            probs, first = self._softmax(query.unsqueeze(0), key.unsqueeze(0), attention_mask, float(scaling),
                                         kwargs.get("softcap"), None if weights is None else weights.unsqueeze(0))
            self._keep([layer], probs, first)

    def collect(self) -> tuple[tuple | None, dict[int, torch.Tensor]]:
        """(stats, maps) of the step; computes the deferred decode rows first.  ``stats`` is
        ``(layers, entropy, sink, argmax)``, each tensor `(L, B, H)` in the order of ``layers``
        (ascending), or None when nothing was recorded; ``maps`` is per layer."""
        if self._pending:
            with torch.no_grad():
                self._flush()
        chunks, maps = sorted(self.stats, key=lambda c: c[0][0]), self.maps
        self.stats, self.maps = [], {}
        if not chunks:
            return None, maps
        layers = tuple(layer for c in chunks for layer in c[0])
        if len(chunks) == 1:
            return chunks[0], maps
        if list(layers) != sorted(layers):  # interleaved chunks: per layer, in order
            per = {layer: (c[1][i], c[2][i], c[3][i]) for c in chunks for i, layer in enumerate(c[0])}
            layers = tuple(sorted(per))
            return (layers, *[torch.stack([per[layer][j] for layer in layers]) for j in range(3)]), maps
        return (layers, *[torch.cat([c[j] for c in chunks]) for j in (1, 2, 3)]), maps

    def _flush(self) -> None:
        groups: dict[tuple, list[tuple]] = {}
        for item in self._pending:
            _, query, key, mask, scaling, softcap = item
            sig = (tuple(query.shape), tuple(key.shape), key.dtype, id(mask), scaling, softcap)
            groups.setdefault(sig, []).append(item)
        self._pending = []
        for items in groups.values():
            per_layer = items[0][2].numel() * 4 * 2  # fp32 keys + scores, roughly
            chunk = max(1, (64 * 2**20) // max(per_layer, 1))  # bound the temporary memory
            for start in range(0, len(items), chunk):
                part = items[start : start + chunk]
                self._batched([it[0] for it in part], torch.stack([it[1] for it in part]),
                              torch.stack([it[2] for it in part]), *part[0][3:])

    def _batched(self, layers, query, key, mask, scaling, softcap) -> None:
        """`query (L, B, H, Q, D)`, `key (L, B, KV, T, D)` of several layers at one step."""
        probs, first = self._softmax(query, key, mask, scaling, softcap, weights=None)
        self._keep(layers, probs, first)

    def _softmax(self, query, key, mask, scaling, softcap, weights):
        """`(L, B, H_rec, Q, T_valid)` probabilities (eager's own ``weights`` when given) and the
        first attended key of the last query row."""
        n, b, n_heads, q_len, dim = query.shape
        k_len = key.shape[-2]
        valid = min(k_len, self.cache_len_before + q_len)  # static caches are preallocated
        allowed, first = self._mask(mask, b, q_len, k_len, query.device)
        all_heads = len(self.heads) == n_heads
        if weights is not None:  # eager computed them already
            probs = (weights if all_heads else weights.index_select(2, self._heads(query.device))).float()
        else:
            n_kv = key.shape[2]
            if all_heads:  # GQA without repeat_kv: each KV head against its group of query heads
                q = query.float().reshape(n, b, n_kv, (n_heads // n_kv) * q_len, dim)
                scores = torch.matmul(q, key.float().transpose(-1, -2)).view(n, b, n_heads, q_len, k_len)
            else:
                heads = self._heads(query.device)
                q = query.index_select(2, heads).float()
                group = max(n_heads // n_kv, 1)  # from the tensors: keys may arrive already repeated
                k = key.index_select(2, torch.div(heads, group, rounding_mode="floor")).float()
                scores = torch.matmul(q, k.transpose(-1, -2))
            scores.mul_(scaling)
            if softcap:
                scores = torch.tanh(scores / softcap) * softcap
            if mask is not None and mask.dim() == 4 and mask.dtype != torch.bool:
                scores += mask[..., -q_len:, :k_len].float()
            if allowed is not None:
                scores.masked_fill_(~allowed, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
        if allowed is not None:  # exact zeros where masked; fully masked (padding) rows become 0
            probs = probs.masked_fill(~allowed, 0.0)
        if valid < k_len:
            probs = probs[..., :valid]
        return probs, first

    def _keep(self, layers: list[int], probs: torch.Tensor, first: torch.Tensor | None) -> None:
        """Statistics of the last query row and (optionally) the maps; `probs (L, B, H, Q, T)`."""
        last = probs[..., -1, :]
        entropy = torch.special.entr(last).sum(-1)
        if first is None:  # nothing masked: the first key is position 0
            sink = last[..., 0]
        else:
            sink = last.gather(-1, first.expand(last.shape[:-1]).unsqueeze(-1)).squeeze(-1)
        argmax = last.argmax(dim=-1)
        self.stats.append((tuple(layers), entropy, sink, argmax))  # `(L, B, H)` each
        if self.store_maps:
            maps = probs.to(self.dtype)  # our own tensor: no extra copy on the host
            maps = maps if maps.device.type == "cpu" else to_host(maps)
            trimmed = maps.shape[-1] < probs.shape[-1] or not maps.is_contiguous()
            for i, layer in enumerate(layers):
                # a trimmed (static cache) view would keep the full-width storage alive
                self.maps[layer] = maps[i].clone() if trimmed else maps[i]

    def _mask(self, attention_mask, b: int, q_len: int, k_len: int, device):
        """(allowed `(B, 1|H, Q, T)` bool or None when every key is allowed, first attended key
        of the last query row `(B, 1|H)` or None)."""
        key = (id(attention_mask), b, q_len, k_len)
        if key != self._mask_key:
            if attention_mask is None and q_len == 1:
                value = (None, None)  # decoding without padding: one row that sees every key
            else:
                allowed = _allowed(attention_mask, b, q_len, k_len, device)
                value = (allowed, allowed[:, :, -1, :].int().argmax(dim=-1))
            self._mask_key, self._mask_value = key, value
        return self._mask_value

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

