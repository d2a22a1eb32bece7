"""Attention views: head grid, one head across steps, GQA groups, sinks and head statistics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from ..records import Trace

from ..records import TraceFormatError
from ..text import token_pieces
from .shared import backend_of, missing_note, whole_maps
from ._common import (
    CLASSES,
    annotate_cells,
    check_step,
    new_figure,
    figure_png,
)

# --------------------------------------------------------------------------------------
# 2. Attention grid
# --------------------------------------------------------------------------------------


def _require_attention(trace: Trace) -> None:
    if not trace.attention_layers or not trace.attention_heads:
        what = "attention maps" + (" (RecordConfig(attention=True))" if backend_of(trace) == "transformers" else "")
        raise KeyError(missing_note(trace, what))


def _position_labels(trace: Trace, seq: int, n: int) -> list[str]:
    """One label per key position: "·" for padding, the token's display (characters split
    over tokens shown whole on the completing token, see :mod:`tracer.text`) otherwise."""
    ids = [int(i) for i in trace.sequences[seq][:n]]
    mask = trace.prompt_mask[seq]
    real = [j for j in range(len(ids)) if not (j < min(trace.prompt_len, len(mask)) and not mask[j])]
    labels = ["·"] * len(ids)
    for j, shown in zip(real, token_pieces(trace, [ids[j] for j in real])):
        labels[j] = shown
    return labels + [""] * (n - len(labels))


def attention_maps(
    trace: Trace,
    step: int = 0,
    seq: int = 0,
    *,
    kv_heads: bool = False,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, list[int], list[int]]:
    """`(L, N, T, T)` assembled maps up to ``step`` (``T = P + step``), the layer list and the
    head list (query heads, or KV heads when ``kv_heads``: the mean of the recorded query heads
    that read each KV head).  Each step's blob of each layer is read once (for all heads)."""
    _require_attention(trace)
    check_step(trace, step)
    layers = list(trace.attention_layers if layers is None else layers)
    recorded = list(trace.attention_heads)
    if kv_heads:
        kv_of = list(trace.kv_head_of)
        if any(not 0 <= h < len(kv_of) for h in recorded):
            raise TraceFormatError(f"kv_head_of {kv_of} does not cover the recorded heads {recorded}")
        groups: dict[int, list[int]] = {}
        for i, h in enumerate(recorded):
            groups.setdefault(int(kv_of[h]), []).append(i)
        names = sorted(groups) if heads is None else [k for k in sorted(groups) if k in heads]
        qheads = None
    else:
        qheads = recorded if heads is None else list(heads)
    out = []
    for i, layer in enumerate(layers):
        maps = whole_maps(trace, layer, seq, upto_step=step, heads=qheads)
        if kv_heads:
            maps = np.stack([maps[groups[k]].mean(axis=0) for k in names]) if names else maps[:0]
        if out and maps.shape[1:] != out[0].shape[1:]:
            raise TraceFormatError(f"attention maps of layer {layer} have shape {maps.shape[1:]}, "
                                   f"layer {layers[0]} {out[0].shape[1:]}")
        out.append(maps)
        if progress is not None:
            progress(i + 1, len(layers))
    stacked = np.stack(out) if out else np.zeros((0, 0, 0, 0), np.float32)
    return stacked.astype(np.float32, copy=False), layers, (names if kv_heads else list(qheads or []))


def attention_grid_figure(
    trace: Trace,
    step: int = 0,
    seq: int = 0,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    *,
    kv_heads: bool = False,
    progress: Callable[[int, int], None] | None = None,
    maps: tuple[np.ndarray, list[int], list[int]] | None = None,
) -> Figure:
    """Small multiples, layers × heads, of the maps assembled up to ``step`` (or of ``maps``,
    the result of :func:`attention_maps`, so a widget draws what it already read)."""
    if maps is None:
        maps = attention_maps(trace, step, seq, kv_heads=kv_heads, layers=layers, heads=heads, progress=progress)
    maps, lay, hs = maps
    nl, nh = maps.shape[:2]
    what = "KV heads (mean of query heads)" if kv_heads else "query heads"
    title = f"attention up to step {step}, seq {seq}\nlayers × {what}"
    if nl * nh > 48:
        return _mosaic_figure(maps, lay, hs, title, "kv" if kv_heads else "h")
    cell = 1.3
    fig = new_figure(figsize=(max(4.5, cell * nh + 1.2), cell * nl + 1.0), layout="constrained")
    axes = fig.subplots(nl, nh, squeeze=False)
    im = None
    for i in range(nl):
        for j in range(nh):
            ax = axes[i, j]
            im = ax.imshow(maps[i, j], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"{'kv' if kv_heads else 'h'}{hs[j]}", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"L{lay[i]}", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.6, label="attention weight")
    fig.suptitle(title, fontsize=10)
    return fig


