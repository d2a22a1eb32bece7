"""vLLM speculative decoding (``LLM(..., speculative_config={"method": "ngram", ...})``): what the
engine tells about drafts and acceptance.

vLLM does not return per-step drafts; it counts them in its metrics (``LLM.get_metrics()``, with
``disable_log_stats=False``): drafts, drafted tokens, accepted tokens and accepted tokens per draft
position, engine totals.  :func:`vllm_generate <tracer.backends.vllm.vllm_generate>` reads them
before and after the call and stores the difference in each trace's ``meta.backend_info
["speculative"]`` with a note: the counts cover every request of that call together.
"""

from __future__ import annotations

from typing import Any

__all__ = ["METRICS", "speculative_config", "counters", "summary"]

#: vLLM metric name -> key in ``backend_info["speculative"]``
METRICS = {
    "vllm:spec_decode_num_drafts": "drafts",
    "vllm:spec_decode_num_draft_tokens": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "accepted_tokens",
    "vllm:spec_decode_num_accepted_tokens_per_pos": "accepted_per_position",
}
NOTE = ("speculative decoding ({method}): drafted/accepted counts in backend_info['speculative'] are engine "
        "totals over this vllm_generate call (all its requests); vLLM does not expose the drafted tokens of each "
        "step, so per-step acceptance is not recorded")


def speculative_config(llm: Any) -> Any:
    return getattr(getattr(llm.llm_engine, "vllm_config", None), "speculative_config", None)


def counters(llm: Any) -> dict[str, Any] | None:
    """The engine's speculative-decoding counters now (None: no speculative decoding; ``{}``:
    metrics unavailable, e.g. ``disable_log_stats=True``)."""
    if speculative_config(llm) is None:
        return None
    try:
        metrics = llm.get_metrics()
    except Exception:  # noqa: BLE001 - stats disabled or an older vLLM
        return {}
    out: dict[str, Any] = {}
    for metric in metrics:
        key = METRICS.get(getattr(metric, "name", ""))
        if key == "accepted_per_position":
            out[key] = [int(v) for v in getattr(metric, "values", [])]
        elif key is not None:
            out[key] = int(getattr(metric, "value", 0))
    return out


def summary(llm: Any, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What this call drafted and accepted (``after - before``), its acceptance rate, the method."""
    config = speculative_config(llm)
    out: dict[str, Any] = {"method": str(getattr(config, "method", "")),
                           "num_speculative_tokens": int(getattr(config, "num_speculative_tokens", 0) or 0)}
    if not after:
        out["counts"] = "unavailable (build the LLM with disable_log_stats=False)"
        return out
    for key, value in after.items():
        prev = before.get(key)
        if isinstance(value, list):
            prev = prev if isinstance(prev, list) and len(prev) == len(value) else [0] * len(value)
            out[key] = [a - b for a, b in zip(value, prev)]
        else:
            out[key] = value - int(prev or 0)
    drafted = out.get("draft_tokens") or 0
    out["acceptance_rate"] = out.get("accepted_tokens", 0) / drafted if drafted else None
    out["scope"] = "all requests of this call"
    return out
