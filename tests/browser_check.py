"""Run the guided-tour notebooks in a real browser: JupyterLab + headless Chromium.

    python tests/browser_check.py [SCREENSHOT_DIR] [--notebook NAME ...]

Serves a throw-away copy of ``notebooks/`` with JupyterLab on 127.0.0.1 (free port, token auth,
throw-away settings, runtime and checkpoint folders), drives Debian's ``/usr/bin/chromium`` through
the Python ``playwright`` package (never ``playwright install``), and for each notebook: open it as
committed (stored outputs and figures must show before anything runs, and the browser must log no
console or page error once the kernel is up and the saved widget state restored), then a copy with
its outputs cleared: Run All,
wait until every non-empty code cell has an execution count (or an error output appeared), check
that no cell shows an error, that widgets and plotly figures rendered, and — in notebook 02 — that
moving the step explorer's slider with the keyboard changes the text shown. A full-page screenshot
of each notebook goes to SCREENSHOT_DIR (default ``tests/_artifacts/browser/``). Kernels are shut
down through the REST API before the server is stopped.

Importable: :func:`run_check` returns a report dict and raises :class:`BrowserCheckError`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO_ROOT / "notebooks"
DEFAULT_OUT = REPO_ROOT / "tests" / "_artifacts" / "browser"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ERROR_MIME = "application/vnd.jupyter.error"
_HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None  # the kernel runs this interpreter

#: What each notebook must show once run: CSS selector -> minimum count.
EXPECTED: dict[str, dict[str, int]] = {
    "01_tokenize.ipynb": {},
    "02_generate_loop.ipynb": {
        ".jp-OutputArea-output .jupyter-widgets": 1,
        ".jp-OutputArea-output .widget-slider [role=slider]": 2,  # live and reloaded explorer
        ".jp-OutputArea-output .js-plotly-plot": 2,  # their processor waterfalls (plotly FigureWidget)
        ".jp-OutputArea-output img": 2,  # the position strip and the cache growth figure
    },
    "03_attention.ipynb": {
        ".jp-OutputArea-output .jupyter-widgets": 1,
        ".jp-OutputArea-output .widget-slider [role=slider]": 1,  # the attention grid's step slider
        ".jp-OutputArea-output .widget-toggle-buttons": 1,
        ".jp-OutputArea-output .widget-image": 2,  # grid and enlarged head
        ".jp-OutputArea-output img": 7,  # + the static figures (KV growth, structure, grid, head, sinks, lens)
    },
    "04_compare.ipynb": {  # comparison views: sdpa vs eager on every install, fp32 vs 4-bit with bitsandbytes
        ".jp-OutputArea-output .widget-slider [role=slider]": 1 + _HAS_BNB,  # each view's step slider
        ".jp-OutputArea-output .js-plotly-plot": 1 + _HAS_BNB,  # each view's |Δ log-prob| / KL plot
        ".jp-OutputArea-output img": 1,  # the forward-replay figure
    },
    "05_seed_script.ipynb": {
        ".jp-OutputArea-output img": 1,  # the two-turn cache figure
    },
    "06_corpus.ipynb": {
        ".jp-OutputArea-output img": 4,  # entropy by position, stop reasons, processors, divergence histogram
    },
    "07_beyond_greedy.ipynb": {
        ".jp-OutputArea-output svg": 1,  # the beam tree (inline SVG)
        ".jp-OutputArea-output img": 2,  # expert load and token x layer map
    },
}
#: What each notebook shows as committed (saved outputs, before anything runs): PNG figures.
EXPECTED_SAVED: dict[str, int] = {
    "01_tokenize.ipynb": 0,
    "02_generate_loop.ipynb": 2,
    "03_attention.ipynb": 5,
    "04_compare.ipynb": 1,
    "05_seed_script.ipynb": 1,
    "06_corpus.ipynb": 4,
    "07_beyond_greedy.ipynb": 2,
}


class BrowserCheckError(AssertionError):
    """A notebook failed in the browser (or the browser/server could not be driven)."""


# --------------------------------------------------------------------------------------
# JupyterLab server
# --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_settings(settings: Path) -> None:
    files = {
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false"},
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {
            "windowingMode": "none",  # else off-screen cells are not in the DOM
            "autoStartDefaultKernel": True,  # else a kernel dialog
            "maxNumberOutputs": 10000,  # 0 hides outputs in 4.6
        },
    }
    for rel, content in files.items():
        path = settings / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))


class Server:
    def __init__(self, root: Path, work: Path):
        self.root, self.work = root, work
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "jupyterlab.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> None:
        settings, runtime, checkpoints = self.work / "settings", self.work / "runtime", self.work / "checkpoints"
        for d in (runtime, checkpoints):
            d.mkdir(parents=True, exist_ok=True)
        _write_settings(settings)
        env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTER_RUNTIME_DIR=str(runtime))
        env.setdefault("TRACER_CACHE_DIR", str(REPO_ROOT / ".cache" / "tracer"))
        cmd = [
            sys.executable, "-m", "jupyterlab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            "--LabApp.expose_app_in_browser=True",
            f"--FileCheckpoints.checkpoint_dir={checkpoints}",
            "--LabApp.extension_manager=readonly",  # no PyPI queries
        ]  # fmt: skip
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrowserCheckError(f"jupyter lab exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                self.api("GET", "/api/status")
                return
            except OSError:
                time.sleep(0.5)
        raise BrowserCheckError(f"jupyter lab did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def api(self, method: str, path: str) -> Any:
        req = urllib.request.Request(self.base + path, method=method, headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self) -> int:
        """Delete every session and kernel through the REST API; return how many kernels."""
        try:
            for s in self.api("GET", "/api/sessions"):
                self.api("DELETE", f"/api/sessions/{s['id']}")
            kernels = self.api("GET", "/api/kernels")
            for k in kernels:
                self.api("DELETE", f"/api/kernels/{k['id']}")
            return len(kernels)
        except OSError:
            return 0

    def stop(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.shutdown_kernels()
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        finally:
            if getattr(self, "_log", None) is not None:
                self._log.close()


def _write_cleared(src: Path, dst: Path) -> None:
    nb = json.loads(src.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    nb.get("metadata", {}).pop("widgets", None)
    dst.write_text(json.dumps(nb, indent=1, ensure_ascii=False), encoding="utf-8")


@contextmanager
def jupyterlab(notebooks: Path) -> Iterator[Server]:
    work = Path(tempfile.mkdtemp(prefix="tracer-browser-"))
    root = work / "notebooks"
    root.mkdir()
    (root / "saved").mkdir()
    for nb in notebooks.glob("*.ipynb"):
        shutil.copy2(nb, root / "saved" / nb.name)  # as committed, outputs and widget state included
        _write_cleared(nb, root / nb.name)  # what Run All executes: no stored output can stand in for a run
    server = Server(root, work)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------
# The browser side
# --------------------------------------------------------------------------------------

_JS_PANEL = """
() => {
  const app = window.jupyterapp;
  if (!app) return null;
  const w = app.shell.currentWidget;
  return (w && w.content && w.content.model && w.sessionContext) ? w : null;
}
"""

# Listen to the kernel's iopub channel: exceptions raised in widget callbacks show in no cell.
_JS_LISTEN = """
async () => {
  const w = (%s)();
  await w.sessionContext.ready;
  window.__tracerKernelErrors = [];
  const kernel = w.sessionContext.session.kernel;
  kernel.iopubMessage.connect((_, msg) => {
    const t = msg.header.msg_type;
    if (t === 'error') window.__tracerKernelErrors.push(msg.content.ename + ': ' + msg.content.evalue);
    if (t === 'stream' && msg.content.name === 'stderr' && /Traceback|Error/.test(msg.content.text)
        && !/Kernel is running over TCP/.test(msg.content.text))
      window.__tracerKernelErrors.push('stderr: ' + msg.content.text.slice(0, 2000));
  });
  return kernel.name;
}
""" % _JS_PANEL

_JS_KERNEL_READY = "async () => { await (%s)().sessionContext.ready; }" % _JS_PANEL
_JS_KERNEL_STATUS = """
() => { const k = (%s)().sessionContext.session?.kernel; return k ? k.status : 'none'; }
""" % _JS_PANEL
_RESTORE_SETTLE_MS = 4000

_JS_PROGRESS = """
() => {
  const w = (%s)();
  const cells = w.content.model.cells;
  let todo = 0, errors = [], code = 0;
  for (let i = 0; i < cells.length; i++) {
    const c = cells.get(i);
    if (c.type !== 'code' || !c.sharedModel.getSource().trim()) continue;
    code++;
    if (c.executionCount === null) todo++;
    for (const o of c.outputs.toJSON())
      if (o.output_type === 'error') errors.push({cell: i, ename: o.ename, evalue: o.evalue});
  }
  const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
  return {code, todo, errors, status: kernel ? kernel.status : 'none',
          kernelErrors: window.__tracerKernelErrors || []};
}
""" % _JS_PANEL


def _wait_for(fn, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BrowserCheckError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _screenshot(page: Any, path: Path) -> None:
    """JupyterLab scrolls inside its own panel: grow the viewport to the notebook's height first."""
    page.evaluate("() => window.jupyterapp.shell.collapseLeft()")
    to_top = """() => { const nb = document.querySelector('.jp-NotebookPanel-notebook');
        if (!nb) return document.body.scrollHeight;
        for (const el of [nb, ...nb.querySelectorAll('.jp-WindowedPanel-outer')]) el.scrollTop = 0;
        const cells = nb.querySelector('.jp-WindowedPanel-viewport') || nb;
        return cells.scrollHeight + 200; }"""
    height = page.evaluate(to_top)
    page.set_viewport_size({"width": 1400, "height": int(min(max(height, 900), 30000))})
    page.wait_for_timeout(300)
    page.evaluate(to_top)
    page.wait_for_timeout(800)
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({"width": 1400, "height": 1000})


