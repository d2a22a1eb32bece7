"""Compare two corpus datasets of the same prompts (``tracer compare DIR_A DIR_B``).

Per prompt: the first step where the generated tokens differ, the fraction of positions
that agree, |Δ log-prob| of the chosen token on the shared prefix (same context, same token),
a KL estimate on every step with the same context, and whether the divergence was a near-tie
(the two chosen tokens' log-probs within ``tie_margin`` nats of each other, on a side whose top-k
holds both; ``margin_a``/``margin_b``: log p(own token) - log p(other side's token), raw logits).

KL: the datasets keep each step's top-k, not the full row, so the KL is computed on the
coarsened distribution {tokens in both top-k lists, everything else}; by the data-processing
inequality this is a *lower bound* of the true KL(a || b) (``kl_lb``).

Runs made with other settings are compared (that is the point: bf16 against fp32, 4-bit against
full, vLLM against ``generate``), and every identity key of ``corpus.json`` that differs is named
in the report (``summary["differs"]``), with the number of prompts fed differently (chat template,
system prompt) although their ``prompt`` is the same.  An answer that is a strict prefix of the
other side's does not diverge: the side that stopped first stopped for its own reason (its
length limit, ``length_limited``; another stop, ``stopped_first``), the tokens it has agree.

Both datasets are checked first: a known ``schema`` in ``corpus.json``, every part file with
the columns and types tracer writes, each prompt id once, each answer's steps rows matching its
``token_ids``, at least one prompt; anything else is one :class:`CorpusError`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..text import html_text, identifier_safe, terminal_safe
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


#: ``corpus.json`` keys named when they differ; ``settings`` is compared name by name after them.
_META_KEYS = ("engine", "model", "dtype", "chat", "system", "schema")
_ABSENT = object()


def known_schemas() -> tuple[str, ...]:
    """The dataset schemas (``corpus.json`` ``schema``) this tracer writes and compares."""
    from .engine import SCHEMA as HF_SCHEMA
    from .vllm_engine import SCHEMA as VLLM_SCHEMA

    return (HF_SCHEMA, VLLM_SCHEMA)


def _json(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def _same(a: Any, b: Any) -> bool:
    """JSON values equal (an absent key equals null; 1 equals 1.0; True does not equal 1)."""
    a, b = (None if a is _ABSENT else a), (None if b is _ABSENT else b)
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or (a != a and b != b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _differences(meta_a: dict[str, Any], meta_b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, value in A, value in B) for each identity key of the two ``corpus.json`` that
    differs; each generation setting by its own name (``settings.NAME``)."""
    out = []
    for key in _META_KEYS:
        a, b = meta_a.get(key, _ABSENT), meta_b.get(key, _ABSENT)
        if not _same(a, b):
            out.append((key, a, b))
    sa, sb = meta_a.get("settings", _ABSENT), meta_b.get("settings", _ABSENT)
    if isinstance(sa, dict) and isinstance(sb, dict):
        for name in sorted(set(sa) | set(sb), key=str):
            a, b = sa.get(name, _ABSENT), sb.get(name, _ABSENT)
            if not _same(a, b):
                out.append((f"settings.{name}", a, b))
    elif not _same(sa, sb):
        out.append(("settings", sa, sb))
    return out


