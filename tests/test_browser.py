"""Run every notebook in JupyterLab in headless Chromium (see tests/browser_check.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's /usr/bin/chromium (apt-get install -y chromium)"),
]


def test_notebooks_in_jupyterlab():
    pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package")
    pytest.importorskip("jupyterlab", reason="needs jupyterlab (the notebook extra)")
    from browser_check import DEFAULT_OUT, run_check

    result = run_check(DEFAULT_OUT)
    names = [r["notebook"] for r in result["notebooks"]]
    assert names == ["01_tokenize.ipynb", "02_generate_loop.ipynb", "03_attention.ipynb", "04_compare.ipynb",
                     "05_seed_script.ipynb", "06_corpus.ipynb", "07_beyond_greedy.ipynb"]
    explorer = next(r for r in result["notebooks"] if r["notebook"].startswith("02"))
    assert explorer["slider"]["after_has_step_3"]
    for r in result["notebooks"]:
        assert Path(r["screenshot"]).stat().st_size > 10_000
        assert r["saved"]["outputs"] > 0  # the committed file shows its outputs before anything runs
