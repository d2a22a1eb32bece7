"""Decode a validated manifest and its tables into a :class:`~tracer.records.Trace`, section by
section, mirroring :mod:`tracer.encode`.  Every inconsistency raises ``TraceFormatError``."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from .manifest import Doc, Tables, is_kind
from .records import (
    AttentionStats,
    CacheLayerInfo,
    CacheTimeline,
    LogitLens,
    Stage,
    StepInputs,
    StepRecord,
    StopReason,
    TopK,
    Trace,
    TraceMeta,
)
from .encode import LENS_COLUMNS, STAGE_COLUMNS, STATS_COLUMNS

__all__ = ["decode_trace"]


def _optional_column(doc: Doc, st: dict, key: str, kind: type, n: int, default: Any, nullable: bool = False) -> list:
    """A steps column added in a later minor version: ``default`` per step when absent."""
    if key not in st:
        return [default] * n
    return doc.list_field(st, key, kind, "steps", n, nullable=nullable)


def _decode_inputs(doc: Doc, st: dict, tab: Tables, b: int, n: int) -> list[StepInputs]:
    c = "steps"
    cache_before = doc.list_field(st, "cache_len_before", int, c, n)
    mask_shapes = doc.list_field(st, "attention_mask_shape", list, c, n, nullable=True)
    for ms in mask_shapes:
        if ms is not None:
            doc.items(ms, int, "steps.attention_mask_shape[]")
    qlen = doc.list_field(st, "query_len", int, c, n)
    if any(q < 0 for q in qlen):
        raise doc.fail("negative steps.query_len")
    has_pos = doc.list_field(st, "has_position_ids", bool, c, n)
    names = _optional_column(doc, st, "input_names", list, n, [])
    for row in names:
        doc.items(row, str, "steps.input_names[]")
    mask_len = _optional_column(doc, st, "mask_len", int, n, None, nullable=True)
    if any(x is not None and x < 0 for x in mask_len):
        raise doc.fail("negative steps.mask_len")
    has_pad = _optional_column(doc, st, "has_mask_padding", bool, n, False)
    keep = _optional_column(doc, st, "logits_to_keep", int, n, None, nullable=True)
    cache_class = _optional_column(doc, st, "cache_class", str, n, None, nullable=True)

    # positions and cache slots per step: as many as ids, except where embeddings were fed
    fed = _optional_column(doc, st, "fed_len", int, n, None, nullable=True)
    fed = [q if f is None else f for q, f in zip(qlen, fed)]
    if any(f < 0 for f in fed):
        raise doc.fail("negative steps.fed_len")
    total_q = sum(qlen)
    input_ids = tab.get("inputs.input_ids", (b, total_q), np.int64)
    position_ids = tab.get("inputs.position_ids", (b, sum(f for f, h in zip(fed, has_pos) if h)), np.int64)
    slots_key = "inputs.cache_slots" if "inputs.cache_slots" in tab.arrays else "inputs.cache_position"  # 1.0
    slots = tab.get(slots_key, (sum(fed),), np.int64)
    total_mask = sum(x for x in mask_len if x is not None)
    masks = tab.get("inputs.attention_mask", (b, total_mask), np.int8) if total_mask or "inputs.attention_mask" \
        in tab.arrays else np.zeros((b, 0), np.int8)
    n_pad = sum(has_pad)
    pads = tab.get("inputs.mask_padding", (n_pad, b), np.int64) if n_pad else np.zeros((0, b), np.int64)

    out = []
    q_off = f_off = pos_off = m_off = pad_i = 0
    for i in range(n):
        q, f = qlen[i], fed[i]
        pos = mask = pad = None
        if has_pos[i]:
            pos, pos_off = position_ids[:, pos_off : pos_off + f], pos_off + f
        if mask_len[i] is not None:
            mask, m_off = masks[:, m_off : m_off + mask_len[i]], m_off + mask_len[i]
        if has_pad[i]:
            pad, pad_i = pads[pad_i], pad_i + 1
        out.append(StepInputs(
            input_ids=input_ids[:, q_off : q_off + q],
            position_ids=pos,
            cache_slots=slots[f_off : f_off + f],
            attention_mask_shape=None if mask_shapes[i] is None else tuple(mask_shapes[i]),
            cache_len_before=cache_before[i],
            names=tuple(names[i]),
            attention_mask=mask,
            mask_padding=pad,
            logits_to_keep=keep[i],
            cache_class=cache_class[i],
        ))
        q_off, f_off = q_off + q, f_off + f
    return out


def _decode_stages(doc: Doc, st: dict, tab: Tables, b: int, n: int) -> list[tuple[Stage, ...]]:
    c = "steps"
    names = doc.list_field(st, "stage_names", list, c, n)
    params = doc.list_field(st, "stage_params", list, c, n)
    n_stages = len(names[0]) if names else 0
    for nm, pr in zip(names, params):
        doc.items(nm, str, "steps.stage_names[]", n_stages)
        doc.items(pr, dict, "steps.stage_params[]", n_stages)
    has_ent = st.get("stage_has_entropy")  # optional: absent means no stage entropies
    if has_ent is not None:
        doc.items(has_ent, list, "steps.stage_has_entropy", n)
        for row in has_ent:
            doc.items(row, bool, "steps.stage_has_entropy[]", n_stages)
    top_ids = tab.get("stages.top_ids", (n, n_stages, b, None), np.int64)
    top_values = tab.get("stages.top_values", (n, n_stages, b, top_ids.shape[3]), np.float32)
    lse = tab.get("stages.logsumexp", (n, n_stages, b), np.float32)
    cols = {name: tab.get(f"stages.{name}", (n, n_stages, b), dtype) for name, dtype in STAGE_COLUMNS}
    entropy = tab.get("stages.entropy", (n, n_stages, b), np.float32) if has_ent is not None else None
    has_newly = st.get("stage_has_newly_masked", False)  # optional: absent in traces saved before it
    if not isinstance(has_newly, bool):
        raise doc.fail("steps.stage_has_newly_masked must be true or false")
    newly = tab.get("stages.newly_masked", (n, n_stages, b), np.int64) if has_newly else None
    return [
        tuple(
            Stage(
                name=names[i][j],
                params=params[i][j],
                top=TopK(ids=top_ids[i, j], values=top_values[i, j], logsumexp=lse[i, j]),
                entropy=entropy[i, j] if entropy is not None and has_ent[i][j] else None,
                newly_masked=newly[i, j] if newly is not None else None,
                **{name: cols[name][i, j] for name, _ in STAGE_COLUMNS},
            )
            for j in range(n_stages)
        )
        for i in range(n)
    ]


def _decode_extras(doc: Doc, st: dict, tab: Tables, b: int, n: int, n_points: int) -> list[tuple[Any, Any, Any]]:
    """(residual norms, logit lens, attention stats) per step."""
    c = "steps"
    flags = {k: doc.list_field(st, k, bool, c, n) for k in ("has_residual_norms", "has_logit_lens",
                                                              "has_attention_stats")}
    lens_layers = tuple(doc.list_field(st, "logit_lens_layers", int, c))
    stats_layers = tuple(doc.list_field(st, "attention_stats_layers", int, c))
    n_rn, n_lens, n_stats = (sum(flags[k]) for k in ("has_residual_norms", "has_logit_lens", "has_attention_stats"))
    rnorms = tab.get("residual_norms", (n_rn, n_points, b), np.float32)
    ll = {name: tab.get(f"logit_lens.{name}", (n_lens, len(lens_layers) if n_lens else None, b), dtype)
          for name, dtype in LENS_COLUMNS}
    ent = tab.get("attention_stats.entropy", (n_stats, len(stats_layers) if n_stats else None, b, None), np.float32)
    sa = {name: tab.get(f"attention_stats.{name}", ent.shape, dtype) for name, dtype in STATS_COLUMNS}
    out = []
    rn_i = ll_i = sa_i = 0
    for i in range(n):
        rn = lens = stats = None
        if flags["has_residual_norms"][i]:
            rn, rn_i = rnorms[rn_i], rn_i + 1
        if flags["has_logit_lens"][i]:
            lens, ll_i = LogitLens(lens_layers, *(ll[k][ll_i] for k, _ in LENS_COLUMNS)), ll_i + 1
        if flags["has_attention_stats"][i]:
            stats, sa_i = AttentionStats(stats_layers, *(sa[k][sa_i] for k, _ in STATS_COLUMNS)), sa_i + 1
        out.append((rn, lens, stats))
    return out


def _decode_reasons(doc: Doc, st: dict, b: int, n: int, terminators: dict[int, str]) -> list[tuple]:
    by_text = {v: k for k, v in terminators.items()}
    out = []
    for row in doc.list_field(st, "stop_reasons", list, "steps", n):
        doc.items(row, object, "steps.stop_reasons[]", b, nullable=True)
        reasons = []
        for r in row:
            if r is not None and not isinstance(r, (str, dict)):
                raise doc.fail(f"steps.stop_reasons holds {type(r).__name__}, expected a string or an object")
            try:
                reason = StopReason.parse(r)
            except (KeyError, TypeError, ValueError) as exc:
                raise doc.fail(f"invalid stop reason {r!r} ({exc})") from None
            if reason is not None and reason.kind == "eos" and reason.token_id is None and reason.text in by_text:
                reason = dataclasses.replace(reason, token_id=by_text[reason.text])  # 1.0 files: strings
            reasons.append(reason)
        out.append(tuple(reasons))
    return out


def _decode_cache(doc: Doc, m: dict, tab: Tables) -> CacheTimeline | None:
    cd = doc.get(m, "cache", dict, "", nullable=True)
    if cd is None:
        return None
    rows = doc.get(cd, "num_rows", int, "cache")
    infos = []
    for i, ld in enumerate(doc.list_field(cd, "layers", dict, "cache")):
        ctx = f"cache.layers[{i}]"
        infos.append(CacheLayerInfo(
            kind=doc.get(ld, "kind", str, ctx),
            dtype=doc.get(ld, "dtype", str, ctx),
            device=doc.get(ld, "device", str, ctx),
            kv_heads=doc.get(ld, "kv_heads", int, ctx),
            head_dim=doc.get(ld, "head_dim", int, ctx),
            max_len=doc.get(ld, "max_len", int, ctx, nullable=True),
        ))
    arrs = {name: tab.get(f"cache.{name}", (rows, len(infos)), np.int64)
            for name in ("seq_len", "kept_len", "allocated_len", "nbytes")}
    return CacheTimeline(
        cache_class=doc.get(cd, "cache_class", str, "cache"),
        layers=tuple(infos),
        batch_size=doc.get(cd, "batch_size", int, "cache"),
        reused_len=doc.get(cd, "reused_len", int, "cache"),
        **arrs,
    )


def _decode_text(doc: Doc, m: dict) -> dict[str, Any]:
    prompts = doc.get(m, "prompts", list, "", nullable=True)
    if prompts is not None:
        doc.items(prompts, str, "prompts")
    output_text = m.get("output_text")  # optional
    if output_text is not None:
        doc.items(output_text, str, "output_text")
    token_text: dict[int, str] = {}
    for k, v in doc.get(m, "token_text", dict, "").items():
        if not re.fullmatch(r"-?\d{1,19}", k) or not isinstance(v, str):
            raise doc.fail(f"token_text entry {k!r} is not an integer id mapped to a string")
        token_text[int(k)] = v
    token_bytes: dict[int, bytes] = {}
    raw = m.get("token_bytes", {})  # 1.1+
    if not isinstance(raw, dict):
        raise doc.fail("field 'token_bytes' should be an object")
    for k, v in raw.items():
        if not re.fullmatch(r"-?\d{1,19}", k) or not isinstance(v, str) or not re.fullmatch(r"(?:[0-9a-f]{2})*", v):
            raise doc.fail(f"token_bytes entry {k!r} is not an integer id mapped to hex bytes")
        token_bytes[int(k)] = bytes.fromhex(v)
    return {"prompts": prompts, "output_text": output_text, "token_text": token_text, "token_bytes": token_bytes}


def decode_trace(m: dict[str, Any], doc: Doc, tab: Tables, blobs: Any) -> Trace:
    b = doc.get(m, "batch_size", int, "")
    p = doc.get(m, "prompt_len", int, "")
    n = doc.get(m, "num_steps", int, "")
    if b < 0 or p < 0 or n < 0:
        raise doc.fail("negative batch_size, prompt_len or num_steps")
    meta = _decode_meta(doc.get(m, "meta", dict, ""), doc)
    points = tuple(doc.list_field(m, "residual_points", str, ""))
    st = doc.get(m, "steps", dict, "")
    c = "steps"
    index = doc.list_field(st, "index", int, c, n)
    sampled = doc.list_field(st, "sampled", bool, c, n)
    time_s = doc.list_field(st, "time_s", float, c, n)
    reasons = _decode_reasons(doc, st, b, n, meta.terminators)
    inputs = _decode_inputs(doc, st, tab, b, n)
    stages = _decode_stages(doc, st, tab, b, n)
    extras = _decode_extras(doc, st, tab, b, n, len(points))
    chosen = tab.get("steps.chosen", (n, b), np.int64)
    active = tab.get("steps.active", (n, b), np.bool_)
    finished = tab.get("steps.finished", (n, b), np.bool_)
    steps = [
        StepRecord(index=index[i], inputs=inputs[i], stages=stages[i], chosen=chosen[i], sampled=sampled[i],
                   active=active[i], finished=finished[i], stop_reasons=reasons[i], time_s=float(time_s[i]),
                   residual_norms=extras[i][0], logit_lens=extras[i][1], attention_stats=extras[i][2])
        for i in range(n)
    ]
    text = _decode_text(doc, m)
    return Trace(
        meta=meta,
        prompts=text["prompts"],
        prompt_ids=tab.get("prompt_ids", (b, p), np.int64),
        prompt_mask=tab.get("prompt_mask", (b, p), np.int64),
        sequences=tab.get("sequences", (b, None), np.int64),
        steps=steps,
        cache=_decode_cache(doc, m, tab),
        token_text=text["token_text"],
        blobs=blobs,
        residual_points=points,
        attention_layers=tuple(doc.list_field(m, "attention_layers", int, "")),
        attention_heads=tuple(doc.list_field(m, "attention_heads", int, "")),
        kv_head_of=tuple(doc.list_field(m, "kv_head_of", int, "")),
        output_text=text["output_text"],
        token_bytes=text["token_bytes"],
    )


def _decode_meta(d: dict[str, Any], doc: Doc) -> TraceMeta:
    """Known fields only (a newer minor may add fields: they are ignored); missing ones default."""
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(TraceMeta):
        if f.name not in d:
            continue
        v = d[f.name]
        default = TraceMeta().__dict__[f.name]
        if isinstance(default, dict) and not isinstance(v, dict):
            raise doc.fail(f"field 'meta.{f.name}' should be an object")
        if isinstance(default, list) and not isinstance(v, list):
            raise doc.fail(f"field 'meta.{f.name}' should be a list")
        if isinstance(default, str) and f.name != "error" and not isinstance(v, str):
            raise doc.fail(f"field 'meta.{f.name}' should be a string")
        if isinstance(default, int) and not is_kind(v, int):
            raise doc.fail(f"field 'meta.{f.name}' should be an integer")
        if isinstance(default, float) and not is_kind(v, float):
            raise doc.fail(f"field 'meta.{f.name}' should be a number")
        kw[f.name] = v
    if "terminators" in kw:
        terms = {}
        for k, v in kw["terminators"].items():
            if not re.fullmatch(r"-?\d{1,19}", k):
                raise doc.fail(f"meta.terminators key {k!r} is not a token id")
            terms[int(k)] = v
        kw["terminators"] = terms
    return TraceMeta(**kw)
