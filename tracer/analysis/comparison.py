"""Where two runs of the same prompt(s) part, and how far apart their distributions are.

``tracer.compare(a, b)`` walks both traces step by step per sequence.  Up to and including the
first step whose chosen tokens differ, both models saw the same context, so their distributions
at those steps are comparable; later steps are listed but flagged (``comparable`` is False).

Log-probs come from one stage of each trace — stage 0 by default, the raw model distribution,
which is also what a vLLM trace (``raw_logprobs``) holds.  Each trace's top-k entries carry exact
log-probs (the log-sum-exp of the full row is recorded), and the chosen token's log-prob and
rank are recorded at every stage; a token outside the recorded top-k has no log-prob (NaN)
unless the full logits were recorded (``RecordConfig(full_logits=True)``).  KL(a‖b) is exact
when both full rows are recorded; otherwise it is a lower bound from the tokens known on both
sides (the KL of the coarse distribution {each shared token, everything else}, which the data
processing inequality puts below the true KL).

numpy only; :meth:`Comparison.table` imports pandas.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..records import Trace, TracerError, blob_key
from ..text import clip, display_width, pieces, running_text, terminal_safe, token_pieces

__all__ = ["CompareError", "Comparison", "compare", "StepView"]


class CompareError(TracerError, ValueError):
    """Two traces cannot be compared (different prompts or batch sizes, no such stage)."""


@dataclass(frozen=True)
class StepView:
    """One side's distribution at one step of one sequence (from one recorded stage)."""

    token: int | None  # the token this side chose (None: no step here)
    token_logprob: float  # its log-prob (recorded)
    token_rank: int  # its rank (recorded, 0 = best)
    ids: np.ndarray  # (K,) top-k ids, best first
    logprobs: np.ndarray  # (K,) float64 exact log-probs of ``ids``
    full: np.ndarray | None  # (V,) float64 log-probs of the whole row when the raw logits were recorded

    def logprob_of(self, token: int) -> float:
        if token == self.token:
            return self.token_logprob
        if self.full is not None:
            return float(self.full[token])
        hit = np.flatnonzero(self.ids == token)
        return float(self.logprobs[hit[0]]) if hit.size else float("nan")

    def rank_of(self, token: int) -> float:
        if token == self.token:
            return float(self.token_rank)
        if self.full is not None:
            return float((self.full > self.full[token]).sum())
        hit = np.flatnonzero(self.ids == token)
        return float(hit[0]) if hit.size else float("nan")


def _resolve_stage(trace: Trace, stage: int | str) -> int:
    n = len(trace.steps[0].stages) if trace.steps else 1
    if stage in ("raw", "logits"):
        return 0
    if stage == "final":  # the last stage before a replay's forcing stage
        names = [s.name for s in trace.steps[0].stages] if trace.steps else []
        last = n - 1
        while last > 0 and names[last] == "ForceTokens":
            last -= 1
        return last
    if not isinstance(stage, (int, np.integer)) or not -n <= int(stage) < n:
        raise CompareError(f"stage {stage!r} not in this trace (it has {n} stages: 0 raw logits .. {n - 1})")
    return int(stage) % n


def step_view(trace: Trace, seq: int, step: int, stage: int) -> StepView:
    rec = trace.steps[step]
    st = rec.stages[stage]
    ids = st.top.ids[seq]
    with np.errstate(invalid="ignore"):
        lps = st.top.values[seq].astype(np.float64) - float(st.top.logsumexp[seq])
    full = None
    key = blob_key("logits", step)
    if stage == 0 and key in trace.blobs:
        row = np.asarray(trace.blobs.get(key)[seq], dtype=np.float64)
        m = row.max()
        full = row - (m + np.log(np.exp(row - m).sum()))
    active = bool(rec.active[seq])
    return StepView(token=int(rec.chosen[seq]) if active else None, token_logprob=float(st.chosen_logprob[seq]),
                    token_rank=int(st.chosen_rank[seq]), ids=ids, logprobs=lps, full=full)