def _mosaic_figure(maps: np.ndarray, layers: list[int], heads: list[int], title: str, prefix: str) -> Figure:
    """Many small multiples as one image (one ``imshow`` instead of hundreds of axes)."""
    nl, nh, t, _ = maps.shape
    gap = max(1, t // 8)
    big = np.full((nl * (t + gap) - gap, nh * (t + gap) - gap), np.nan, dtype=np.float32)
    for i in range(nl):
        for j in range(nh):
            big[i * (t + gap) : i * (t + gap) + t, j * (t + gap) : j * (t + gap) + t] = maps[i, j]
    fig = new_figure(figsize=(min(16.0, 0.7 * nh + 2.5), min(40.0, 0.7 * nl + 1.2)), layout="constrained")
    ax = fig.subplots()
    cmap = __import__("matplotlib").colormaps["viridis"].with_extremes(bad="white")
    im = ax.imshow(big, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    centers = np.arange(0, max(nl, nh)) * (t + gap) + (t - 1) / 2
    ax.set_xticks(centers[:nh], [f"{prefix}{h}" for h in heads], fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks(centers[:nl], [f"L{layer}" for layer in layers], fontsize=7)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.tick_params(length=0)
    fig.colorbar(im, ax=ax, shrink=0.3, label="attention weight")
    fig.suptitle(title, fontsize=10)
    return fig


def _map_axes(fig: Figure, ax: Any, m: np.ndarray, labels: list[str], title: str, prompt_len: int) -> None:
    im = ax.imshow(m, cmap="viridis", vmin=0, vmax=max(float(m.max()), 1e-6), interpolation="nearest")
    n = m.shape[0]
    every = max(1, int(np.ceil(n / 40)))
    ticks = np.arange(0, n, every)
    ax.set_xticks(ticks, [labels[t] for t in ticks], rotation=90, fontsize=7)
    ax.set_yticks(ticks, [labels[t] for t in ticks], fontsize=7)
    ax.axhline(prompt_len - 0.5, color="white", lw=0.6, ls="--")
    ax.set_xlabel("key (attended) token")
    ax.set_ylabel("query token")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8, label="attention weight")


def head_map_figure(trace: Trace, layer: int, head: int, seq: int = 0, *, upto_step: int | None = None, kv_heads: bool = False) -> Figure:
    """One head (or one KV head's group mean) across all steps (or up to ``upto_step``), with
    token labels; the dashed line separates the prompt (prefill) rows from decode rows."""
    _require_attention(trace)
    step = trace.num_steps - 1 if upto_step is None else upto_step
    maps, _, _ = attention_maps(trace, step, seq, kv_heads=kv_heads, layers=[layer], heads=[head])
    m = maps[0, 0]
    labels = _position_labels(trace, seq, m.shape[0])
    size = min(12.0, 2.5 + 0.22 * m.shape[0])
    fig = new_figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.subplots()
    kind = "KV head" if kv_heads else "head"
    _map_axes(fig, ax, m, labels, f"layer {layer}, {kind} {head}, seq {seq} (steps 0–{step})", trace.prompt_len)
    return fig


def attention_grid_class() -> type:
    import ipywidgets as W

    if "AttentionGrid" in CLASSES:
        return CLASSES["AttentionGrid"]

    class _AttentionGrid(W.VBox):
        """``.step`` slider, ``.mode`` toggle ("query heads" / "KV heads"), ``.pick`` dropdown
        of (layer, head), ``.progress``, ``.grid`` and ``.detail`` images; ``.maps`` holds the
        arrays on display `(L, N, T, T)`."""

        def __init__(self, trace: Trace, step: int = 0, seq: int = 0):
            _require_attention(trace)
            self.trace, self.seq = trace, seq
            self.step = W.IntSlider(value=step, min=0, max=trace.num_steps - 1, description="step", continuous_update=False)
            self.mode = W.ToggleButtons(options=["query heads", "KV heads"], value="query heads")
            self.pick = W.Dropdown(description="enlarge")
            self.progress = W.IntProgress(value=0, min=0, max=len(trace.attention_layers), description="rendering")
            self.status = W.Label()
            self.grid = W.Image(format="png")
            self.detail = W.Image(format="png")
            self.maps = np.zeros((0,))
            self._busy = False
            for w in (self.step, self.mode):
                w.observe(self._rebuild, names="value")
            self.pick.observe(self._redetail, names="value")
            super().__init__(
                [W.HBox([self.step, self.mode]), W.HBox([self.progress, self.status]), W.HBox([self.grid, W.VBox([self.pick, self.detail])])]
            )
            self._rebuild()

        @property
        def kv_mode(self) -> bool:
            return self.mode.value == "KV heads"

        def _tick(self, done: int, total: int) -> None:
            self.progress.max = total
            self.progress.value = done
            self.status.value = f"layer {done}/{total}"

        def _rebuild(self, *_: Any) -> None:
            t = self.trace
            self.progress.value = 0
            self.maps, self.layers, self.heads = attention_maps(t, self.step.value, self.seq, kv_heads=self.kv_mode, progress=self._tick)
            self.grid.value = figure_png(attention_grid_figure(t, self.step.value, self.seq, kv_heads=self.kv_mode,
                                                         maps=(self.maps, self.layers, self.heads)))
            kind = "kv" if self.kv_mode else "h"
            opts = [(f"L{layer} {kind}{h}", (layer, h)) for layer in self.layers for h in self.heads]
            old = self.pick.value
            self._busy = True
            self.pick.options = opts
            self.pick.value = old if old in dict(opts).values() else opts[0][1]
            self._busy = False
            self._redetail()
            self.status.value = "done"

        def _redetail(self, *_: Any) -> None:
            if self._busy or self.pick.value is None:
                return
            layer, h = self.pick.value
            m = self.maps[self.layers.index(layer), self.heads.index(h)]
            labels = _position_labels(self.trace, self.seq, m.shape[0])
            fig = new_figure(figsize=(min(9.0, 2.5 + 0.2 * m.shape[0]) + 1, min(9.0, 2.5 + 0.2 * m.shape[0])), layout="constrained")
            kind = "KV head" if self.kv_mode else "head"
            _map_axes(fig, fig.subplots(), m, labels, f"layer {layer}, {kind} {h}, step {self.step.value}", self.trace.prompt_len)
            self.detail.value = figure_png(fig)

    _AttentionGrid.__name__ = _AttentionGrid.__qualname__ = "AttentionGrid"
    CLASSES["AttentionGrid"] = _AttentionGrid
    return _AttentionGrid


def attention_grid(trace: Trace, step: int = 0, seq: int = 0) -> Any:
    """Layers × heads small multiples with a query-head / KV-head toggle and an enlarged view."""
    return attention_grid_class()(trace, step, seq)


# --------------------------------------------------------------------------------------
# 6. Attention sinks and head statistics
# --------------------------------------------------------------------------------------


def _head_means(trace: Trace, seq: int) -> tuple[dict[str, np.ndarray], list[int], list[int]]:
    """Per-(layer, head) means over decode steps of ``seq`` (the prefill if there are none)."""
    table = trace.attention_stats_table()
    with_stats = [s.index for s in trace.steps if s.attention_stats is not None]
    rows = [i for i, s in enumerate(with_stats) if s > 0 and trace.steps[s].active[seq]] or [0]
    means = {k: table[k][rows, :, seq, :].astype(np.float64).mean(axis=0) for k in ("entropy", "sink")}
    first = next(s for s in trace.steps if s.attention_stats is not None)
    layers = list(first.attention_stats.layers)  # type: ignore[union-attr]
    heads = list(trace.attention_heads) or list(range(means["sink"].shape[1]))
    return means, layers, heads


def attention_sinks_figure(trace: Trace, seq: int = 0) -> Figure:
    """Layer × head heatmap of the mean weight on the first attended key over decode steps."""
    means, layers, heads = _head_means(trace, seq)
    sink = means["sink"]
    fig = new_figure(figsize=(max(5.0, 0.45 * len(heads) + 2.2), max(3.2, 0.2 * len(layers) + 1.6)), layout="constrained")
    ax = fig.subplots()
    annotate_cells(ax, sink, "{:.2f}")
    im = ax.imshow(sink, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower", interpolation="nearest")
    ax.set_xticks(np.arange(len(heads)), [str(h) for h in heads], fontsize=8)
    every = max(1, int(np.ceil(len(layers) / 32)))
    ax.set_yticks(np.arange(0, len(layers), every), [str(layers[i]) for i in range(0, len(layers), every)], fontsize=8)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(f"attention sinks, seq {seq}\nmean weight on the first token over decode steps", fontsize=10)
    fig.colorbar(im, ax=ax, label="mean sink weight")
    return fig


def head_stats_text(trace: Trace, top: int = 10, seq: int = 0) -> str:
    """The heads with the lowest mean entropy (focused) and the highest mean sink weight."""
    means, layers, heads = _head_means(trace, seq)
    ent, sink = means["entropy"], means["sink"]
    cells = [(li, hi) for li in range(len(layers)) for hi in range(len(heads))]
    lines = [f"head statistics, seq {seq}, mean over decode steps (last query row)"]
    lines.append(f"lowest entropy (most focused), top {top}:")
    for li, hi in sorted(cells, key=lambda c: ent[c])[:top]:
        lines.append(f"  layer {layers[li]:>3} head {heads[hi]:>3}  entropy {ent[li, hi]:.3f} nats  sink {sink[li, hi]:.3f}")
    lines.append(f"highest sink weight, top {top}:")
    for li, hi in sorted(cells, key=lambda c: -sink[c])[:top]:
        lines.append(f"  layer {layers[li]:>3} head {heads[hi]:>3}  sink {sink[li, hi]:.3f}  entropy {ent[li, hi]:.3f} nats")
    return "\n".join(lines)