def _move_step_explorer(page: Any, report: dict) -> None:
    """Focus the first step explorer's slider handle, press ArrowRight, expect the text to change."""
    handle = page.locator(".jp-OutputArea-output .widget-slider [role=slider]").first
    output = page.locator(".jp-OutputArea-output", has=page.locator(".widget-slider")).first
    handle.scroll_into_view_if_needed()
    before = output.inner_text()
    handle.focus()
    for _ in range(3):
        page.keyboard.press("ArrowRight")
        page.wait_for_timeout(150)
    after = _wait_for(
        lambda: (lambda t: t if t != before and "model inputs, step 3" in t else None)(output.inner_text()),
        30,
        "the step explorer to show step 3 after ArrowRight ×3",
    )
    report["slider"] = {"before": before[:120], "after_has_step_3": "model inputs, step 3" in after}


def _console_error_text(msg: Any) -> str:
    loc = msg.location or {}
    where = f" ({loc.get('url', '')}:{loc.get('lineNumber', '')})" if loc.get("url") else ""
    return f"console.error: {msg.text}{where}"


def check_saved(browser: Any, server: Server, name: str) -> dict:
    """Open the notebook as committed, without running it: its stored figures and outputs show,
    and the browser logs no console error and no page error while the saved widget state is
    restored (a saved model JupyterLab cannot create logs "widget model not found")."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    browser_errors: list[str] = []
    page.on("console", lambda msg: browser_errors.append(_console_error_text(msg)) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: browser_errors.append(f"page error: {exc}"))
    try:
        page.goto(f"{server.base}/lab/tree/saved/{name}?reset&token={server.token}", wait_until="domcontentloaded")
        page.wait_for_function(f"({_JS_PANEL})() !== null", timeout=120_000)
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
        page.wait_for_timeout(2000)
        # The widget manager restores the saved widget state once the kernel answers; a model it
        # cannot create is reported after get_model's 2 s wait for it: wait for the kernel, then longer.
        page.evaluate(_JS_KERNEL_READY)
        _wait_for(lambda: page.evaluate(_JS_KERNEL_STATUS) == "idle", 120, f"{name}'s kernel to be idle")
        page.wait_for_timeout(_RESTORE_SETTLE_MS)
        outputs = page.locator(".jp-OutputArea-output").count()
        images = page.evaluate(
            "() => [...document.querySelectorAll('.jp-OutputArea-output img')].filter(i => i.complete && i.naturalWidth).length"
        )
        errors = page.locator(f'.jp-RenderedText[data-mime-type="{ERROR_MIME}"]').count()
        report = {"outputs": outputs, "images": images, "browser_errors": list(browser_errors)}
        least = EXPECTED_SAVED.get(name, 0)
        if not outputs or images < least or errors or browser_errors:
            shown = "".join(f"\n    {e[:500]}" for e in browser_errors[:10])
            raise BrowserCheckError(
                f"{name} as committed: {outputs} outputs, {images} images (expected >= {least}), {errors} errors, "
                f"{len(browser_errors)} browser console/page error(s){shown}"
            )
        return report
    finally:
        page.close()
        server.shutdown_kernels()


def check_notebook(browser: Any, server: Server, name: str, out_dir: Path, timeout: float) -> dict:
    report: dict[str, Any] = {"notebook": name}
    start = time.perf_counter()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    console_errors: list[str] = []
    page.on("pageerror", lambda exc: console_errors.append(str(exc)))
    try:
        page.goto(f"{server.base}/lab/tree/{name}?reset&token={server.token}", wait_until="domcontentloaded")
        page.wait_for_function(f"({_JS_PANEL})() !== null", timeout=120_000)
        report["kernel"] = page.evaluate(_JS_LISTEN)
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
        page.evaluate("() => window.jupyterapp.commands.execute('runmenu:run-all')")
        state: dict[str, Any] = {}

        def finished() -> bool:
            state.update(page.evaluate(_JS_PROGRESS))
            return bool(state["errors"]) or (state["todo"] == 0 and state["status"] == "idle")

        _wait_for(finished, timeout, f"{name} to finish running", interval=1.0)
        report["run_s"] = round(time.perf_counter() - start, 1)
        report["code_cells"] = state["code"]
        page.wait_for_timeout(1500)  # let widget views and plotly finish rendering

        problems: list[str] = []
        if state["errors"]:
            problems.append(f"error outputs in the notebook model: {state['errors']}")
        shown = page.locator(f'.jp-RenderedText[data-mime-type="{ERROR_MIME}"]').count()
        if shown:
            problems.append(f"{shown} cell(s) show an error")
        counts = {sel: page.locator(sel).count() for sel in EXPECTED.get(name, {})}
        report["counts"] = counts
        for sel, least in EXPECTED.get(name, {}).items():
            if counts[sel] < least:
                problems.append(f"expected at least {least} of {sel!r}, found {counts[sel]}")
        broken = page.evaluate(
            "() => [...document.querySelectorAll('.jp-OutputArea-output img')].filter(i => !i.complete || !i.naturalWidth).length"
        )
        if broken:
            problems.append(f"{broken} output image(s) did not load")
        if name.startswith("02") and not problems:
            _move_step_explorer(page, report)
        page.wait_for_timeout(500)
        kernel_errors = page.evaluate("() => window.__tracerKernelErrors || []")
        if kernel_errors:
            problems.append(f"kernel reported errors outside cells: {kernel_errors}")
        if console_errors:
            report["page_errors"] = console_errors[:5]
        shot = out_dir / f"{Path(name).stem}.png"
        _screenshot(page, shot)
        report["screenshot"] = str(shot)
        if problems:
            raise BrowserCheckError(f"{name}: " + "; ".join(problems))
    finally:
        report["total_s"] = round(time.perf_counter() - start, 1)
        page.close()
        server.shutdown_kernels()  # free the CPU and memory before the next notebook
    return report


def run_check(out_dir: Path | str = DEFAULT_OUT, names: list[str] | None = None, *, timeout: float = 600) -> dict:
    """Run the check; return ``{"notebooks": [reports], "total_s": ...}`` or raise BrowserCheckError."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise BrowserCheckError(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = names or sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    start = time.perf_counter()
    reports = []
    failures = []
    with jupyterlab(NOTEBOOKS) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            for name in names:
                try:
                    saved = check_saved(browser, server, name)
                    reports.append({**check_notebook(browser, server, name, out_dir, timeout), "saved": saved})
                except Exception as exc:  # noqa: BLE001 - report every notebook, fail at the end
                    failures.append(f"{name}: {exc}")
        finally:
            browser.close()
        log_tail = server.log_tail()
    result = {"notebooks": reports, "total_s": round(time.perf_counter() - start, 1), "out_dir": str(out_dir)}
    (out_dir / "report.json").write_text(json.dumps(result, indent=2))
    if failures:
        raise BrowserCheckError("\n".join(failures) + f"\n--- jupyter lab log ---\n{log_tail}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=str(DEFAULT_OUT), help="screenshot folder")
    parser.add_argument("--notebook", action="append", help="only this notebook (repeatable)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per notebook")
    args = parser.parse_args(argv)
    try:
        result = run_check(args.out_dir, args.notebook, timeout=args.timeout)
    except BrowserCheckError as exc:
        print(f"browser check FAILED:\n{exc}", file=sys.stderr)
        return 1
    for r in result["notebooks"]:
        print(f"{r['notebook']}: ran in {r['run_s']} s ({r['code_cells']} code cells), {r.get('counts', {})}")
    print(f"browser check passed in {result['total_s']} s; screenshots in {result['out_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