def kl_divergence(a: StepView, b: StepView) -> tuple[float, bool]:
    """(KL(a‖b) in nats, exact?)  Exact from two full rows; else the lower bound from the tokens
    whose log-prob both sides know."""
    if a.full is not None and b.full is not None:
        pa = np.exp(a.full)
        with np.errstate(invalid="ignore", divide="ignore"):
            terms = pa * (a.full - b.full)
        return float(np.nansum(np.where(pa > 0, terms, 0.0))), True
    known: dict[int, tuple[float, float]] = {}
    for tok in [*a.ids.tolist(), *b.ids.tolist(), a.token, b.token]:
        if tok is None or tok in known:
            continue
        la, lb = a.logprob_of(tok), b.logprob_of(tok)
        if np.isfinite(la) and np.isfinite(lb):
            known[tok] = (la, lb)
    if not known:
        return 0.0, False
    la = np.array([v[0] for v in known.values()])
    lb = np.array([v[1] for v in known.values()])
    pa, pb = np.exp(la), np.exp(lb)
    bound = float((pa * (la - lb)).sum())
    ra, rb = max(1.0 - pa.sum(), 0.0), max(1.0 - pb.sum(), 1e-300)
    if ra > 0:
        bound += ra * (np.log(ra) - np.log(rb))
    return max(bound, 0.0), False


def _nan(x: Any) -> float:
    return float("nan") if x is None else float(x)


