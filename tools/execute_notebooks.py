"""Execute the guided-tour notebooks in place, so the committed files carry their outputs.

    python tools/execute_notebooks.py [NAME ...]        # or: make notebooks

Each notebook runs top to bottom in a fresh ``python3`` kernel (working directory: a temporary
folder, so nothing is written beside the notebooks), with this checkout first on ``PYTHONPATH``
and ``TRACER_CACHE_DIR`` defaulting to ``.cache/tracer``.  Outputs (text, HTML tables, PNG
figures) and the ipywidgets state are stored in the ``.ipynb`` (less the stale buffers nbclient
keeps, which would stop JupyterLab restoring any widget: :func:`drop_orphan_buffers`); per-cell
timing metadata is not, so a re-run changes only what the notebook shows.  A failing cell stops
with its error and leaves the committed file untouched.

On a machine whose cores are busy with other work, run with ``OMP_NUM_THREADS=1``: torch's
intra-op threads then do not wait on each other (here a 32-token generation took 4 s with one
thread against 35-85 s with two threads on two oversubscribed cores).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
MAX_BYTES = 1_000_000  # keep each committed notebook under 1 MB
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
#: anywidget front-end code stored in place of a bundled library (plotly 7's FigureWidget carries
#: its ~5 MB plotly.js in every widget's ``_esm``): a saved notebook shows this line there instead.
PLACEHOLDER_ESM = (
    "export default { render({ el }) { el.textContent = "
    "'(interactive figure: run the notebook to see it; the static figure beside it shows the same data)'; } };"
)


def slim_widget_state(nb) -> int:
    """Replace large anywidget bundles in the saved widget state by a placeholder; returns how many.

    Every other widget (sliders, HTML panes, images, layouts) keeps its saved state, so the
    explorers render from the file where the format allows (JupyterLab, nbviewer)."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    slimmed = 0
    for model in state.values():
        fields = model.get("state", {})
        if len(str(fields.get("_esm", ""))) > 10_000:
            fields["_esm"] = PLACEHOLDER_ESM
            fields.pop("_css", None)
            slimmed += 1
    return slimmed


def _lands(state, path) -> bool:
    """Whether a buffer stored at ``path`` has a place in ``state``: every step but the last walks
    into an existing dict key or list index, as the widget manager's ``put_buffers`` does."""
    node = state
    for key in path[:-1]:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
            node = node[key]
        else:
            return False
    return isinstance(node, dict) or (isinstance(node, list) and isinstance(path[-1], int))


def drop_orphan_buffers(nb) -> int:
    """Remove saved widget buffers that have no place in their model's final state; returns how many.

    nbclient keeps every binary buffer a widget ever sent, keyed by path, even after a later update
    replaced the field: plotly's ``FigureWidget`` sends a trace's numpy arrays as buffers under
    ``_py2js_addTraces`` and then sets that field to ``None``.  JupyterLab's widget manager puts
    each buffer back into the state before creating the models; one that cannot land there throws,
    which aborts restoring the whole notebook's widgets: "widget model not found" in the browser
    console, and no saved view can render."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    dropped = 0
    for model in state.values():
        buffers = model.get("buffers")
        if not buffers:
            continue
        kept = [b for b in buffers if _lands(model.get("state", {}), b["path"])]
        dropped += len(buffers) - len(kept)
        if kept:
            model["buffers"] = kept
        else:
            model.pop("buffers")
    return dropped


def tidy_widget_state(nb) -> None:
    """What every executed notebook goes through before it is written (and the tests check)."""
    drop_orphan_buffers(nb)
    slim_widget_state(nb)


def execute(path: Path, *, timeout: int = 600) -> tuple[float, int]:
    """Run ``path`` and write it back with outputs; (seconds, bytes written)."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="tracer-nb-") as tmp:
        client = nbclient.NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            record_timing=False,
            store_widget_state=True,
            resources={"metadata": {"path": tmp}},
        )
        start = time.perf_counter()
        client.execute()
        elapsed = time.perf_counter() - start
    nb.metadata.pop("papermill", None)
    tidy_widget_state(nb)
    nbformat.validate(nb)
    text = nbformat.writes(nb) + "\n"
    if len(text.encode()) > MAX_BYTES:
        rejected = Path(tempfile.gettempdir()) / f"rejected-{path.name}"
        rejected.write_text(text, encoding="utf-8")
        raise SystemExit(f"(executed copy kept in {rejected}) {path.name}: {len(text.encode()):,} bytes with outputs (limit {MAX_BYTES:,}); make it smaller")
    path.write_text(text, encoding="utf-8")
    return elapsed, len(text.encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook file names (default: every notebooks/*.ipynb)")
    args = parser.parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ.setdefault("TRACER_CACHE_DIR", str(REPO / ".cache" / "tracer"))
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    paths = [NOTEBOOKS / n for n in args.names] if args.names else sorted(NOTEBOOKS.glob("*.ipynb"))
    for path in paths:
        if not path.is_file():
            print(f"execute_notebooks: error: no notebook {path}", file=sys.stderr)
            return 2
        seconds, size = execute(path)
        print(f"{path.name}: {seconds:.1f} s, {size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
