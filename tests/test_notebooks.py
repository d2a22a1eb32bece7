"""The guided-tour notebooks: committed executed (outputs visible on a code host), and they run.

``test_notebook_runs`` executes every notebook top to bottom into a temporary copy; the notebooks
assert on what they show.  ``tools/execute_notebooks.py`` (``make notebooks``) refreshes the
committed outputs.
"""

from __future__ import annotations

import importlib.util
import json
import os
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
    if views:  # every displayed widget's state is saved with the notebook
        state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
        missing = [v for v in views if v not in state]
        assert not missing, f"widget state not saved for {missing}"
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
    _tool().slim_widget_state(nb)  # as `make notebooks` does before writing the committed file
    check_executed(nb)
    print(f"{name}: {elapsed:.1f} s")