class Comparison:
    """The step-by-step comparison of two traces (see :func:`compare`)."""

    def __init__(self, a: Trace, b: Trace, *, stage: int | str = 0, names: tuple[str, str] = ("a", "b"),
                 check_prompts: bool = True):
        if a.batch_size != b.batch_size:
            raise CompareError(f"the traces have {a.batch_size} and {b.batch_size} sequences")
        if check_prompts:
            for s in range(a.batch_size):
                pa, pb = a.prompt_tokens(s), b.prompt_tokens(s)
                if pa.shape != pb.shape or not np.array_equal(pa, pb):
                    raise CompareError(f"sequence {s} has different prompts in the two traces "
                                       f"({pa.shape[0]} and {pb.shape[0]} tokens)")
        self.a, self.b = a, b
        self.names = names
        self.stage_a, self.stage_b = _resolve_stage(a, stage), _resolve_stage(b, stage)
        self.ids_a = [a.generated_ids(s) for s in range(a.batch_size)]
        self.ids_b = [b.generated_ids(s) for s in range(b.batch_size)]
        self.first_divergence: list[int | None] = []
        for ia, ib in zip(self.ids_a, self.ids_b):
            n = min(len(ia), len(ib))
            diff = np.flatnonzero(ia[:n] != ib[:n])
            self.first_divergence.append(int(diff[0]) if diff.size else None)
        self.rows = [row for s in range(a.batch_size) for row in self._rows(s)]

    # -- per step -------------------------------------------------------------------
    def views(self, seq: int, step: int) -> tuple[StepView | None, StepView | None]:
        va = step_view(self.a, seq, step, self.stage_a) if step < len(self.ids_a[seq]) else None
        vb = step_view(self.b, seq, step, self.stage_b) if step < len(self.ids_b[seq]) else None
        return va, vb

    def _rows(self, seq: int) -> list[dict[str, Any]]:
        out = []
        div = self.first_divergence[seq]
        # display text read in each run's context: a character split over tokens shows whole on
        # the token that completes it, a partial token as its own bytes (never "\ufffd")
        shown_a = token_pieces(self.a, [int(t) for t in self.ids_a[seq]])
        shown_b = token_pieces(self.b, [int(t) for t in self.ids_b[seq]])
        for step in range(max(len(self.ids_a[seq]), len(self.ids_b[seq]))):
            va, vb = self.views(seq, step)
            ta, tb = (va.token if va else None), (vb.token if vb else None)
            row: dict[str, Any] = {
                "seq": seq, "step": step, "token_a": ta, "token_b": tb,
                "text_a": shown_a[step] if ta is not None else None,
                "text_b": shown_b[step] if tb is not None else None,
                "same": ta is not None and ta == tb,
                "comparable": div is None or step <= div,
                "logprob_a": va.token_logprob if va else np.nan, "logprob_b": vb.token_logprob if vb else np.nan,
                "logprob_a_of_b": va.logprob_of(tb) if va and tb is not None else np.nan,
                "logprob_b_of_a": vb.logprob_of(ta) if vb and ta is not None else np.nan,
                "rank_a": va.token_rank if va else np.nan, "rank_b": vb.token_rank if vb else np.nan,
                "rank_a_of_b": va.rank_of(tb) if va and tb is not None else np.nan,
                "rank_b_of_a": vb.rank_of(ta) if vb and ta is not None else np.nan,
                "abs_dlogprob": np.nan, "topk_overlap": np.nan, "kl": np.nan, "kl_exact": False,
            }
            if va and vb:
                if row["same"]:
                    row["abs_dlogprob"] = abs(va.token_logprob - vb.token_logprob)
                k = min(va.ids.size, vb.ids.size)
                row["topk_overlap"] = len(set(va.ids[:k].tolist()) & set(vb.ids[:k].tolist())) / max(k, 1)
                row["kl"], row["kl_exact"] = kl_divergence(va, vb)
            out.append(row)
        return out

    # -- results --------------------------------------------------------------------
    def table(self):
        """pandas DataFrame, one row per (sequence, step): both tokens and texts, each side's
        log-prob and rank of its own and of the other's token (NaN: outside the recorded top-k),
        |Δ log-prob| on a shared token, top-k overlap, KL(a‖b) (``kl_exact``: from full rows,
        else a lower bound), ``comparable`` (same context: steps up to the first divergence)."""
        import pandas as pd

        df = pd.DataFrame(self.rows)
        for col in ("token_a", "token_b"):
            df[col] = df[col].astype("Int64")
        return df

    def arrays(self, seq: int = 0) -> dict[str, np.ndarray]:
        """Per-step arrays of one sequence (for plots): ``step``, ``abs_dlogprob``, ``kl``,
        ``kl_exact``, ``same``, ``comparable``, ``logprob_a``, ``logprob_b``."""
        rows = [r for r in self.rows if r["seq"] == seq]
        keys = ("step", "abs_dlogprob", "kl", "kl_exact", "same", "comparable", "logprob_a", "logprob_b")
        return {k: np.array([r[k] for r in rows]) for k in keys}

    def _seq_summary(self, seq: int) -> dict[str, Any]:
        rows = [r for r in self.rows if r["seq"] == seq]
        div = self.first_divergence[seq]
        na, nb = len(self.ids_a[seq]), len(self.ids_b[seq])
        shared = [r["abs_dlogprob"] for r in rows if r["comparable"] and r["same"]]
        kls = [r["kl"] for r in rows if r["comparable"] and not np.isnan(r["kl"])]
        overlaps = [r["topk_overlap"] for r in rows if r["comparable"] and not np.isnan(r["topk_overlap"])]
        out: dict[str, Any] = {
            "seq": seq, "first_divergence": div, "steps_a": na, "steps_b": nb,
            # over the steps both runs have (a run 8 steps longer is not "8 steps different")
            "shared_steps": min(na, nb),
            "identical_fraction": sum(r["same"] for r in rows[: min(na, nb)]) / max(min(na, nb), 1),
            "steps_until_divergence": div if div is not None else min(na, nb),
            "max_abs_dlogprob": max(shared) if shared else 0.0,
            "mean_abs_dlogprob": float(np.mean(shared)) if shared else 0.0,
            "mean_kl": float(np.mean(kls)) if kls else 0.0,
            "max_kl": max(kls) if kls else 0.0,
            "kl_exact": bool(rows) and all(r["kl_exact"] for r in rows if r["comparable"] and not np.isnan(r["kl"])),
            "mean_topk_overlap": float(np.mean(overlaps)) if overlaps else float("nan"),
            "text_a": _answer_text(self.a, seq),
            "text_b": _answer_text(self.b, seq),
        }
        if div is not None:
            r = rows[div]
            out["divergence"] = {
                "token_a": r["token_a"], "token_b": r["token_b"], "text_a": r["text_a"], "text_b": r["text_b"],
                "logprob_a": r["logprob_a"], "logprob_a_of_b": r["logprob_a_of_b"],
                "logprob_b": r["logprob_b"], "logprob_b_of_a": r["logprob_b_of_a"],
                # vLLM's check_logprobs_close: each side's token is in the other's top-k
                "close": not (np.isnan(r["rank_a_of_b"]) or np.isnan(r["rank_b_of_a"])),
            }
        return out

    def summary(self) -> dict[str, Any]:
        """Per sequence: first divergence, identical-token fraction (over the ``shared_steps``:
        the steps both runs have, ``min(steps_a, steps_b)``), max/mean |Δ log-prob| on
        shared tokens and mean/max KL over the comparable steps, top-k overlap, texts; plus the
        two runs' settings side by side."""
        seqs = [self._seq_summary(s) for s in range(self.a.batch_size)]

        def side(t: Trace, stage: int) -> dict[str, Any]:
            m = t.meta
            st = t.steps[0].stages[stage].name if t.steps else ""
            return {"model": m.model_name, "dtype": m.dtype, "attn": m.attn_implementation,
                    "backend": getattr(m, "backend", "transformers"), "stage": f"{stage} ({st})",
                    "quantization": (m.model_config or {}).get("quantization_config", {}).get("quant_method", "")
                    if isinstance((m.model_config or {}).get("quantization_config"), dict) else ""}

        return {"a": side(self.a, self.stage_a), "b": side(self.b, self.stage_b), "sequences": seqs,
                "diverged": sum(s["first_divergence"] is not None for s in seqs)}

    def text(self, context: int = 3) -> str:
        """Plain-text summary and the rows around each divergence."""
        summ = self.summary()
        lines = []
        for key in ("a", "b"):
            s = summ[key]
            lines.append(f"{self.names[key == 'b']}: {s['model']} {s['dtype']} {s['attn']} {s['quantization']} "
                         f"[{s['backend']}, stage {s['stage']}]".replace("  ", " "))
        for s in summ["sequences"]:
            div = s["first_divergence"]
            lines.append(f"sequence {s['seq']}: " + ("no divergence" if div is None else f"first divergence at step {div}")
                         + f"; steps {s['steps_a']} / {s['steps_b']}; identical {s['identical_fraction']:.0%} "
                         f"of {s['shared_steps']} shared; "
                         f"max |Δ log-prob| {s['max_abs_dlogprob']:.3g}; mean KL {s['mean_kl']:.3g}"
                         + ("" if s["kl_exact"] else " (lower bound)"))
            rows = [r for r in self.rows if r["seq"] == s["seq"]]
            centre = div if div is not None else 0
            shown = rows[max(centre - context, 0): centre + context + 1]
            lines.append("  step  same  token a (lp)                token b (lp)                |Δlp|    KL")
            for r in shown:
                mark = ">>" if r["step"] == div else "  "
                # after the first divergence the two sides saw different tokens: no KL to show
                kl = f"{r['kl']:>6.3g}" if r["comparable"] else f"{'—':>6}"
                # |Δ log-prob| is of a shared token: none where the two tokens differ
                dlp = f"{r['abs_dlogprob']:>6.3g}" if r["same"] else f"{'—':>6}"
                lines.append(f"{mark}{r['step']:>4}  {'yes' if r['same'] else 'no':<4}  "
                             f"{_pad(_cell(r['text_a'], r['logprob_a']), 26)}  {_pad(_cell(r['text_b'], r['logprob_b']), 26)}  "
                             f"{dlp}  {kl}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Comparison({self.a.meta.model_name!r} vs {self.b.meta.model_name!r}, sequences={self.a.batch_size}, "
                f"first_divergence={self.first_divergence})")

    def _repr_html_(self) -> str:
        summ = self.summary()
        esc = html.escape
        head = "".join(f"<tr><th>{esc(self.names[k == 'b'])}</th>" + "".join(
            f"<td>{esc(str(v))}</td>" for v in summ[k].values()) + "</tr>" for k in ("a", "b"))
        body = []
        for s in summ["sequences"]:
            div = s["first_divergence"]
            body.append(
                f"<tr><td>{s['seq']}</td><td>{'—' if div is None else div}</td><td>{s['identical_fraction']:.0%}</td>"
                f"<td>{s['max_abs_dlogprob']:.3g}</td><td>{s['mean_abs_dlogprob']:.3g}</td>"
                f"<td>{s['mean_kl']:.3g}{'' if s['kl_exact'] else ' ≥'}</td>"
                f"<td>{esc(s['text_a'])}</td><td>{esc(s['text_b'])}</td></tr>")
        return ("<div class='tracer-compare'><table><tr><th></th><th>model</th><th>dtype</th><th>attn</th>"
                "<th>backend</th><th>stage</th><th>quantization</th></tr>" + head + "</table>"
                "<table><tr><th>seq</th><th>first divergence</th><th>identical (shared steps)</th><th>max |Δlp|</th>"
                "<th>mean |Δlp|</th><th>mean KL</th><th>text a</th><th>text b</th></tr>" + "".join(body)
                + "</table></div>")


