"""Views build from a synthetic trace, react to their controls and show the recorded numbers."""

from __future__ import annotations

import html
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("ipywidgets")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

from tracer import viz  # noqa: E402
from tracer.testing import make_trace  # noqa: E402

ARTIFACTS = Path(__file__).parent / "_artifacts"


@pytest.fixture(scope="module")
def trace():
    return make_trace()


def _save(fig, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    fig.savefig(ARTIFACTS / name, dpi=100)


def test_module_imports_without_heavy_dependencies():
    code = (
        "import sys, tracer.viz\n"
        "bad = [m for m in ('torch', 'transformers', 'matplotlib', 'plotly', 'ipywidgets') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- 1. step explorer ------------------------------------------------------------------


def test_step_text_lists_inputs_processors_and_stop(trace):
    text = viz.step_text(trace, 0)
    assert "prefill" in text and "cache slots    [0, 1, 2, 3, 4]" in text
    assert "TemperatureLogitsWarper" in text and "TopKLogitsWarper" in text
    last = viz.step_text(trace, trace.num_steps - 1)
    assert "stop: eos:<|eot|>" in last
    assert "already finished" in viz.step_text(trace, trace.num_steps - 1, seq=1)


def test_step_explorer_slider_updates_panes(trace):
    w = viz.step_explorer(trace)
    assert isinstance(w, viz.StepExplorer)
    assert w.slider.max == trace.num_steps - 1
    before = (w.text_html.value, w.table_html.value, w.inputs_html.value)
    w.slider.value = 2
    after = (w.text_html.value, w.table_html.value, w.inputs_html.value)
    assert all(a != b for a, b in zip(after, before))
    chosen = int(trace.steps[2].chosen[0])
    assert html.escape(trace.token_text[chosen]) in w.text_html.value
    assert "cache slots written (computed)</th><td>[6]" in w.inputs_html.value
    w.slider.value = trace.num_steps - 1
    assert "stop" in w.table_html.value and "eos:&lt;|eot|&gt;" in w.table_html.value


def test_step_explorer_waterfall_follows_slider(trace):
    w = viz.step_explorer(trace)
    if not hasattr(w.waterfall, "data"):
        pytest.skip("plotly FigureWidget unavailable; PNG fallback in use")
    for step in (0, 3):
        w.slider.value = step
        assert w.children[-1] is w.waterfall  # the displayed waterfall is the current one
        chosen = int(trace.steps[step].chosen[0])
        for bar, stage in zip(w.waterfall.data, trace.steps[step].stages):
            np.testing.assert_allclose(bar.x, stage.top.probs[0], rtol=1e-6)
            # colours are part of the widget's initial state: the chosen token is highlighted
            expected = ["#e4572e" if int(i) == chosen else "#8da0cb" for i in stage.top.ids[0]]
            assert list(bar.marker.color) == expected


def test_processor_table_masked_counts(trace):
    w = viz.step_explorer(trace)
    for step in (0, 2):
        w.slider.value = step
        table = w.table_html.value
        rows = {e.name: e for e in trace.steps[step].processors}
        assert set(rows) == {"TemperatureLogitsWarper", "TopKLogitsWarper"}
        for name, effect in rows.items():
            row = table.split(f"<td>{name}</td>")[1].split("</tr>")[0]
            cells = [c.split("</td>")[0] for c in row.split("<td>")[1:]]
            assert int(cells[1]) == int(effect.newly_masked[0])
    topk = trace.steps[0].processors[1]
    assert int(topk.newly_masked[0]) == trace.meta.vocab_size - 8  # top_k=8 keeps 8 of 40


def test_processor_waterfall_figure(trace):
    fig = viz.processor_waterfall_figure(trace, 1)
    axes = fig.get_axes()
    assert len(axes) == len(trace.steps[1].stages)
    for ax, stage in zip(axes, trace.steps[1].stages):
        widths = [p.get_width() for p in ax.patches]
        np.testing.assert_allclose(widths, stage.top.probs[0], rtol=1e-6)
    _save(fig, "waterfall.png")


# -- 2. attention ------------------------------------------------------------------------


def test_attention_maps_kv_mode_averages_query_heads(trace):
    step = 3
    q, layers, heads = viz.attention_maps(trace, step, 0)
    kv, _, kv_heads = viz.attention_maps(trace, step, 0, kv_heads=True)
    assert heads == list(trace.attention_heads) and kv_heads == [0, 1]
    t = trace.prompt_len + step
    assert q.shape == (len(layers), 4, t, t) and kv.shape == (len(layers), 2, t, t)
    for li, layer in enumerate(layers):
        np.testing.assert_array_equal(q[li, 1], trace.head_map(layer, 1, 0, upto_step=step))
        for k in kv_heads:
            group = [h for h in trace.attention_heads if trace.kv_head_of[h] == k]
            expect = np.mean([trace.head_map(layer, h, 0, upto_step=step) for h in group], axis=0)
            np.testing.assert_allclose(kv[li, k], expect, rtol=1e-6)
    # decode rows come from the per-step single query rows
    np.testing.assert_allclose(q[0, 2, -1, :t], trace.attention(step, 0)[0, 2, 0].astype(np.float32))


def test_attention_grid_widget_modes(trace):
    w = viz.attention_grid(trace, step=2)
    assert w.maps.shape[:2] == (3, 4) and w.grid.value[:4] == b"\x89PNG"
    assert w.progress.value == w.progress.max == 3
    w.mode.value = "KV heads"
    assert w.maps.shape[:2] == (3, 2)
    np.testing.assert_allclose(
        w.maps[1, 0], (trace.head_map(1, 0, upto_step=2) + trace.head_map(1, 1, upto_step=2)) / 2, rtol=1e-6
    )
    old = w.detail.value
    w.pick.value = (2, 1)
    assert w.detail.value != old
    w.step.value = 4
    assert w.maps.shape[-1] == trace.prompt_len + 4


def test_attention_figures(trace):
    fig = viz.attention_grid_figure(trace, step=trace.num_steps - 1)
    images = [ax.get_images()[0] for ax in fig.get_axes() if ax.get_images()]
    assert len(images) == 3 * 4
    np.testing.assert_array_equal(images[0].get_array(), trace.head_map(0, 0))
    _save(fig, "attention_grid.png")
    fig = viz.attention_grid_figure(trace, step=2, layers=[1], heads=[1], kv_heads=True)  # heads = KV heads here
    (img,) = [ax.get_images()[0] for ax in fig.get_axes() if ax.get_images()]
    expect = (trace.head_map(1, 2, upto_step=2) + trace.head_map(1, 3, upto_step=2)) / 2
    np.testing.assert_allclose(img.get_array(), expect, rtol=1e-6)
    fig = viz.head_map_figure(trace, 1, 2)
    np.testing.assert_array_equal(fig.get_axes()[0].get_images()[0].get_array(), trace.head_map(1, 2))
    assert fig.get_axes()[0].get_xticklabels()[0].get_text() == trace.token_text[int(trace.sequences[0, 0])]
    _save(fig, "head_map.png")


# -- 3. cache ----------------------------------------------------------------------------


def test_cache_growth_figure_plots_the_timeline(trace):
    fig = viz.cache_growth_figure(trace)
    lines = {line.get_label(): line for ax in fig.get_axes() for line in ax.get_lines()}
    c = trace.cache
    for i in range(c.num_layers):
        np.testing.assert_array_equal(lines[f"layer {i} kept"].get_ydata(), c.kept_len[:, i])
    np.testing.assert_array_equal(lines["measured"].get_ydata(), c.total_bytes)
    np.testing.assert_array_equal(lines["predicted"].get_ydata(), c.predicted_bytes())
    np.testing.assert_array_equal(
        lines["predicted without GQA"].get_ydata(), c.predicted_bytes(query_heads=trace.meta.num_heads)
    )
    _save(fig, "cache_growth.png")


def test_cache_growth_shows_static_allocation():
    from tracer.records import replace

    t = make_trace()
    c = t.cache
    t.cache = replace(c, cache_class="StaticCache", allocated_len=np.full_like(c.kept_len, 16))
    fig = viz.cache_growth_figure(t)
    labels = {line.get_label() for ax in fig.get_axes() for line in ax.get_lines()}
    assert "layer 0 allocated" in labels
    text = viz.cache_text(t)
    assert "StaticCache" in text and f"{int(c.total_bytes[-1]):,}" in text
    assert viz.cache_growth(t) is not None


# -- 4. logit lens ----------------------------------------------------------------------


@pytest.mark.parametrize("metric,field", [("prob", "chosen_prob"), ("rank", "chosen_rank")])
def test_logit_lens_figure_shows_recorded_array(trace, metric, field):
    fig = viz.logit_lens_figure(trace, 0, metric)
    data = np.asarray(fig.get_axes()[0].get_images()[0].get_array())
    expect = np.stack([getattr(s.logit_lens, field)[:, 0] for s in trace.steps], axis=1)
    np.testing.assert_array_equal(data, expect)
    labels = [t.get_text() for t in fig.get_axes()[0].get_xticklabels()]
    assert labels == [trace.token_text[int(s.chosen[0])] for s in trace.steps]
    _save(fig, f"logit_lens_{metric}.png")


def test_logit_lens_widget_toggles(trace):
    w = viz.logit_lens(trace)
    w.toggle.value = "rank"
    if hasattr(w.plot, "data"):
        expect = np.stack([s.logit_lens.chosen_rank[:, 0] for s in trace.steps], axis=1)
        np.testing.assert_array_equal(np.asarray(w.plot.data[0].z), expect)


# -- 5. token strip ---------------------------------------------------------------------


def test_token_strip_escapes_and_titles():
    evil = "<script>x</script>"
    t = make_trace(text=evil)
    gen = [int(i) for i in t.generated_ids(0)]
    if 7 not in gen:  # make sure the evil text is on a generated token
        t.token_text[gen[1]] = evil
        t.token_bytes[gen[1]] = evil.encode("utf-8", "surrogatepass")
    for metric in ("prob", "entropy"):
        out = viz.token_strip_html(t, 0, metric)
        assert "<script>" not in out
        assert html.escape(evil) in out
        assert "lower bound" in out
    w = viz.token_strip(t)
    assert "<script>" not in w.value
    p = float(t.steps[0].chosen_prob[0])
    assert f"p={p:.4f}" in w.value
    with pytest.raises(ValueError):
        viz.token_strip_html(t, 0, "nope")


def test_step_explorer_escapes_tokens():
    t = make_trace(text="<b>bold</b>")
    gen = [int(i) for i in t.generated_ids(0)]
    t.token_text[gen[0]] = "<b>bold</b>"
    t.token_bytes[gen[0]] = b"<b>bold</b>"
    w = viz.step_explorer(t)
    assert "<b>bold</b>" not in w.text_html.value + w.table_html.value
    assert "&lt;b&gt;bold&lt;/b&gt;" in w.text_html.value


# -- 6. heads -----------------------------------------------------------------------------


def test_attention_sinks_and_head_stats(trace):
    fig = viz.attention_sinks_figure(trace)
    data = np.asarray(fig.get_axes()[0].get_images()[0].get_array())
    sink = trace.attention_stats_table()["sink"][1:, :, 0, :].mean(axis=0)
    np.testing.assert_allclose(data, sink, rtol=1e-6)
    _save(fig, "attention_sinks.png")
    text = viz.head_stats_text(trace, top=3)
    assert "lowest entropy" in text and "highest sink" in text
    li, h = np.unravel_index(np.argmax(sink), sink.shape)
    assert f"layer {li:>3} head {h:>3}  sink {sink[li, h]:.3f}" in text


# -- all together ------------------------------------------------------------------------


def test_show_builds_every_tab(trace):
    tab = viz.show(trace)
    assert len(tab.children) == 6
    assert [tab.get_title(i) for i in range(6)][:2] == ["steps", "tokens"]


def test_views_without_attention():
    t = make_trace(attention=False)
    tab = viz.show(t)
    assert "attention" not in [tab.get_title(i) for i in range(len(tab.children))]
    with pytest.raises(KeyError):
        viz.attention_grid_figure(t)


def test_figures_are_not_left_open_in_pyplot(trace):
    import matplotlib.pyplot as plt

    before = set(plt.get_fignums())
    viz.processor_waterfall_figure(trace, 0)
    viz.cache_growth_figure(trace)
    viz.logit_lens_figure(trace)
    viz.attention_sinks_figure(trace)
    viz.head_map_figure(trace, 0, 0)
    assert set(plt.get_fignums()) == before


def test_step_explorer_on_a_finished_sequence(trace):
    w = viz.step_explorer(trace, seq=1)
    stop = next(s.index for s in trace.steps if s.finished[1])
    w.slider.value = stop
    assert "eos:&lt;|eot|&gt;" in w.table_html.value and "stopped" in w.text_html.value
    w.slider.value = trace.num_steps - 1
    assert "already finished" in w.text_html.value and w.table_html.value == ""


def test_waterfall_leaves_out_masked_candidates():
    trace = make_trace(top_k=12)  # the TopK stage keeps 8 of 40: 4 of the 12 recorded are -inf
    w = viz.step_explorer(trace)
    if not hasattr(w.waterfall, "data"):
        pytest.skip("plotly FigureWidget unavailable; PNG fallback in use")
    raw, _, topk = w.waterfall.data
    assert len(raw.x) == 12 and len(topk.x) == 8
    assert all(x > 0 for x in topk.x)


def test_token_strip_uses_recorded_entropy():
    from tracer.records import replace

    trace = make_trace()
    for i, step in enumerate(trace.steps):
        last = replace(step.stages[-1], entropy=np.full(trace.batch_size, 1.25 + i, np.float32))
        trace.steps[i] = replace(step, stages=(*step.stages[:-1], last))
    out = viz.token_strip_html(trace, metric="entropy")
    assert "lower bound" not in out
    assert "entropy 1.250 nats" in out and "entropy 2.250 nats" in out
