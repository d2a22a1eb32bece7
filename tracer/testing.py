"""Deterministic synthetic traces for tests and view development (no model, no torch).

A synthetic trace has the same structure as a recorded one: consistent stages (raw logits,
then a temperature and a top-k stage), cache growth of one position per step, attention rows
that sum to one over the causal prefix, residual norms and a logit lens.
"""

from __future__ import annotations

import numpy as np

from .records import (
    AttentionStats,
    CacheLayerInfo,
    CacheTimeline,
    LogitLens,
    MemoryStore,
    Stage,
    StepInputs,
    StepRecord,
    StopReason,
    TopK,
    Trace,
    TraceMeta,
    blob_key,
)


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(np.where(np.isfinite(x), x, -np.inf), axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=-1, keepdims=True)


def _lse(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1)
    return (m + np.log(np.exp(x - m[..., None]).sum(axis=-1))).astype(np.float32)


def make_trace(
    *,
    batch: int = 2,
    prompt_len: int = 5,
    steps: int = 6,
    vocab: int = 40,
    layers: int = 3,
    heads: int = 4,
    kv_heads: int = 2,
    top_k: int = 5,
    seed: int = 0,
    attention: bool = True,
    text: str | None = None,
) -> Trace:
    """A synthetic trace; sequence 0 stops on the terminator (id 1) at the last step when
    ``batch > 1`` finishes early for sequence 1 (at step ``steps // 2``).  ``text`` overrides the
    decoded text of token id 7 (e.g. to test HTML escaping)."""
    rng = np.random.default_rng(seed)
    pad = 0
    eos = 1
    prompt_ids = rng.integers(3, vocab, size=(batch, prompt_len)).astype(np.int64)
    prompt_mask = np.ones((batch, prompt_len), dtype=np.int64)
    if batch > 1:  # left padding on the last sequence
        prompt_ids[-1, :2] = pad
        prompt_mask[-1, :2] = 0
    stop_at = [steps - 1] + [steps // 2] * (batch - 1)
    store = MemoryStore()
    recs: list[StepRecord] = []
    unfinished = np.ones(batch, dtype=bool)
    seqs = prompt_ids.copy()
    temperature, k_keep = 0.7, 8
    n_points = layers + 2
    for s in range(steps):
        q = prompt_len if s == 0 else 1
        logits = rng.normal(0, 3, size=(batch, vocab)).astype(np.float32)
        chosen = np.empty(batch, dtype=np.int64)
        for b in range(batch):
            chosen[b] = eos if s == stop_at[b] else int(np.argmax(logits[b, 2:]) + 2)
            logits[b, chosen[b]] += 4.0  # make the choice likely
        chosen = np.where(unfinished, chosen, pad)
        rows = [logits, logits / temperature]
        kth = np.sort(rows[1], axis=-1)[:, -k_keep][:, None]
        rows.append(np.where(rows[1] < kth, -np.inf, rows[1]).astype(np.float32))
        names = ["logits", "TemperatureLogitsWarper", "TopKLogitsWarper"]
        params = [{}, {"temperature": temperature}, {"top_k": k_keep, "filter_value": "-inf"}]
        stages = []
        prev_p = prev_row = None
        for row, name, par in zip(rows, names, params):
            order = np.argsort(-row, axis=-1, kind="stable")[:, :top_k]
            lse = _lse(np.where(np.isfinite(row), row, -1e30))
            p = _softmax(row)
            logp = np.log(np.maximum(p, 1e-45))
            logp[p == 0] = -np.inf
            rank = np.array([(row[b] > row[b, chosen[b]]).sum() for b in range(batch)], dtype=np.int64)
            kl = np.zeros(batch, dtype=np.float32)
            if prev_p is not None:
                with np.errstate(divide="ignore", invalid="ignore"):
                    terms = np.where(p > 0, p * (np.log(np.maximum(p, 1e-45)) - np.log(np.maximum(prev_p, 1e-45))), 0)
                kl = terms.sum(-1).astype(np.float32)
            stages.append(
                Stage(
                    name=name,
                    params=par,
                    top=TopK(
                        ids=order.astype(np.int64),
                        values=np.take_along_axis(row, order, -1).astype(np.float32),
                        logsumexp=lse,
                    ),
                    n_masked=np.isneginf(row).sum(-1).astype(np.int64),
                    newly_masked=(np.zeros(batch, np.int64) if prev_row is None else
                                  (np.isneginf(row) & ~np.isneginf(prev_row)).sum(-1).astype(np.int64)),
                    chosen_rank=rank,
                    chosen_logprob=logp[np.arange(batch), chosen].astype(np.float32),
                    kl=kl,
                )
            )
            prev_p, prev_row = p, row
        active = unfinished.copy()
        finished = active & (chosen == eos)
        reasons = tuple((StopReason("eos", eos, "<|eot|>") if finished[b] else None) for b in range(batch))
        unfinished &= ~finished
        cache_before = prompt_len + s - 1 if s else 0
        t_len = cache_before + q
        ids = prompt_ids if s == 0 else seqs[:, -1:]
        pos = np.broadcast_to(np.arange(cache_before, t_len), (batch, q)).astype(np.int64)
        lens = LogitLens(
            layers=tuple(range(layers)),
            chosen_rank=rng.integers(0, vocab, size=(layers, batch)).astype(np.int64),
            chosen_prob=rng.random((layers, batch)).astype(np.float32),
            top_id=rng.integers(2, vocab, size=(layers, batch)).astype(np.int64),
        )
        lens.chosen_rank[-1] = stages[0].chosen_rank
        stats = None
        if attention:
            ent = np.zeros((layers, batch, heads), np.float32)
            sink = np.zeros_like(ent)
            amax = np.zeros((layers, batch, heads), np.int64)
            for layer in range(layers):
                scores = rng.normal(size=(batch, heads, q, t_len)).astype(np.float32)
                allowed = np.arange(t_len)[None, :] <= (t_len - q + np.arange(q))[:, None]
                allowed = np.broadcast_to(allowed, (batch, heads, q, t_len)).copy()
                allowed &= prompt_mask_full(prompt_mask, t_len)[:, None, None, :]
                scores = np.where(allowed, scores, -np.inf)
                with np.errstate(invalid="ignore"):
                    probs = np.nan_to_num(_softmax(scores), nan=0.0).astype(np.float32)
                if s == 0:  # padding query rows are zero
                    probs *= prompt_mask[:, None, :, None]
                store.put(blob_key("attention", s, layer), probs.astype(np.float16))
                last = probs[:, :, -1, :]
                with np.errstate(divide="ignore", invalid="ignore"):
                    ent[layer] = -np.where(last > 0, last * np.log(last), 0).sum(-1)
                first = np.argmax(prompt_mask_full(prompt_mask, t_len), axis=-1)
                sink[layer] = last[np.arange(batch), :, first]
                amax[layer] = np.argmax(last, axis=-1)
            stats = AttentionStats(layers=tuple(range(layers)), entropy=ent, sink=sink, argmax=amax)
        recs.append(
            StepRecord(
                index=s,
                inputs=StepInputs(
                    input_ids=ids.astype(np.int64),
                    position_ids=pos,
                    cache_slots=np.arange(cache_before, t_len, dtype=np.int64),
                    attention_mask_shape=(batch, t_len),
                    cache_len_before=cache_before,
                    names=("input_ids", "position_ids", "attention_mask", "past_key_values", "logits_to_keep"),
                    attention_mask=prompt_mask_full(prompt_mask, t_len).astype(np.int8),
                    logits_to_keep=1,
                    cache_class="DynamicCache",
                ),
                stages=tuple(stages),
                chosen=chosen,
                sampled=True,
                active=active,
                finished=finished,
                stop_reasons=reasons,
                time_s=0.05 if s == 0 else 0.01,
                residual_norms=rng.random((n_points, batch)).astype(np.float32) * 10,
                logit_lens=lens,
                attention_stats=stats,
            )
        )
        seqs = np.concatenate([seqs, chosen[:, None]], axis=1)
        if not unfinished.any():
            break
    n = len(recs)
    kept = np.array([[prompt_len + s] * layers for s in range(n)], dtype=np.int64)
    cache = CacheTimeline(
        cache_class="DynamicCache",
        layers=tuple(CacheLayerInfo("DynamicLayer", "torch.float32", "cpu", kv_heads, 8, None) for _ in range(layers)),
        seq_len=kept.copy(),
        kept_len=kept.copy(),
        allocated_len=kept.copy(),
        nbytes=kept * 2 * kv_heads * 8 * 4 * batch,
        batch_size=batch,
        reused_len=0,
    )
    token_text = {i: f"t{i}" for i in range(vocab)}
    token_text.update({pad: "<pad>", eos: "<|eot|>"})
    if text is not None:
        token_text[7] = text
    meta = TraceMeta(
        model_name="synthetic",
        model_class="SyntheticForCausalLM",
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=8,
        hidden_size=heads * 8,
        vocab_size=vocab,
        dtype="torch.float32",
        device="cpu",
        attn_implementation="sdpa",
        generation_config={"do_sample": True, "temperature": temperature, "top_k": k_keep},
        special_tokens={"eos_token": {"text": "<|eot|>", "id": eos}, "pad_token": {"text": "<pad>", "id": pad}},
        pad_token_id=pad,
        terminators={eos: "<|eot|>"},
    )
    return Trace.from_steps(
        meta,
        recs,
        prompts=[f"prompt {b}" for b in range(batch)],
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        sequences=seqs,
        cache=cache,
        token_text=token_text,
        blobs=store,
        residual_points=("embed", *[f"layer.{i}" for i in range(layers)], "norm"),
        attention_layers=tuple(range(layers)) if attention else (),
        attention_heads=tuple(range(heads)) if attention else (),
        kv_head_of=tuple(h // (heads // kv_heads) for h in range(heads)),
    )


def prompt_mask_full(prompt_mask: np.ndarray, total: int) -> np.ndarray:
    """`(B, total)` bool: the prompt mask extended with ones for generated positions."""
    b, p = prompt_mask.shape
    out = np.ones((b, total), dtype=bool)
    out[:, : min(p, total)] = prompt_mask[:, :total].astype(bool)
    return out
