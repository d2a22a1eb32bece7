"""Traces of llama.cpp (``llama-cpp-python``) generation, in the record format of HF traces.

>>> from llama_cpp import Llama
>>> llm = Llama(model_path="model.gguf", n_ctx=2048, verbose=False)
>>> [trace] = tracer.llamacpp_generate(llm, prompt_ids, max_tokens=64, temperature=0.0)

The tracer drives llama.cpp itself, exactly as ``Llama.generate`` / ``create_completion`` do
(same prefix reuse, same ``eval`` batches, same sampler chain built from the same settings,
same stop rules), with one difference that changes nothing: instead of
``llama_sampler_sample(chain, ctx, -1)`` it runs that function's body in Python — the raw logit
row (``llama_get_logits_ith``) into a token-data array, each sampler of the chain applied in
turn (``llama_sampler_apply``, what the chain's own apply loops over), the token at
``selected``, then ``llama_sampler_accept`` on the chain — and reads the array after each
sampler.  So every stage is llama.cpp's own output and the chosen token is llama.cpp's pick;
tests hold the tokens equal to untraced ``create_completion`` and ``generate`` runs.

Settings are ``create_completion``'s, with its defaults (``max_tokens=16, temperature=0.8,
top_k=40, top_p=0.95, min_p=0.05, typical_p=1.0, repeat_penalty=1.0, ...``), plus
``order="transformers"`` (samplers in ``generate``'s order: penalties, temperature, top-k,
top-p, min-p; used by ``tracer run --engine llama.cpp`` so its flags mean what they mean on
``generate``) and ``penalty_last_n`` / ``penalize_prompt`` (transformers' repetition penalty
covers the prompt and every generated token; llama-cpp-python's the last 64 generated ones).

llama-cpp-python is imported only inside these functions; :mod:`.llamacpp_convert` builds the
records and imports no llama.cpp.
"""

from __future__ import annotations

import random
import time
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .. import records as _records
from ..config import RecordConfig
from ..records import NotSupportedError, StopReason, Trace
from .llamacpp_chain import Sampler, build_chain
from .llamacpp_convert import NOT_RECORDED, LlamaCppFacts, StepCapture, trace_from_steps

INSTALL_HINT = "pip install 'tracer[llamacpp]' (builds llama.cpp from source, ~6 min)"
UNSUPPORTED = {  # RecordConfig field -> why the llama.cpp backend cannot record it
    "attention": "attention maps (llama.cpp keeps them inside its graph)",
    "modules": "residual-stream norms (hidden states stay inside llama.cpp)",
    "logit_lens": "the logit lens (hidden states stay inside llama.cpp)",
    "hidden_layers": "hidden vectors (hidden states stay inside llama.cpp)",
    "kv_layers": "key/value snapshots (llama.cpp's KV cells are not exposed per layer)",
}
ORDERS = ("llama.cpp", "transformers")
_EOG: "weakref.WeakKeyDictionary[Any, tuple[int, ...]]" = weakref.WeakKeyDictionary()

__all__ = ["llamacpp_generate", "llamacpp_complete", "Completion", "engine_facts", "check_record", "import_llama_cpp", "LlamaCppNotInstalledError",
           "INSTALL_HINT", "NOT_RECORDED", "default_gguf"]


class LlamaCppNotInstalledError(_records.TracerError, ImportError):
    """llama-cpp-python is not importable in this environment."""


def import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise LlamaCppNotInstalledError(
            f"llama-cpp-python is not installed ({exc}); install the extra: {INSTALL_HINT}") from exc
    return llama_cpp


def default_gguf() -> Any:
    """The embedded model's GGUF file (SmolLM2-135M-Instruct, Q4_1)."""
    from .. import models

    return models._embedded_gguf()


def check_record(record: RecordConfig) -> None:
    """Raise :class:`NotSupportedError` for what this backend cannot record (before generating)."""
    asked = [why for name, why in UNSUPPORTED.items() if getattr(record, name, None) not in (None, False, ())]
    if asked:
        raise NotSupportedError("the llama.cpp backend cannot record " + "; ".join(asked))