@dataclass
class CorpusComparison:
    """Result of :func:`compare_datasets`: ``prompts`` (one row per prompt), ``histogram``
    (first-divergence positions), ``summary`` (overall figures) and the aligned texts.

    Per prompt: ``identical`` (the same tokens), ``first_divergence`` (the first position where
    both have a token and they differ; NA when none), ``cut_by`` ("A"/"B": that side's answer is
    a strict prefix of the other's, it stopped first, for ``cut_reason``), ``length_limited``
    (``cut_by`` and the reason is its length limit), ``fed_differs`` (the prompt text fed to
    the model differs, e.g. a chat template or system prompt on one side only).
    ``differences``: (key, A's value, B's value) shown as JSON, for each ``corpus.json``
    identity key that differs (``summary["differs"]``: the same, raw values)."""

    name_a: str
    name_b: str
    prompts: Any  # pandas DataFrame
    histogram: Any  # pandas DataFrame: position, prompts
    summary: dict[str, Any]
    aligned: dict[str, tuple[str, str, str]]  # prompt id -> (shared prefix, rest of a, rest of b)
    differences: list[tuple[str, str, str]] = field(default_factory=list)

    def most_different(self, n: int = 10):
        """The ``n`` prompts that differ most: earliest divergence, then fewest agreeing positions
        (prompts whose answers only stop at different points are not among them)."""
        df = self.prompts[self.prompts["first_divergence"].notna()].copy()
        return df.sort_values(["first_divergence", "identical_fraction"]).head(n)

    def differs_line(self, html: bool = False) -> str:
        """One line naming what differs between the two runs ("" when nothing does): each
        identity key with both values (as JSON), and how many prompts were fed differently;
        dataset text escaped for the terminal (or for HTML: ``html=True``)."""
        def value(v: str) -> str:
            return html_text(v if len(v) <= 200 else v[:199] + "…") if html else terminal_safe(v, 60)

        parts = [f"{value(key.removeprefix('settings.'))} {value(a)} vs {value(b)}" for key, a, b in self.differences]
        fed = self.summary.get("prompts_fed_differ", 0)
        if fed:
            parts.append(f"prompts fed differ for {fed} prompt(s) (chat template / system)")
        return "settings differ: " + "; ".join(parts) if parts else ""

    def _counts(self) -> list[str]:
        """``identical up to A's length limit: 2`` ... (the cases where one answer stopped first)."""
        df, out = self.prompts, []
        for side in ("A", "B"):
            n = int((df["cut_by"].eq(side) & df["length_limited"]).sum())
            if n:
                out.append(f"identical up to {side}'s length limit: {n}")
        for side in ("A", "B"):
            other = df[df["cut_by"].eq(side) & ~df["length_limited"]]
            if len(other):
                reasons = sorted({str(r).split(":")[0] if r is not None else "unknown" for r in other["cut_reason"]})
                out.append(f"identical until {side} stopped first ({', '.join(reasons)}): {len(other)}")
        return out

    def text(self, n: int = 5) -> str:
        s = self.summary
        counts = "".join(", " + terminal_safe(c) for c in self._counts())
        lines = [f"corpus compare: A = {identifier_safe(self.name_a)}, B = {identifier_safe(self.name_b)}"]
        differs = self.differs_line()
        if differs:
            lines.append(differs)
        lines += [f"prompts: {s['prompts']}, identical answers: {s['identical']} ({s['identical_fraction']:.1%})"
                  f"{counts}, diverging: {s['diverging']} (near-ties: {s['near_ties']})",
                  f"mean |Δ log-prob| on shared tokens: {s['mean_abs_dlogprob']:.4g}, max {s['max_abs_dlogprob']:.4g}; "
                  f"mean KL lower bound: {s['mean_kl_lb']:.4g} nats"]
        for _, row in self.most_different(n).iterrows():
            pre, ra, rb = self.aligned[row.prompt_id]
            lines.append(f"  prompt {identifier_safe(row.prompt_id, 40)}: diverges at token {row.first_divergence}"
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
                f"<tr><td>{esc(identifier_safe(r.prompt_id))}</td><td>{int(r.first_divergence)}</td>"
                f"<td>{r.identical_fraction:.2f}</td><td>{'yes' if r.near_tie else ''}</td>"
                f"<td>{esc(r.prompt)}</td><td class='t'><span class='pre'>{esc(pre)}</span>"
                f"<span class='a'>{esc(ra)}</span></td><td class='t'><span class='pre'>{esc(pre)}</span>"
                f"<span class='b'>{esc(rb)}</span></td></tr>")
        differs = self.differs_line(html=True)
        differs = f"<p class='differ'>{differs}</p>" if differs else ""
        counts = "".join(f"<li>{esc(c)}</li>" for c in self._counts())
        page = f"""<!doctype html><html><head><meta charset="utf-8"><title>corpus compare</title>
<style>body{{font-family:system-ui,"Noto Sans CJK SC","PingFang SC","Microsoft YaHei",sans-serif;margin:1.5em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 6px;vertical-align:top}}
.bar{{background:#4a7fd0;height:12px}}.t{{white-space:pre-wrap;max-width:28em}}.pre{{color:#888}}
.a{{background:#fde2e2}}.b{{background:#dff5e1}}.differ{{background:#fff3cd;padding:4px}}</style></head><body>
<h1>Corpus comparison</h1><p>A: <code>{esc(identifier_safe(self.name_a))}</code><br>B: <code>{esc(identifier_safe(self.name_b))}</code></p>{differs}
<ul><li>prompts: {s['prompts']}; identical answers: {s['identical']} ({s['identical_fraction']:.1%})</li>{counts}
<li>diverging: {s['diverging']}; near-tie divergences: {s['near_ties']}</li>
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


def _check_files(ds: CorpusDataset) -> None:
    """``ds``'s ``corpus.json`` names a schema this tracer knows, and each of its part files holds
    every column tracer writes with the type tracer writes (more columns are let be)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .rows import table_schemas

    known = known_schemas()
    schema = ds.meta.get("schema", _ABSENT)
    if not isinstance(schema, str) or schema not in known:
        raise CorpusError(f"dataset {ds.path} has schema {_json(schema)} in its corpus.json, which this tracer "
                          f"cannot read (it reads {', '.join(known)})")
    for table, expected in zip(("steps", "sequences"), table_schemas()):
        for f in ds.files(table):
            where = f"dataset {ds.path}: {table}/{Path(f).name}"
            try:
                got = pq.read_schema(f)
            except (OSError, pa.ArrowException) as exc:
                raise CorpusError(f"{where} is not a readable Parquet file ({exc})") from None
            for col in expected:
                found = got.get_all_field_indices(col.name)
                if not found:
                    raise CorpusError(f"{where} has no column {col.name!r} (schema {schema} has it)")
                if len(found) > 1:
                    raise CorpusError(f"{where} holds the column {col.name!r} {len(found)} times")
                kind = got.field(found[0]).type
                if not kind.equals(col.type):
                    raise CorpusError(f"{where}: column {col.name!r} holds {kind}, not {col.type} as schema "
                                      f"{schema} has it")


