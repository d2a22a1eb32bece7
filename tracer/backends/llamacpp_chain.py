"""llama.cpp's sampler chain, driven one sampler at a time (imports llama-cpp-python lazily).

:func:`build_chain` builds the chain ``Llama._init_sampler`` builds (or the same samplers in
``generate``'s order); :class:`Sampler` runs ``llama_sampler_sample``'s body in Python — the raw
row into a token-data array, each sampler of the chain applied in turn with
``llama_sampler_apply`` (what the chain's own apply loops over), the token at ``selected``,
``llama_sampler_accept`` on the chain — and snapshots the array after each sampler.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from .llamacpp_convert import SELECTORS, Snapshot

_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")], align=True)

__all__ = ["build_chain", "Sampler"]


def build_chain(llm: Any, s: dict[str, Any]) -> tuple[Any, list[tuple[str, dict[str, Any]]]]:
    """(a ``LlamaSampler`` chain, its samplers' (name, params)) for the settings ``s``.

    ``order="llama.cpp"`` is ``Llama._init_sampler``'s chain (what ``create_completion`` and
    ``generate`` build); ``"transformers"`` puts temperature first, as ``generate`` does."""
    from llama_cpp import _internals

    chain = _internals.LlamaSampler()
    spec: list[tuple[str, dict[str, Any]]] = []
    last_n = int(s["penalty_last_n"])
    chain.add_penalties(n_vocab=llm.n_vocab(), penalty_last_n=last_n, penalty_repeat=s["repeat_penalty"],
                        penalty_freq=s["frequency_penalty"], penalty_present=s["presence_penalty"])
    spec.append(("penalties", {"penalty_last_n": last_n, "repeat_penalty": s["repeat_penalty"],
                               "frequency_penalty": s["frequency_penalty"], "presence_penalty": s["presence_penalty"]}))
    temp, seed = float(s["temperature"]), int(s["seed"])
    if temp < 0.0:
        chain.add_dist(seed)
        spec.append(("dist", {"seed": seed}))
    elif temp == 0.0:
        chain.add_greedy()
        spec.append(("greedy", {}))
    elif s["order"] == "transformers":
        chain.add_temp(temp)
        spec.append(("temp", {"temperature": temp}))
        if s["top_k"] > 0:
            chain.add_top_k(int(s["top_k"]))
            spec.append(("top-k", {"top_k": int(s["top_k"])}))
        if s["typical_p"] < 1.0:
            chain.add_typical(s["typical_p"], 1)
            spec.append(("typical", {"typical_p": s["typical_p"]}))
        if s["top_p"] < 1.0:
            chain.add_top_p(s["top_p"], 1)
            spec.append(("top-p", {"top_p": s["top_p"]}))
        if s["min_p"] > 0.0:
            chain.add_min_p(s["min_p"], 1)
            spec.append(("min-p", {"min_p": s["min_p"]}))
        chain.add_dist(seed)
        spec.append(("dist", {"seed": seed}))
    else:  # Llama._init_sampler, mirostat aside
        chain.add_top_k(int(s["top_k"]))
        chain.add_typical(s["typical_p"], 1)
        chain.add_top_p(s["top_p"], 1)
        chain.add_min_p(s["min_p"], 1)
        chain.add_temp(temp)
        chain.add_dist(seed)
        spec += [("top-k", {"top_k": int(s["top_k"])}), ("typical", {"typical_p": s["typical_p"]}),
                 ("top-p", {"top_p": s["top_p"]}), ("min-p", {"min_p": s["min_p"]}), ("temp", {"temperature": temp}),
                 ("dist", {"seed": seed})]
    return chain, spec


_NO_IDS = np.zeros(0, np.int32)
_NO_LOGITS = np.zeros(0, np.float32)


class Sampler:
    """``llama_sampler_sample``'s body with a look at the array after each sampler."""

    def __init__(self, lc: Any, chain: Any, spec: list[tuple[str, dict[str, Any]]], vocab: int, traced: bool):
        self.lc, self.chain, self.spec, self.traced = lc, chain, spec, traced
        self.ptr = chain.sampler
        self.n = int(lc.llama_sampler_chain_n(self.ptr))
        if self.n != len(spec):
            raise RuntimeError(f"the sampler chain has {self.n} samplers, expected {len(spec)}")
        self.members = [lc.llama_sampler_chain_get(self.ptr, i) for i in range(self.n)]
        names = [lc.llama_sampler_name(m).decode() for m in self.members]
        # llama.cpp names a sampler "?name" when its settings make it a no-op
        self.spec = [(n.lstrip("?"), {**p, "active": not n.startswith("?")}) for n, (_, p) in zip(names, spec)]
        self.buf = np.zeros(vocab, _DATA)  # the token-data array (kept alive with the pointer below)
        self.ids = np.arange(vocab, dtype=np.int32)
        self.data_p = self.buf.ctypes.data_as(lc.llama_token_data_p)
        self.vocab = vocab
        self.array = lc.llama_token_data_array()
        self.array_p = ctypes.pointer(self.array)

    def _view(self) -> np.ndarray:
        arr = self.array
        n = int(arr.size)
        if n == 0:
            return np.zeros(0, _DATA)
        addr = ctypes.addressof(arr.data.contents)
        return np.frombuffer((ctypes.c_char * (n * _DATA.itemsize)).from_address(addr), dtype=_DATA, count=n)

    def sample(self, logits: np.ndarray) -> tuple[int, list[Snapshot]]:
        lc, buf = self.lc, self.buf
        buf["logit"] = logits
        buf["p"] = 0.0
        buf["id"] = self.ids  # samplers sort and truncate in place: refill all three fields
        arr = self.array
        arr.data = self.data_p
        arr.size = self.vocab
        arr.selected = -1
        arr.sorted = False
        snaps: list[Snapshot] = []
        prev_ids: np.ndarray | None = None
        prev_logits: np.ndarray | None = None
        last = len(self.members) - 1
        for j, (member, (name, params)) in enumerate(zip(self.members, self.spec)):
            lc.llama_sampler_apply(member, self.array_p)
            if self.traced and j == last and name in SELECTORS:
                # the pick is read from arr.selected; a selector's array is never a stage
                snaps.append(Snapshot(name, params, _NO_IDS, _NO_LOGITS, False))
            elif self.traced:
                view = self._view()
                ids, vals = view["id"].copy(), view["logit"].copy()  # int32, as llama.cpp holds them
                same = prev_ids is not None and prev_ids.shape == ids.shape and np.array_equal(prev_ids, ids) \
                    and np.array_equal(prev_logits, vals)
                if prev_ids is None:  # the first sampler against the raw row
                    same = ids.shape[0] == self.vocab and np.array_equal(vals, logits)
                snaps.append(Snapshot(name, params, ids, vals, bool(same)))
                prev_ids, prev_logits = ids, vals
        sel = int(arr.selected)
        if not 0 <= sel < int(arr.size):
            raise RuntimeError(f"the sampler chain selected no token (selected={sel}, size={arr.size})")
        token = int(arr.data[sel].id)
        lc.llama_sampler_accept(self.ptr, token)
        return token, snaps