# --------------------------------------------------------------------------------------------
# Engine facts
# --------------------------------------------------------------------------------------------


def _eog_ids(llm: Any, lc: Any) -> tuple[int, ...]:
    key = llm._model
    try:
        return _EOG[key]
    except (KeyError, TypeError):
        pass
    vocab = llm._model.vocab
    ids = tuple(i for i in range(llm.n_vocab()) if lc.llama_vocab_is_eog(vocab, i))
    try:
        _EOG[key] = ids
    except TypeError:  # pragma: no cover - not weak-referenceable
        pass
    return ids


def engine_facts(llm: Any) -> LlamaCppFacts:
    """What the traces say about ``llm`` (version, GGUF metadata, context, terminators)."""
    lc = import_llama_cpp()
    md = {str(k): str(v) for k, v in (getattr(llm, "metadata", None) or {}).items()}
    arch = md.get("general.architecture", "")

    def num(key: str) -> int:
        try:
            return int(md.get(f"{arch}.{key}", 0))
        except ValueError:
            return 0

    path = str(getattr(llm, "model_path", ""))
    gguf_name = md.get("general.name", "")
    try:  # the name the generate path records for the same GGUF (not the GGUF's own general.name)
        from ..models import gguf_model_name

        name = gguf_model_name(path) if path else ""
    except OSError:
        name = ""
    versions = {}
    try:
        import numpy

        versions["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover
        pass
    return LlamaCppFacts(
        version=str(getattr(lc, "__version__", "")),
        model_path=path,
        model_name=name or gguf_name or path.replace("\\", "/").rsplit("/", 1)[-1],
        gguf_name=gguf_name,
        architecture=arch,
        n_vocab=int(llm.n_vocab()),
        n_ctx=int(llm.n_ctx()),
        n_batch=int(getattr(llm, "n_batch", 0) or 0),
        n_threads=int(getattr(getattr(llm, "context_params", None), "n_threads", 0) or 0),
        num_layers=num("block_count"),
        num_heads=num("attention.head_count"),
        num_kv_heads=num("attention.head_count_kv") or num("attention.head_count"),
        hidden_size=num("embedding_length"),
        file_type=_file_type(md.get("general.file_type", "")),
        eog_ids=_eog_ids(llm, lc),
        eos_id=int(llm.token_eos()),
        metadata={k: v for k, v in md.items() if not k.startswith("tokenizer.")},
        versions=versions,
    )


_FILE_TYPES = {"0": "F32", "1": "F16", "2": "Q4_0", "3": "Q4_1", "7": "Q8_0", "8": "Q5_0", "9": "Q5_1",
               "10": "Q2_K", "12": "Q3_K_M", "15": "Q4_K_M", "17": "Q5_K_M", "18": "Q6_K", "32": "BF16"}


def _file_type(code: str) -> str:
    return _FILE_TYPES.get(code, f"file_type {code}" if code else "")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _prompt_lists(llm: Any, prompts: Any) -> list[list[int]]:
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and all(isinstance(t, (int, np.integer)) for t in prompts)):
        prompts = [prompts]
    out = []
    for p in prompts:
        if isinstance(p, str):  # as create_completion tokenizes a text prompt
            bos = [llm.token_bos()] if llm._model.add_bos_token() and llm.token_bos() != -1 else []
            out.append(bos + llm.tokenize(p.encode("utf-8"), add_bos=False, special=True))
        else:
            out.append([int(t) for t in np.asarray(p).ravel()])
    if not out or any(not p for p in out):
        raise ValueError("empty prompt")
    return out