def _sequences(ds: CorpusDataset):
    """``ds``'s sequences (pandas, indexed by prompt id), after :func:`_check_files`; refused
    when there is no prompt, a prompt id repeats, or an id or answer is missing."""
    import pyarrow.compute as pc

    table = ds.arrow("sequences")
    if table.num_rows == 0:
        raise CorpusError(f"dataset {ds.path} holds no prompts yet (no batch finished): nothing to compare")
    if table["prompt_id"].null_count:
        raise CorpusError(f"dataset {ds.path} holds {table['prompt_id'].null_count} row(s) without a prompt id")
    if table["token_ids"].null_count or pc.list_flatten(table["token_ids"]).null_count:
        raise CorpusError(f"dataset {ds.path} holds an answer without its token ids (token_ids null)")
    df = table.to_pandas()
    repeated = df["prompt_id"][df["prompt_id"].duplicated()]
    if len(repeated):
        pid = repeated.iloc[0]
        raise CorpusError(f"dataset {ds.path} holds prompt id {pid!r} {int((df['prompt_id'] == pid).sum())} times "
                          f"({repeated.nunique()} id(s) repeated; two runs writing into it at once?)")
    return df.set_index("prompt_id")


def _steps_by_prompt(ds: CorpusDataset, seqs: Any) -> dict[str, dict[str, list]]:
    """Each prompt's steps rows (by step), checked against its answer: one row per generated
    token, with the answer's token ids (``seqs``: :func:`_sequences`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .rows import table_schemas

    tables = [pq.read_table(f, columns=_STEP_COLS) for f in ds.files("steps")]
    table = pa.concat_tables(tables) if tables else table_schemas()[0].empty_table().select(_STEP_COLS)
    table = table.sort_by([("prompt_id", "ascending"), ("step", "ascending")])
    for c in _STEP_COLS:
        if table[c].null_count:
            raise CorpusError(f"dataset {ds.path} holds {table[c].null_count} steps row(s) without a {c}")
    cols = {c: table[c].to_pylist() for c in _STEP_COLS}
    out: dict[str, dict[str, list]] = {}
    for i, pid in enumerate(cols["prompt_id"]):
        d = out.setdefault(pid, {c: [] for c in _STEP_COLS[1:]})
        for c in _STEP_COLS[1:]:
            d[c].append(cols[c][i])
    for pid, ids in seqs["token_ids"].items():
        got = out.get(pid, {}).get("token_id", [])
        if list(map(int, ids)) != got:
            other = ", other tokens" if len(got) == len(ids) else ""
            raise CorpusError(f"dataset {ds.path}: the steps rows of prompt id {pid!r} do not match its answer "
                              f"({len(ids)} token(s), {len(got)} steps row(s){other})")
    return out


def compare_datasets(a: str | Path | CorpusDataset, b: str | Path | CorpusDataset, *,
                     tie_margin: float = 0.1) -> CorpusComparison:
    """Compare two datasets of the same prompt ids (A against B; see the module doc)."""
    import pandas as pd

    da = a if isinstance(a, CorpusDataset) else open_dataset(a)
    db = b if isinstance(b, CorpusDataset) else open_dataset(b)
    _check_files(da)
    _check_files(db)
    sa, sb = _sequences(da), _sequences(db)
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
    steps_a, steps_b = _steps_by_prompt(da, sa), _steps_by_prompt(db, sb)
    same_engine = _same(da.meta.get("engine", _ABSENT), db.meta.get("engine", _ABSENT))
    rows, aligned, all_d, all_kl = [], {}, [], []
    for pid in ids_a:
        ta, tb = [int(t) for t in sa.at[pid, "token_ids"]], [int(t) for t in sb.at[pid, "token_ids"]]
        xa, xb = steps_a.get(pid), steps_b.get(pid)
        n = min(len(ta), len(tb))
        d = next((i for i in range(n) if ta[i] != tb[i]), n)
        identical = ta == tb
        # one answer a strict prefix of the other: that side stopped first, the tokens both have agree
        cut_by = None if identical or d < n else ("A" if len(ta) < len(tb) else "B")
        stop_a, stop_b = sa.at[pid, "stop_reason"], sb.at[pid, "stop_reason"]
        cut_reason = None if cut_by is None else (stop_a if cut_by == "A" else stop_b)
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
        # the prompt as fed (chat template, system prompt): its token count tells across engines
        # (both feed the same tokens; vLLM's text is decoded back), its text within one engine
        fed_a, fed_b = sa.at[pid, "prompt_text"], sb.at[pid, "prompt_text"]
        n_a, n_b = sa.at[pid, "prompt_tokens"], sb.at[pid, "prompt_tokens"]
        fed_differs = bool((not pd.isna(n_a) and not pd.isna(n_b) and n_a != n_b)
                           or (same_engine and isinstance(fed_a, str) and isinstance(fed_b, str) and fed_a != fed_b))
        rows.append({
            "prompt_id": pid, "prompt": sa.at[pid, "prompt"], "tokens_a": len(ta), "tokens_b": len(tb),
            "identical": identical, "first_divergence": None if identical or cut_by else d,
            "cut_by": cut_by, "cut_reason": cut_reason,
            "length_limited": cut_reason is not None and str(cut_reason) == "max_length",
            "identical_fraction": agree,
            "mean_abs_dlogprob": float(np.mean(dlp)) if dlp else float("nan"),
            "max_abs_dlogprob": float(np.max(dlp)) if dlp else float("nan"),
            "mean_kl_lb": float(np.mean(finite)) if finite else float("nan"),
            "near_tie": bool(near_tie), "margin_a": m_a, "margin_b": m_b,
            "stop_a": stop_a, "stop_b": stop_b, "fed_differs": fed_differs,
        })
    df = pd.DataFrame(rows)
    df["first_divergence"] = df["first_divergence"].astype("Int64")
    div = df.loc[df["first_divergence"].notna(), "first_divergence"].astype(int)
    hist = div.value_counts().sort_index().rename_axis("position").reset_index(name="prompts")
    differences = _differences(da.meta, db.meta)
    summary = {
        "prompts": len(df), "identical": int(df["identical"].sum()),
        "identical_fraction": float(df["identical"].mean()) if len(df) else float("nan"),
        "diverging": int(len(div)),
        "length_limited": int(df["length_limited"].sum()),
        "stopped_first": int((df["cut_by"].notna() & ~df["length_limited"]).sum()),
        "near_ties": int(df["near_tie"].sum()),
        "mean_abs_dlogprob": float(np.mean(all_d)) if all_d else float("nan"),
        "max_abs_dlogprob": float(np.max(all_d)) if all_d else float("nan"),
        "mean_kl_lb": float(np.mean(all_kl)) if all_kl else float("nan"),
        "median_first_divergence": float(div.median()) if len(div) else float("nan"),
        "differs": {key: (None if va is _ABSENT else va, None if vb is _ABSENT else vb) for key, va, vb in differences},
        "prompts_fed_differ": int(df["fed_differs"].sum()),
    }
    return CorpusComparison(str(da.path), str(db.path), df, hist, summary, aligned,
                            [(key, _json(va), _json(vb)) for key, va, vb in differences])