def _answer_text(t: Trace, seq: int) -> str:
    """The new text of ``seq`` for display, the same way for every backend: the tokens' bytes
    decoded as one stream, bytes that make no character (an answer cut mid-character) shown
    escaped as in every other view; the backend's own text where bytes were not recorded.
    (HF's decode ends such an answer in U+FFFD, vLLM's leaves the bytes out: the same tokens
    would otherwise read as a difference.)"""
    if seq >= t.batch_size:
        return ""
    ids = [int(i) for i in t.generated_ids(seq) if int(i) not in t.meta.terminators]
    if ids and all(i in t.token_bytes for i in ids):
        return running_text(pieces(t, ids))
    return t.generated_text[seq]


def _pad(cell: str, width: int) -> str:
    """``cell`` left-aligned in ``width`` terminal columns (a wide character takes two)."""
    return cell + " " * max(width - display_width(cell), 0)


def _cell(text: str | None, lp: float, width: int = 26) -> str:
    """``'token' (log-prob)`` in at most ``width`` terminal columns: the token clipped, the
    log-prob whole."""
    if text is None:
        return "—"
    lp_text = f" ({lp:.3f})"
    return clip(f"'{terminal_safe(text)}'", width - len(lp_text)) + lp_text  # the display piece, terminal-safe


def compare(a: Trace, b: Trace, *, stage: int | str = 0, names: tuple[str, str] = ("a", "b"),
            check_prompts: bool = True) -> Comparison:
    """Compare two traces of the same prompt(s) step by step.

    ``stage``: which recorded distribution to compare — 0 / ``"raw"`` (default: the model's
    raw logits), an index, or ``"final"`` (after every processor, a replay's forcing stage left
    out).  Traces can differ in anything (dtype, quantization, attention kernel, sampling,
    backend); their prompts must hold the same token ids unless ``check_prompts=False``."""
    return Comparison(a, b, stage=stage, names=names, check_prompts=check_prompts)
