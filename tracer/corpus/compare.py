"""Compare two corpus datasets of the same prompts (``tracer compare DIR_A DIR_B``).

Per prompt: the first step where the generated tokens differ, the fraction of positions
that agree, |Δ log-prob| of the chosen token on the shared prefix (same context, same token),
a KL estimate on every step with the same context, and whether the divergence was a near-tie
(the two chosen tokens' log-probs within ``tie_margin`` nats of each other, on a side whose top-k
holds both; ``margin_a``/``margin_b``: log p(own token) - log p(other side's token), raw logits).

KL: the datasets keep each step's top-k, not the full row, so the KL is computed on the
coarsened distribution {tokens in both top-k lists, everything else}; by the data-processing
inequality this is a *lower bound* of the true KL(a || b) (``kl_lb``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..text import html_text
from .data import CorpusError
from .dataset import CorpusDataset, open_dataset

__all__ = ["CorpusComparison", "compare_datasets"]

_STEP_COLS = ["prompt_id", "step", "token_id", "decoded", "token_text", "logprob", "topk_ids", "topk_logprobs"]


def _kl_lb(ids_a, lp_a, ids_b, lp_b) -> float:
    """KL(a || b) on the partition {shared top-k ids} + {rest}: a lower bound of the full KL."""
    pa = dict(zip(map(int, ids_a), np.exp(np.asarray(lp_a, np.float64))))
    pb = dict(zip(map(int, ids_b), np.exp(np.asarray(lp_b, np.float64))))
    shared = [i for i in pa if i in pb]
    p = np.array([pa[i] for i in shared] + [max(1.0 - sum(pa[i] for i in shared), 0.0)])
    q = np.array([pb[i] for i in shared] + [max(1.0 - sum(pb[i] for i in shared), 0.0)])
    mask = p > 0
    if np.any(q[mask] <= 0):
        return float("inf")
    return float(max(np.sum(p[mask] * (np.log(p[mask]) - np.log(q[mask]))), 0.0))


def _margin(ids, lps, mine: int, other: int) -> float:
    """log p(mine) - log p(other) on one side; nan when ``other`` is not in its top-k."""
    ids = [int(i) for i in ids]
    if mine not in ids or other not in ids:
        return float("nan")
    return float(lps[ids.index(mine)] - lps[ids.index(other)])


@dataclass
class CorpusComparison:
    """Result of :func:`compare_datasets`: ``prompts`` (one row per prompt), ``histogram``
    (first-divergence positions), ``summary`` (overall figures) and the aligned texts."""

    name_a: str
    name_b: str
    prompts: Any  # pandas DataFrame
    histogram: Any  # pandas DataFrame: position, prompts
    summary: dict[str, Any]
    aligned: dict[str, tuple[str, str, str]]  # prompt id -> (shared prefix, rest of a, rest of b)

    def most_different(self, n: int = 10):
        """The ``n`` prompts that differ most: earliest divergence, then fewest agreeing positions."""
        df = self.prompts[~self.prompts["identical"]].copy()
        return df.sort_values(["first_divergence", "identical_fraction"]).head(n)

    def text(self, n: int = 5) -> str:
        s = self.summary
        lines = [f"corpus compare: A = {self.name_a}, B = {self.name_b}",
                 f"prompts: {s['prompts']}, identical answers: {s['identical']} ({s['identical_fraction']:.1%}), "
                 f"near-tie divergences: {s['near_ties']} of {s['prompts'] - s['identical']}",
                 f"mean |Δ log-prob| on shared tokens: {s['mean_abs_dlogprob']:.4g}, max {s['max_abs_dlogprob']:.4g}; "
                 f"mean KL lower bound: {s['mean_kl_lb']:.4g} nats"]
        for _, row in self.most_different(n).iterrows():
            pre, ra, rb = self.aligned[row.prompt_id]
            from ..text import terminal_safe

            lines.append(f"  prompt {terminal_safe(row.prompt_id, 40)}: diverges at token {row.first_divergence}"
                         f"{' (near-tie)' if row.near_tie else ''}: ...{terminal_safe(pre[-40:])}"
                         f" | A: {terminal_safe(ra, 60)} | B: {terminal_safe(rb, 60)}")
        return "\n".join(lines)

    def to_html(self, path: str | Path | None = None, n: int = 20) -> str:
        s = self.summary
        esc = html_text
        hist = self.histogram
        top = max(int(hist["prompts"].max()) if len(hist) else 1, 1)
        bars = "".join(
            f"<tr><td>{int(r.position)}</td><td><div class='bar' style='width:{200 * int(r.prompts) / top:.0f}px'>"
            f"</div></td><td>{int(r.prompts)}</td></tr>" for r in hist.itertuples())
        rows = []
        for r in self.most_different(n).itertuples():
            pre, ra, rb = self.aligned[r.prompt_id]
            rows.append(
                f"<tr><td>{esc(r.prompt_id)}</td><td>{int(r.first_divergence)}</td>"
                f"<td>{r.identical_fraction:.2f}</td><td>{'yes' if r.near_tie else ''}</td>"
                f"<td>{esc(r.prompt)}</td><td class='t'><span class='pre'>{esc(pre)}</span>"
                f"<span class='a'>{esc(ra)}</span></td><td class='t'><span class='pre'>{esc(pre)}</span>"
                f"<span class='b'>{esc(rb)}</span></td></tr>")
        page = f"""<!doctype html><html><head><meta charset="utf-8"><title>corpus compare</title>