def llamacpp_generate(
    llm: Any,
    prompts: Any,
    *,
    record: RecordConfig | None = None,
    max_tokens: int | None = 16,
    temperature: float = 0.8,
    top_k: int = 40,
    top_p: float = 0.95,
    min_p: float = 0.05,
    typical_p: float = 1.0,
    repeat_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    stop: str | Sequence[str] | None = None,
    seed: int | None = None,
    order: str = "llama.cpp",
    penalty_last_n: int | None = None,
    penalize_prompt: bool = False,
    prompt_texts: Sequence[str] | None = None,
    on_token: Any = None,
) -> list[Trace]:
    """Generate with ``llm`` (a ``llama_cpp.Llama``) and return one :class:`Trace` per prompt.

    ``prompts``: token ids (a list of ints), a text (tokenized as ``create_completion`` does),
    or a list of either.  Prompts run one after another on the same context, each reusing the
    longest prefix already evaluated (as ``create_completion`` does; ``trace.cache.reused_len``
    says how many).  Sampling settings are ``create_completion``'s (see the module doc);
    ``on_token(step, token_id)`` is called after each step (progress)."""
    return _generate(llm, prompts, record=record, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                     top_p=top_p, min_p=min_p, typical_p=typical_p, repeat_penalty=repeat_penalty,
                     frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, stop=stop, seed=seed,
                     order=order, penalty_last_n=penalty_last_n, penalize_prompt=penalize_prompt,
                     prompt_texts=prompt_texts, on_token=on_token, traced=True)


def llamacpp_complete(llm: Any, prompts: Any, **settings: Any) -> list[Completion]:
    """:func:`llamacpp_generate`'s run without recording (the same loop, the same tokens; no
    snapshots, no row copies): one :class:`Completion` per prompt (``tracer run --no-trace``)."""
    return _generate(llm, prompts, traced=False, **settings)


def _generate(llm: Any, prompts: Any, *, record: RecordConfig | None = None, max_tokens: int | None = 16,
              temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
              typical_p: float = 1.0, repeat_penalty: float = 1.0, frequency_penalty: float = 0.0,
              presence_penalty: float = 0.0, stop: Any = None, seed: int | None = None, order: str = "llama.cpp",
              penalty_last_n: int | None = None, penalize_prompt: bool = False, prompt_texts: Any = None,
              on_token: Any = None, traced: bool = True) -> list[Any]:
    lc = import_llama_cpp()
    record = record or RecordConfig()
    check_record(record)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    if isinstance(stop, str):
        stop = [stop]
    stops = [s for s in (stop or []) if s]
    facts = engine_facts(llm)
    lists = _prompt_lists(llm, prompts)
    texts = list(prompt_texts) if prompt_texts is not None else [None] * len(lists)
    traces = []
    for ids, text in zip(lists, texts):
        settings = {
            "max_tokens": max_tokens, "temperature": float(temperature), "top_k": int(top_k), "top_p": float(top_p),
            "min_p": float(min_p), "typical_p": float(typical_p), "repeat_penalty": float(repeat_penalty),
            "frequency_penalty": float(frequency_penalty), "presence_penalty": float(presence_penalty),
            "stop": list(stops), "order": order, "penalize_prompt": bool(penalize_prompt),
            "penalty_last_n": int(llm.last_n_tokens_size if penalty_last_n is None else penalty_last_n),
        }
        traces.append(_run(lc, llm, ids, text, settings, seed, record, facts, on_token, traced))
    return traces


def _kv_cells(lc: Any, llm: Any) -> int:
    mem = lc.llama_get_memory(llm.ctx)
    return int(lc.llama_memory_seq_pos_max(mem, 0)) + 1 if mem is not None else int(llm.n_tokens)


def _reuse_prefix(llm: Any, tokens: list[int]) -> tuple[list[int], int]:
    """``Llama.generate``'s prefix reuse: (tokens still to evaluate, tokens reused)."""
    reset, reused = True, 0
    if llm.n_tokens > 0:
        longest = 0
        for a, b in zip(llm._input_ids, tokens):
            if a != b:
                break
            longest += 1
        consumed = longest == len(tokens)
        if llm.n_tokens == len(tokens) and consumed and not llm._requires_eval:
            return [], len(tokens)
        keep = longest - 1 if consumed else longest
        if keep > 0 and llm._ctx.kv_cache_seq_rm(-1, keep, -1):
            reset, reused = False, keep
            tokens = tokens[keep:]
            llm.n_tokens = keep
            llm._requires_eval = True
    if reset:
        llm.reset()
    return tokens, reused


#: how the note on a max_tokens cut by the context begins (the CLI prints that note)
CONTEXT_CUT = "llama.cpp's context holds"


