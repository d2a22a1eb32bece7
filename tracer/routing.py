"""Mixture-of-experts routing: which experts each token went to, per layer, and with what weight.

``RecordConfig(routing=True)`` hooks the router module of every MoE decoder layer (found by
``tracer._hf_compat.router_modules``: ``mlp.gate`` of Mixtral/Qwen2-MoE/Qwen3-MoE/OLMoE,
``mlp.router`` of gpt-oss).  A forward hook reads the router's own output — the selected
experts and the weights the layer mixes them with — so nothing is recomputed and the model
output is untouched.  Per step and layer two blobs are kept (``blob_key("router_experts",
step, layer)`` int16 and ``blob_key("router_weights", step, layer)`` float32, each
`(B, Q, k)`: every token fed at the step, the prompt at step 0).

The readers and the two summaries below (expert load per layer, the token × layer map) are
pure functions of a :class:`~tracer.records.Trace`: views call them, never the hooks.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .blobs import blob_key, parse_blob_key
from .errors import TraceFormatError

__all__ = ["RoutingRecorder", "routing_layers", "routing", "expert_load", "token_layer_map", "routing_bytes"]

EXPERTS, WEIGHTS = "router_experts", "router_weights"


class RoutingRecorder:
    """Forward hooks on the routers of the MoE layers; keeps the current step's selections."""

    def __init__(self, modules: dict[int, Any], top_k: int):
        self.modules = modules  # layer index -> router module
        self.top_k = top_k
        self.enabled = False
        self.thread: int | None = None
        self.step = -1
        self.rows: dict[int, tuple[Any, Any]] = {}  # layer -> (indices, scores) tensors
        self.error: Exception | None = None

    def install(self) -> list[Any]:
        """Register the hooks; returns their handles (the session removes them)."""
        return [m.register_forward_hook(self._hook(i)) for i, m in self.modules.items()]

    def _hook(self, layer: int):
        import torch

        from . import _hf_compat as hf

        def hook(module, args, output):
            if not self.enabled or threading.get_ident() != self.thread or self.error is not None:
                return None
            try:
                read = hf.router_output(output)
                if read is None:
                    raise RuntimeError(f"the router of layer {layer} ({type(module).__name__}) returned "
                                       "something other than (logits, scores, indices)")
                indices, scores = read
                self.rows[layer] = (indices.detach().to("cpu", torch.int16), scores.detach().to("cpu", torch.float32))
            except Exception as exc:  # noqa: BLE001 - reported by the step recorder, never raised here
                self.error = exc
            return None

        return hook

    def begin_step(self, step: int) -> None:
        self.thread = threading.get_ident()
        self.enabled = True
        self.step = step
        self.rows = {}

    def collect(self, batch: int) -> dict[int, tuple[Any, Any]]:
        """layer -> (experts `(B, Q, k)` int16, weights `(B, Q, k)` float32) of the step."""
        if self.error is not None:
            raise self.error
        rows, self.rows = self.rows, {}
        out = {}
        for layer, (indices, scores) in rows.items():
            k = indices.shape[-1]
            out[layer] = (indices.reshape(batch, -1, k), scores.reshape(batch, -1, k))
        return out

    def reset(self) -> None:
        self.enabled = False
        self.step = -1
        self.rows = {}


def routing_bytes(n_layers: int, top_k: int, batch: int, prompt_len: int, max_new_tokens: int,
                  use_cache: bool = True) -> int:
    """Upper bound of the routing blobs of a generation (int16 experts + float32 weights): the
    prompt, then one token a step (without the cache every step re-feeds the whole sequence)."""
    if use_cache:
        tokens = batch * (prompt_len + max(max_new_tokens - 1, 0))
    else:
        tokens = batch * sum(prompt_len + s for s in range(max_new_tokens))
    return tokens * n_layers * top_k * 6


# ------------------------------------------------------------------------------------------
# Readers and summaries (pure functions of a Trace)
# ------------------------------------------------------------------------------------------


def routing_layers(trace: Any) -> list[int]:
    """The layers whose routing was recorded (empty: none)."""
    out = set()
    for key in trace.blobs.keys():
        kind, _, layer = parse_blob_key(key)
        if kind == EXPERTS and layer is not None:
            out.add(layer)
    return sorted(out)


