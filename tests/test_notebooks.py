"""The guided-tour notebooks: committed executed (outputs visible on a code host), and they run.

``test_notebook_runs`` executes every notebook top to bottom into a temporary copy; the notebooks
assert on what they show.  ``tools/execute_notebooks.py`` (``make notebooks``) refreshes the
committed outputs.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NAMES = [
    "01_tokenize.ipynb",
    "02_generate_loop.ipynb",
    "03_attention.ipynb",
    "04_compare.ipynb",
    "05_seed_script.ipynb",
    "06_corpus.ipynb",
    "07_beyond_greedy.ipynb",
]
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
MAX_BYTES = 1_000_000


def _tool():
    spec = importlib.util.spec_from_file_location("execute_notebooks", REPO / "tools" / "execute_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]


def _lands(state, path) -> bool:
    """Whether the widget manager's ``put_buffers`` can put a buffer at ``path`` into ``state``
    (it walks ``state[p0][p1]...`` and assigns the last key; a missing step throws)."""
    node = state
    for key in path[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return False
    return isinstance(node, dict) or (isinstance(node, list) and isinstance(path[-1], int))


def widget_state_problems(nb) -> list[str]:
    """What would stop JupyterLab restoring the saved widgets of ``nb`` (empty when none).

    JupyterLab creates every saved model in one pass; one model it cannot create (a buffer with no
    place in its state, a reference to a model that is not saved) fails the whole pass, and each
    displayed view then logs "widget model not found" and never renders."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    views = [o["data"][WIDGET_VIEW]["model_id"] for c in _code_cells(nb) for o in c.outputs
             if WIDGET_VIEW in o.get("data", {})]
    problems = [f"view of {v}: model not in the saved widget state" for v in views if v not in state]
    for model_id, model in state.items():
        for field in ("model_name", "model_module", "model_module_version", "state"):
            if field not in model:
                problems.append(f"{model_id}: no {field}")
        for ref in re.findall(r"IPY_MODEL_([0-9a-f]+)", json.dumps(model.get("state", {}))):
            if ref not in state:
                problems.append(f"{model_id} ({model.get('model_name')}): refers to {ref}, not saved")
        for buf in model.get("buffers", []):
            if not _lands(model.get("state", {}), buf["path"]):
                problems.append(f"{model_id} ({model.get('model_name')}): buffer at {buf['path']} has no place in the state")
    return problems


def check_executed(nb) -> None:
    """Raise AssertionError unless ``nb`` was run top to bottom in one kernel and kept its outputs."""
    cells = _code_cells(nb)
    assert cells, "no code cells"
    counts = [c.execution_count for c in cells]
    assert None not in counts, "a code cell was never run: refresh with `make notebooks`"
    assert counts == list(range(1, len(cells) + 1)), f"cells not run top to bottom in one go: {counts}"
    assert any(c.outputs for c in cells), "no outputs stored"
    errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert not errors, f"stored error output: {errors[0].get('ename')}"
    images = [o for c in cells for o in c.outputs if "image/png" in o.get("data", {})]
    views = [o["data"][WIDGET_VIEW]["model_id"] for c in cells for o in c.outputs if WIDGET_VIEW in o.get("data", {})]
    if views:  # every displayed widget's state is saved with the notebook, and JupyterLab can restore it
        state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
        missing = [v for v in views if v not in state]
        assert not missing, f"widget state not saved for {missing}"
        problems = widget_state_problems(nb)
        assert not problems, "saved widgets would not restore: " + "; ".join(problems[:5])
        big = [k for k, m in state.items() if len(str(m.get("state", {}).get("_esm", ""))) > 10_000]
        assert not big, "anywidget bundles stored in the widget state (slim them)"
    assert images or views or any(
        "text/html" in o.get("data", {}) or o.output_type == "stream" for c in cells for o in c.outputs
    )