def _run(lc, llm, prompt, prompt_text, settings, seed, record, facts, on_token, traced=True) -> Any:
    n_ctx = int(llm.n_ctx())
    if len(prompt) >= n_ctx:
        raise ValueError(f"Requested tokens ({len(prompt)}) exceed context window of {n_ctx}")
    asked = max_tokens = settings["max_tokens"]
    if max_tokens is None or max_tokens <= 0:
        max_tokens = n_ctx - len(prompt)
    max_tokens = max_tokens if max_tokens + len(prompt) < n_ctx else n_ctx - len(prompt)
    cut = (f"{CONTEXT_CUT} {n_ctx} tokens: with the {len(prompt)} prompt tokens, max_tokens {asked} "
           f"was cut to {max_tokens} (create_completion's rule)") if asked and asked > max_tokens else None
    # create_completion's seed rule (seed None: the next one drawn from the Llama's own seed)
    llm.set_seed(seed if seed is not None else random.Random(llm._seed).randint(0, 2**32))
    settings = {**settings, "seed": int(llm._seed), "max_tokens": int(max_tokens)}
    chain, spec = build_chain(llm, settings)
    try:
        sampler = Sampler(lc, chain, spec, int(llm.n_vocab()), traced=traced)
        if settings["penalize_prompt"]:
            for t in prompt:
                lc.llama_sampler_accept(chain.sampler, int(t))
        notes: list[str] = [cut] if cut else []
        llama_seed = None  # the seed of llama.cpp's dist sampler; None when the chain has none (greedy)
        if spec[-1][0] == "dist":  # the seed dist really uses (llama.cpp draws one for LLAMA_DEFAULT_SEED)
            settings["seed"] = llama_seed = int(lc.llama_sampler_get_seed(chain.sampler))
            if seed is not None and int(seed) == lc.LLAMA_DEFAULT_SEED:
                notes.append(f"seed {seed} is llama.cpp's LLAMA_DEFAULT_SEED ('draw a random seed'): "
                             f"llama.cpp's dist sampler drew seed {settings['seed']}, recorded as the seed")
        else:  # greedy: no sampler draws a random number; the chain's "seed" would be the sentinel
            settings["seed"] = None if seed is None else int(seed)
            notes.append("greedy: llama.cpp's greedy sampler draws no random number, so the seed "
                         + (f"given ({settings['seed']}) changes nothing" if seed is not None else "does not apply (none given)"))
        stop_bytes = [s.encode("utf-8") for s in settings["stop"]]
        pieces: dict[int, bytes] = {}  # each token's bytes, specials rendered (the trace's token texts)
        plain: dict[int, bytes] = {}  # ... specials not rendered (the answer's text)
        start = time.perf_counter()
        tokens, reused = _reuse_prefix(llm, list(prompt))
        captures: list[StepCapture] = []
        completion: list[int] = []
        reason: StopReason | None = StopReason("max_length")
        text = b""
        multibyte_fix = 0
        status, error = "complete", None
        vocab = llm._model.vocab
        try:
            while True:
                before = int(llm.n_tokens)  # n_past: eval drops the cells from here on first
                t0 = time.perf_counter()
                llm.eval(tokens)
                t1 = time.perf_counter()
                raw = np.ctypeslib.as_array(lc.llama_get_logits_ith(llm.ctx, -1), shape=(sampler.vocab,))
                if traced:
                    raw = raw.copy()
                token, snaps = sampler.sample(raw)
                t2 = time.perf_counter()
                captures.append(StepCapture(fed=list(tokens), cache_len_before=before,
                                            kv_cells=_kv_cells(lc, llm) if traced else 0, raw=raw if traced else None,
                                            snapshots=snaps, chosen=token, selector=spec[-1][0], eval_s=t1 - t0,
                                            sample_s=t2 - t1))
                if on_token is not None:
                    on_token(len(captures) - 1, token)
                tokens = [token]
                if lc.llama_vocab_is_eog(vocab, token):  # create_completion's loop, rule for rule
                    text = _text(llm, completion, plain)
                    reason = StopReason("eos", token, _piece(llm, token, pieces).decode("utf-8", "replace"))
                    break
                completion.append(token)
                all_text = _text(llm, completion, plain)
                for k, char in enumerate(all_text[-3:]):
                    k = 3 - k
                    for num, pattern in [(2, 192), (3, 224), (4, 240)]:
                        if num > k and pattern & char == pattern:
                            multibyte_fix = num - k
                if multibyte_fix > 0:
                    multibyte_fix -= 1
                    continue
                hits = [s for s in stop_bytes if s in all_text]
                if hits:
                    text = all_text[: all_text.index(hits[0])]
                    reason = StopReason("stop_string", None, hits[0].decode("utf-8", "replace"))
                    break
                if len(completion) >= max_tokens:
                    text = _text(llm, completion, plain)
                    break
        except KeyboardInterrupt:
            if not traced:
                raise
            status, reason = "interrupted", None
            text = _text(llm, completion, plain)
            raise InterruptedRun(_finish(llm, captures, facts, prompt, prompt_text, settings, reason, text, pieces,
                                       record, reused, start, status, error, notes, llama_seed)) from None
        if not traced:
            return Completion([c.chosen for c in captures], bytes(text).decode("utf-8", errors="ignore"), reason,
                              time.perf_counter() - start, reused, (cut,) if cut else ())
        return _finish(llm, captures, facts, prompt, prompt_text, settings, reason, text, pieces, record, reused,
                       start, status, error, notes, llama_seed)
    finally:
        chain.close()