def routing(trace: Any, step: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(experts `(B, Q, k)` int, weights `(B, Q, k)` float32) of the tokens fed at ``step``
    in ``layer`` (``Q`` = prompt length at step 0, then 1)."""
    experts = np.asarray(trace.blobs.get(blob_key(EXPERTS, step, layer)))
    weights = np.asarray(trace.blobs.get(blob_key(WEIGHTS, step, layer)))
    want_q = trace.prompt_ids.shape[1] if step == 0 else None
    if (experts.ndim != 3 or experts.shape != weights.shape or experts.shape[0] != trace.batch_size
            or (want_q is not None and experts.shape[1] not in (want_q, 1)) or experts.dtype.kind not in "iu"
            or weights.dtype.kind != "f" or (experts.size and experts.min() < 0)):
        raise TraceFormatError(
            f"{EXPERTS}/{step}/{layer} and {WEIGHTS}/{step}/{layer} have shapes {experts.shape} {experts.dtype} / "
            f"{weights.shape} {weights.dtype}, expected (batch {trace.batch_size}, tokens, k) integer / float")
    return experts.astype(np.int64), weights.astype(np.float32)


def _tokens(trace: Any, seq: int, layer: int, include_prompt: bool) -> tuple[np.ndarray, np.ndarray]:
    """(experts `(N, k)`, weights `(N, k)`) of one sequence's tokens in one layer, in order:
    the prompt's real tokens (padding left out) when asked, then each generated step's token while
    the sequence still generates (after it stops, the batch's other sequences go on and it is fed
    padding: not its tokens)."""
    ex, we = [], []
    for step in range(trace.num_steps):
        key = blob_key(EXPERTS, step, layer)
        if key not in trace.blobs:
            continue
        if step > 0 and not bool(trace.steps[step].active[seq]):
            break
        e, w = routing(trace, step, layer)
        if step == 0 and include_prompt:
            mask = getattr(trace, "prompt_mask", None)
            keep = np.ones(e.shape[1], bool)
            if mask is not None and np.asarray(mask).shape[-1] == e.shape[1]:
                keep = np.asarray(mask)[seq].astype(bool)
            ex.append(e[seq][keep])
            we.append(w[seq][keep])
        elif step > 0 or e.shape[1] == 1:
            ex.append(e[seq][-1:])
            we.append(w[seq][-1:])
    if not ex:
        return np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32)
    if len({e.shape[-1] for e in ex}) != 1:
        raise TraceFormatError(f"the routing blobs of layer {layer} disagree on k (experts per token)")
    return np.concatenate(ex), np.concatenate(we)


def expert_load(trace: Any, num_experts: int | None = None, *, seq: int | None = None,
                include_prompt: bool = True) -> tuple[list[int], np.ndarray]:
    """(layers, counts `(L, E)`): how many token slots each expert received per layer, over
    the sequences (``seq`` selects one) and steps recorded."""
    layers = routing_layers(trace)
    seqs = range(trace.batch_size) if seq is None else [seq]
    per = [[_tokens(trace, s, layer, include_prompt)[0] for s in seqs] for layer in layers]
    top = max([int(e.max()) for row in per for e in row if e.size] + [-1]) + 1
    n = max(num_experts or 0, top)
    counts = np.zeros((len(layers), n), np.int64)
    for i, row in enumerate(per):
        for e in row:
            if e.size:
                counts[i] += np.bincount(e.reshape(-1), minlength=n)
    return layers, counts


def token_layer_map(trace: Any, seq: int = 0, *, include_prompt: bool = True) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(layers, experts `(N, L, k)`, weights `(N, L, k)`): for each token of sequence ``seq``
    (prompt then generated) and each recorded layer, the chosen experts by decreasing weight."""
    layers = routing_layers(trace)
    if not layers:
        return [], np.zeros((0, 0, 0), np.int64), np.zeros((0, 0, 0), np.float32)
    per = [_tokens(trace, seq, layer, include_prompt) for layer in layers]
    if len({p[0].shape for p in per}) != 1:
        raise TraceFormatError("the routing blobs of the layers disagree on the tokens or k recorded")
    experts = np.stack([p[0] for p in per], axis=1)
    weights = np.stack([p[1] for p in per], axis=1)
    order = np.argsort(-weights, axis=-1, kind="stable")
    return layers, np.take_along_axis(experts, order, -1), np.take_along_axis(weights, order, -1)