<style>body{{font-family:system-ui,"Noto Sans CJK SC","PingFang SC","Microsoft YaHei",sans-serif;margin:1.5em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 6px;vertical-align:top}}
.bar{{background:#4a7fd0;height:12px}}.t{{white-space:pre-wrap;max-width:28em}}.pre{{color:#888}}
.a{{background:#fde2e2}}.b{{background:#dff5e1}}</style></head><body>
<h1>Corpus comparison</h1><p>A: <code>{esc(self.name_a)}</code><br>B: <code>{esc(self.name_b)}</code></p>
<ul><li>prompts: {s['prompts']}; identical answers: {s['identical']} ({s['identical_fraction']:.1%})</li>
<li>near-tie divergences: {s['near_ties']}</li>
<li>mean |Δ log-prob| on shared tokens: {s['mean_abs_dlogprob']:.4g} (max {s['max_abs_dlogprob']:.4g})</li>
<li>mean KL(A‖B) lower bound (top-k coarsened): {s['mean_kl_lb']:.4g} nats</li></ul>
<h2>First divergence position</h2><table><tr><th>token</th><th></th><th>prompts</th></tr>{bars}</table>
<h2>Prompts that differ most</h2><table><tr><th>id</th><th>diverges at</th><th>agree</th><th>near-tie</th>
<th>prompt</th><th>A</th><th>B</th></tr>{''.join(rows)}</table></body></html>"""
        if path is not None:
            Path(path).write_text(page, encoding="utf-8")
        return page

    def _repr_html_(self) -> str:
        return self.to_html()


def _shown_pieces(steps: dict[str, list]) -> list[str]:
    """What each token adds to the answer as shown: its ``decoded`` characters, or where those
    hold U+FFFD (bytes that make no character, e.g. an answer cut mid-character) its
    ``token_text``, the bytes escaped as in every other view, and so for the tokens after it
    that add nothing (``decoded`` empty: more bytes of the same unfinished character)."""
    out, broken = [], False
    for d, t in zip(steps["decoded"], steps["token_text"]):
        if "\ufffd" in d or (broken and d == ""):
            out.append(t)
            broken = True
        else:
            out.append(d)
            broken = False
    return out


def _steps_by_prompt(ds: CorpusDataset) -> dict[str, dict[str, list]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = ds.files("steps")
    if not files:
        return {}
    table = pa.concat_tables([pq.read_table(f, columns=_STEP_COLS) for f in files]).sort_by([("prompt_id", "ascending"),
                                                                                             ("step", "ascending")])
    cols = {c: table[c].to_pylist() for c in _STEP_COLS}
    out: dict[str, dict[str, list]] = {}
    for i, pid in enumerate(cols["prompt_id"]):
        d = out.setdefault(pid, {c: [] for c in _STEP_COLS[1:]})
        for c in _STEP_COLS[1:]:
            d[c].append(cols[c][i])
    return out


def compare_datasets(a: str | Path | CorpusDataset, b: str | Path | CorpusDataset, *,
                     tie_margin: float = 0.1) -> CorpusComparison:
    """Compare two datasets of the same prompt ids (A against B; see the module doc)."""
    import pandas as pd

    da = a if isinstance(a, CorpusDataset) else open_dataset(a)
    db = b if isinstance(b, CorpusDataset) else open_dataset(b)
    sa, sb = da.sequences.set_index("prompt_id"), db.sequences.set_index("prompt_id")
    ids_a, ids_b = list(sa.index), set(sb.index)
    only_a = [i for i in ids_a if i not in ids_b]
    only_b = sorted(ids_b - set(ids_a))
    if only_a or only_b:
        first = only_a[0] if only_a else only_b[0]
        side = "A" if only_a else "B"
        raise CorpusError(f"the datasets hold different prompts: prompt id {first!r} is only in {side} "
                          f"({len(only_a)} only in A, {len(only_b)} only in B)")
    for pid in ids_a:
        if sa.at[pid, "prompt"] != sb.at[pid, "prompt"]:
            raise CorpusError(f"the datasets hold different prompts: prompt id {pid!r} has another text in B")
    steps_a, steps_b = _steps_by_prompt(da), _steps_by_prompt(db)
    rows, aligned, all_d, all_kl = [], {}, [], []
    for pid in ids_a:
        ta, tb = list(sa.at[pid, "token_ids"]), list(sb.at[pid, "token_ids"])
        xa, xb = steps_a.get(pid), steps_b.get(pid)
        n = min(len(ta), len(tb))
        d = next((i for i in range(n) if ta[i] != tb[i]), n)
        identical = ta == tb
        agree = sum(1 for i in range(n) if ta[i] == tb[i]) / max(len(ta), len(tb), 1)
        dlp, kls = [], []
        near_tie, m_a, m_b = False, float("nan"), float("nan")
        if xa is not None and xb is not None:
            for i in range(min(d + 1, n, len(xa["step"]), len(xb["step"]))):
                if i < d:
                    dlp.append(abs(xa["logprob"][i] - xb["logprob"][i]))
                kls.append(_kl_lb(xa["topk_ids"][i], xa["topk_logprobs"][i], xb["topk_ids"][i], xb["topk_logprobs"][i]))
            if not identical and d < n and d < len(xa["step"]) and d < len(xb["step"]):
                m_a = _margin(xa["topk_ids"][d], xa["topk_logprobs"][d], ta[d], tb[d])
                m_b = _margin(xb["topk_ids"][d], xb["topk_logprobs"][d], tb[d], ta[d])
                near_tie = any(not math.isnan(m) and abs(m) < tie_margin for m in (m_a, m_b))
        text_a = _shown_pieces(xa) if xa else []
        text_b = _shown_pieces(xb) if xb else []
        aligned[pid] = ("".join(text_a[:d]), "".join(text_a[d:]), "".join(text_b[d:]))
        all_d.extend(dlp)
        finite = [k for k in kls if math.isfinite(k)]
        all_kl.extend(finite)
        rows.append({
            "prompt_id": pid, "prompt": sa.at[pid, "prompt"], "tokens_a": len(ta), "tokens_b": len(tb),
            "identical": identical, "first_divergence": None if identical else d,
            "identical_fraction": agree,
            "mean_abs_dlogprob": float(np.mean(dlp)) if dlp else float("nan"),
            "max_abs_dlogprob": float(np.max(dlp)) if dlp else float("nan"),
            "mean_kl_lb": float(np.mean(finite)) if finite else float("nan"),
            "near_tie": bool(near_tie), "margin_a": m_a, "margin_b": m_b,
            "stop_a": sa.at[pid, "stop_reason"], "stop_b": sb.at[pid, "stop_reason"],
        })
    df = pd.DataFrame(rows)
    df["first_divergence"] = df["first_divergence"].astype("Int64")
    div = df.loc[~df["identical"], "first_divergence"].astype(int)
    hist = div.value_counts().sort_index().rename_axis("position").reset_index(name="prompts")
    summary = {
        "prompts": len(df), "identical": int(df["identical"].sum()),
        "identical_fraction": float(df["identical"].mean()) if len(df) else float("nan"),
        "near_ties": int(df["near_tie"].sum()),
        "mean_abs_dlogprob": float(np.mean(all_d)) if all_d else float("nan"),
        "max_abs_dlogprob": float(np.max(all_d)) if all_d else float("nan"),
        "mean_kl_lb": float(np.mean(all_kl)) if all_kl else float("nan"),
        "median_first_divergence": float(div.median()) if len(div) else float("nan"),
    }
    return CorpusComparison(str(da.path), str(db.path), df, hist, summary, aligned)