@dataclass(frozen=True)
class Completion:
    """An untraced run (:func:`llamacpp_complete`): the tokens chosen (a final end-of-generation
    token included), the text as ``create_completion`` returns it, why it stopped."""

    tokens: list[int]
    text: str
    stop_reason: StopReason
    time_s: float
    reused: int
    notes: tuple[str, ...] = ()  # the max_tokens cut, as the trace notes it


class InterruptedRun(KeyboardInterrupt):
    """Ctrl-C during a traced run: ``.trace`` holds the steps so far (``meta.status`` "interrupted")."""

    def __init__(self, trace: Trace):
        super().__init__("interrupted")
        self.trace = trace


def _piece(llm: Any, token: int, cache: dict[int, bytes], special: bool = True) -> bytes:
    """A token's bytes as llama-cpp-python's ``LlamaModel.detokenize`` makes them (what
    create_completion's text is made of), without its 32-byte buffer: a longer piece (llama.cpp
    returns minus its length: 47 tokens of the embedded vocabulary, runs of spaces, '#', '-')
    came back empty there."""
    if token not in cache:
        import ctypes

        import llama_cpp

        vocab, size = llm._model.vocab, 64
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(vocab, llama_cpp.llama_token(int(token)), buf, size, 0, special)
            if n >= 0:
                break
            size = -n
        cache[token] = buf.raw[:max(n, 0)]
    return cache[token]


def _text(llm: Any, tokens: Sequence[int], cache: dict[int, bytes]) -> bytes:
    """``llm.detokenize(tokens)`` (specials not rendered; a leading space after a first BOS dropped),
    each piece whole (:func:`_piece`)."""
    out = b"".join(_piece(llm, t, cache, special=False) for t in tokens)
    return out[1:] if tokens and tokens[0] == llm.token_bos() and out[:1] == b" " else out


def _finish(llm, captures, facts, prompt, prompt_text, settings, reason, text, pieces, record, reused, start,
            status, error, notes=(), llama_seed=None) -> Trace:
    info = {"llama_seed": llama_seed, "finish_reason": "length" if reason == "max_length" else
            (None if reason is None else "stop"), "completion_tokens": sum(1 for c in captures
                                                                           if c is not captures[-1] or reason is None
                                                                           or reason.kind != "eos")}
    return trace_from_steps(
        captures, facts=facts, prompt_ids=prompt, prompt_text=prompt_text, settings=settings, stop=reason,
        output_text=bytes(text).decode("utf-8", errors="ignore"), token_piece=lambda i: _piece(llm, i, pieces),
        record=record, reused=reused, info=info, wall_time_s=time.perf_counter() - start, status=status, error=error,
        notes=notes,
    )