def test_all_notebooks_are_listed():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_executed(name):
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert path.stat().st_size < MAX_BYTES, f"{name} is {path.stat().st_size:,} bytes"
    check_executed(nb)
    for cell in _code_cells(nb):
        assert "execution" not in cell.metadata, "per-cell timing metadata stored"


def test_check_executed_fails_without_outputs():
    nb = nbformat.read(NOTEBOOKS / NAMES[0], as_version=4)
    check_executed(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    with pytest.raises(AssertionError, match="never run"):
        check_executed(nb)
    for i, cell in enumerate(_code_cells(nb)):
        cell.execution_count = i + 1
    with pytest.raises(AssertionError, match="no outputs"):
        check_executed(nb)


@pytest.mark.parametrize("name", NAMES)
def test_saved_widgets_restore(name):
    """Every committed widget view can be restored from the saved state (what JupyterLab does on
    opening the file): no view without its model, no dangling reference, no stray buffer."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert widget_state_problems(nb) == []


def _widget_notebook(buffers, state):
    nb = nbformat.v4.new_notebook()
    view = nbformat.v4.new_output("display_data", data={WIDGET_VIEW: {"model_id": "a" * 32, "version_major": 2, "version_minor": 0}})
    nb.cells = [nbformat.v4.new_code_cell("w", execution_count=1, outputs=[view])]
    model = {"model_name": "AnyModel", "model_module": "anywidget", "model_module_version": "~0.11.*", "state": state}
    if buffers:
        model["buffers"] = buffers
    nb.metadata["widgets"] = {WIDGET_STATE: {"state": {"a" * 32: model}, "version_major": 2, "version_minor": 0}}
    return nb


def test_widget_state_problems_and_drop_orphan_buffers():
    """plotly's FigureWidget sends numpy traces as buffers under ``_py2js_addTraces`` and then sets
    the field to None; nbclient keeps the buffer: that stray buffer is what broke notebook 04."""
    tool = _tool()
    live = {"encoding": "base64", "path": ["_widget_data", 0, "y", "buffer"], "data": "AAAA"}
    stray = {"encoding": "base64", "path": ["_py2js_addTraces", "trace_data", 0, "y", "buffer"], "data": "AAAA"}
    top = {"encoding": "base64", "path": ["value"], "data": "AAAA"}
    state = {"_py2js_addTraces": None, "_widget_data": [{"y": {"dtype": "float64", "shape": [1]}}],
             "layout": "IPY_MODEL_" + "b" * 32}
    nb = _widget_notebook([live, stray, top], json.loads(json.dumps(state)))
    problems = widget_state_problems(nb)
    assert len(problems) == 2 and "refers to bbbb" in problems[0] and "_py2js_addTraces" in problems[1]
    with pytest.raises(AssertionError, match="would not restore"):
        check_executed(nb)
    assert tool.drop_orphan_buffers(nb) == 1
    model = nb.metadata["widgets"][WIDGET_STATE]["state"]["a" * 32]
    assert model["buffers"] == [live, top] and model["state"] == state  # the state itself untouched
    assert len(widget_state_problems(nb)) == 1  # the dangling reference is not the tool's to repair
    nb = _widget_notebook([stray], {"_py2js_addTraces": None})
    assert tool.drop_orphan_buffers(nb) == 1 and "buffers" not in nb.metadata["widgets"][WIDGET_STATE]["state"]["a" * 32]
    assert widget_state_problems(nb) == []
    nb.cells[0].outputs[0]["data"][WIDGET_VIEW]["model_id"] = "c" * 32
    assert widget_state_problems(nb) == [f"view of {'c' * 32}: model not in the saved widget state"]


def _unconditional_calls(source: str, module: str, func: str) -> list[ast.Call]:
    """Calls ``module.func(...)`` in ``source`` that run whatever happens: not inside an if, loop,
    try, with, function or class."""
    calls = []
    for stmt in ast.parse(source).body:
        if isinstance(stmt, (ast.If, ast.For, ast.While, ast.Try, ast.With, ast.FunctionDef, ast.ClassDef)):
            continue
        calls += [n for n in ast.walk(stmt) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                  and n.func.attr == func and isinstance(n.func.value, ast.Name) and n.func.value.id == module]
    return calls


def test_compare_notebook_always_shows_a_comparison_view():
    """The sdpa-vs-eager comparison needs no bitsandbytes: its interactive view is shown
    unconditionally (the quantized one only when bitsandbytes is installed)."""
    nb = nbformat.read(NOTEBOOKS / "04_compare.ipynb", as_version=4)
    cells = [c.source for c in _code_cells(nb) if 'attn_implementation="eager"' in c.source]
    assert cells, "no sdpa-vs-eager cell"
    assert any(_unconditional_calls(src, "viz", "compare") for src in cells), (
        "the sdpa-vs-eager cell shows no viz.compare view outside a condition")


def test_slim_widget_state_replaces_only_large_bundles():
    tool = _tool()
    nb = nbformat.v4.new_notebook()
    state = {
        "plotly": {"model_name": "AnyModel", "state": {"_esm": "x" * 50_000, "_css": "y", "_data": [1, 2]}},
        "small": {"model_name": "AnyModel", "state": {"_esm": "export default {}"}},
        "slider": {"model_name": "IntSliderModel", "state": {"value": 3}},
    }
    nb.metadata["widgets"] = {WIDGET_STATE: {"state": json.loads(json.dumps(state)), "version_major": 2, "version_minor": 0}}
    assert tool.slim_widget_state(nb) == 1
    saved = nb.metadata["widgets"][WIDGET_STATE]["state"]
    assert saved["plotly"]["state"] == {"_esm": tool.PLACEHOLDER_ESM, "_data": [1, 2]}
    assert saved["small"] == state["small"] and saved["slider"] == state["slider"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path):
    # conftest put TRACER_CACHE_DIR into os.environ; the kernel inherits it.
    os.environ.setdefault("TRACER_CACHE_DIR", str(NOTEBOOKS.parent / ".cache" / "tracer"))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in nb.cells:  # run from a clean copy: nothing stored may stand in for a real run
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    elapsed = time.perf_counter() - start
    _tool().tidy_widget_state(nb)  # as `make notebooks` does before writing the committed file
    check_executed(nb)
    print(f"{name}: {elapsed:.1f} s")


HIDE_BITSANDBYTES = '''import sys
sys.modules["bitsandbytes"] = None  # as if not installed: find_spec gives None, import raises
'''


def run_without_bitsandbytes(path: Path, workdir: Path):
    """Execute the notebook at ``path`` in a kernel where bitsandbytes cannot be found; the run."""
    os.environ.setdefault("TRACER_CACHE_DIR", str(NOTEBOOKS.parent / ".cache" / "tracer"))
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.cells.insert(0, nbformat.v4.new_code_cell(HIDE_BITSANDBYTES))
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", store_widget_state=True,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()
    _tool().tidy_widget_state(nb)
    return nb


def check_compare_view_without_bitsandbytes(nb) -> None:
    text = "".join(o.get("text", "") for c in _code_cells(nb) for o in c.outputs if o.output_type == "stream")
    assert "bitsandbytes is not installed" in text, "bitsandbytes was not hidden"
    views = [o for c in _code_cells(nb) for o in c.outputs if WIDGET_VIEW in o.get("data", {})]
    assert views, "no interactive comparison view without bitsandbytes"
    check_executed(nb)


@pytest.mark.slow
def test_compare_notebook_without_bitsandbytes(tmp_path):
    """Notebook 04 runs without bitsandbytes and still shows an interactive comparison (sdpa vs eager)."""
    nb = run_without_bitsandbytes(NOTEBOOKS / "04_compare.ipynb", tmp_path)
    check_compare_view_without_bitsandbytes(nb)
