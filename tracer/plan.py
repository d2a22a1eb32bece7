"""The immutable plan of a traced model: dimensions, resolved selections, the callables the
step recorder may run (final norm, ``lm_head``) and the attention recorder.

The session builds one plan when the ``with`` block opens; the step recorder reads it and
never reaches back into the session.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import _hf_compat as hf
from .attention import AttentionRecorder
from .config import RecordConfig, resolve
from .errors import NotSupportedError

__all__ = ["ModelPlan", "build_plan", "estimate_bytes", "model_facts", "model_name", "jsonable"]


@dataclass(frozen=True)
class ModelPlan:
    """What the step recorder needs to know about the model (read-only)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    device: torch.device
    attn_implementation: str  # the model's own implementation (before tracing)
    hidden_layers: tuple[int, ...]  # layers whose last-position vector is kept
    lens_layers: tuple[int, ...]  # layers seen through the logit lens
    kv_layers: tuple[int, ...]  # layers whose keys/values are snapshotted
    attention_layers: tuple[int, ...]
    attention_heads: tuple[int, ...]
    final_norm: Callable[[torch.Tensor], torch.Tensor] | None
    lm_head: Callable[[torch.Tensor], torch.Tensor]
    attention: AttentionRecorder | None
    auto_compiles: Callable[[dict | None, Any], bool]  # would generate compile the decode step?
    model_facts: dict[str, Any] = field(default_factory=dict)  # name, class, config, dtype (for TraceMeta)
    routing: Any = None  # tracer.routing.RoutingRecorder when RecordConfig(routing=True)
    # the family's own steps around lm_head (OPT's project_out; Cohere/Granite scaling, soft-capping)
    lens_project: Callable[[torch.Tensor], torch.Tensor] | None = None
    lens_transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def head(self, normed: torch.Tensor) -> torch.Tensor:
        """The logits of final-normed states, as the model makes them (the logit lens)."""
        if self.lens_project is not None:
            normed = self.lens_project(normed)
        logits = self.lm_head(normed)
        return logits if self.lens_transform is None else self.lens_transform(logits)

    @property
    def kv_head_of(self) -> tuple[int, ...]:
        group = max(self.num_heads // max(self.num_kv_heads, 1), 1)
        return tuple(h // group for h in range(self.num_heads))

    @property
    def hooks_every_layer(self) -> bool:
        """Residual norms and the logit lens read every layer (hidden vectors only the chosen)."""
        return bool(self.lens_layers)


def build_plan(model: Any, config: RecordConfig, attention_dtype: torch.dtype | None = None) -> tuple[ModelPlan, Any]:
    """(plan, decoder parts) of ``model`` for ``config`` (raises NotSupportedError)."""
    if getattr(model, "config", None) is None or not hasattr(model, "generate"):
        raise NotSupportedError(f"{type(model).__name__} is not a transformers generation model")
    parts = hf.decoder_parts(model)
    n_layers = len(parts.layers)
    heads, kv, head_dim = hf.head_counts(model.config)
    attention = None
    att_layers = resolve(config.attention_layers, n_layers, "layer") if config.attention else []
    att_heads = resolve(config.attention_heads, heads, "head") if config.attention else []
    if config.attention:
        odd = hf.non_softmax_layers(model.config, att_layers)
        if odd:
            ok = [i for i in range(n_layers) if not hf.non_softmax_layers(model.config, [i])]
            raise NotSupportedError(
                f"{type(model).__name__} layers {sorted(odd)} are {', '.join(sorted(set(odd.values())))} layers with no "
                f"attention map to record; choose attention_layers among {ok}"
            )
        modules = {}
        for i in att_layers:
            module = hf.attention_module(parts.layers[i])
            if module is None:
                raise NotSupportedError(f"decoder layer {i} has no self-attention module to record")
            if not hf.routes_attention_interface(module):
                raise NotSupportedError(
                    f"{type(model).__name__}'s attention ({type(module).__name__}) does not go through "
                    "transformers' AttentionInterface, so tracer cannot record it; trace without attention=True"
                )
            modules[i] = module
        attention = AttentionRecorder(
            modules,
            heads=att_heads,
            num_heads=heads,
            store_maps=config.attention_maps,
            dtype=attention_dtype or getattr(torch, config.attention_dtype),
            steps=set(config.attention_steps) if config.attention_steps is not None else None,
        )
    mc = model.config
    routing = None
    if config.routing:
        from .routing import RoutingRecorder

        routers = hf.router_modules(parts.layers)
        if not routers:
            raise NotSupportedError(f"{type(model).__name__} has no mixture-of-experts router in its decoder layers "
                                    "(looked for mlp.gate / block_sparse_moe.gate / mlp.router); trace without routing=True")
        top_k = int(getattr(mc, "num_experts_per_tok", 0) or getattr(mc, "experts_per_token", 0) or 8)
        routing = RoutingRecorder(routers, top_k)
    lens_project, lens_transform = hf.lens_head(model) if config.logit_lens else (None, None)
    plan = ModelPlan(
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        hidden_size=int(getattr(mc, "hidden_size", 0) or 0),
        vocab_size=int(getattr(mc, "vocab_size", 0) or 0),
        device=next(model.parameters()).device,
        attn_implementation=hf.attn_implementation(model),
        hidden_layers=tuple(resolve(config.hidden_layers, n_layers, "layer")),
        lens_layers=tuple(range(n_layers)) if config.logit_lens else (),
        kv_layers=tuple(resolve(config.kv_layers, n_layers, "layer")),
        attention_layers=tuple(att_layers),
        attention_heads=tuple(att_heads),
        final_norm=parts.final_norm,
        lm_head=model.get_output_embeddings(),
        attention=attention,
        auto_compiles=lambda model_kwargs, gc: hf.auto_compiles(model, model_kwargs, gc),
        model_facts=model_facts(model),
        routing=routing,
        lens_project=lens_project,
        lens_transform=lens_transform,
    )
    return plan, parts


def model_facts(model: Any) -> dict[str, Any]:
    """The model's name, class, config (JSON-able) and dtype, for :class:`~tracer.records.TraceMeta`."""
    config = model.config
    return {
        "model_name": model_name(config, model),
        "model_class": type(model).__name__,
        "model_config": jsonable(config.to_dict()),
        "dtype": str(next(model.parameters()).dtype),
    }


def model_name(config: Any, model: Any) -> str:
    """The model's name: the last part of a local path, or the hub-style id as given."""
    name = str(getattr(config, "_name_or_path", "") or "")
    if not name:
        return type(model).__name__
    parts = [p for p in name.replace("\\", "/").split("/") if p]
    return parts[-1] if name.startswith(("/", ".", "~")) and parts else name


def jsonable(value: Any) -> Any:
    """``value`` with tensors, non-finite floats and unknown objects made JSON-able."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 64 else f"tensor{tuple(value.shape)}"
    return str(value)


def estimate_bytes(plan: ModelPlan, config: RecordConfig, *, batch: int, prompt_len: int, max_new_tokens: int,
                   n_stages: int, use_cache: bool = True) -> dict[str, int]:
    """Upper bound of what recording ``max_new_tokens`` steps of ``batch`` sequences keeps, by kind."""
    steps = range(max_new_tokens)
    # per step: top-k per stage, scalars, and the inputs as fed (ids, positions, 2-D mask)
    out = {"steps": max_new_tokens * batch * (n_stages * (config.top_k * 12 + 32) + 256)
           + sum(batch * (prompt_len + s) for s in steps)}
    if config.attention and config.attention_maps:
        item = 2 if config.attention_dtype == "float16" else 4
        picked = [s for s in steps if config.attention_steps is None or s in config.attention_steps]
        if use_cache:  # the prompt matrix, then one new row per step
            cells = sum(prompt_len * prompt_len if s == 0 else prompt_len + s for s in picked)
        else:  # every step re-feeds the whole sequence
            cells = sum((prompt_len + s) ** 2 for s in picked)
        out["attention"] = cells * batch * len(plan.attention_heads) * len(plan.attention_layers) * item
    if config.full_logits:
        out["full_logits"] = max_new_tokens * batch * plan.vocab_size * 4
    out["hidden"] = max_new_tokens * batch * plan.hidden_size * 4 * len(plan.hidden_layers)
    if plan.routing is not None:
        from .routing import routing_bytes

        out["routing"] = routing_bytes(len(plan.routing.modules), plan.routing.top_k, batch, prompt_len, max_new_tokens,
                                       use_cache)
    if plan.kv_layers:
        picked = [s for s in steps if config.kv_steps is None or s in config.kv_steps]
        per_pos = 2 * batch * plan.num_kv_heads * plan.head_dim * 4 * len(plan.kv_layers)
        out["kv_snapshots"] = sum((prompt_len + s) * per_pos for s in picked)
    return out
