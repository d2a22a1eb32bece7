"""After building llama-cpp-python: one decode of the embedded GGUF in a child process, so a build
that faults on this machine is one clear message at install time, not a crash of the test run.

Seen here: llama.cpp's native build (-march=native) compiles its AMX kernels on a CPU that has
AMX; where the kernel does not grant AMX tile state (a VM on a Sapphire Rapids host), the first
matrix product faults (SIGSEGV at ldtilecfg).  The Makefile builds without AMX on x86-64."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import llama_cpp
from tracer.backends.llamacpp import default_gguf
llm = llama_cpp.Llama(model_path=str(default_gguf()), n_ctx=64, n_threads=1, verbose=False)
llm.eval(llm.tokenize(b"What is the capital of France?"))
print("llama-cpp-python", llama_cpp.__version__, "decodes the embedded GGUF")
"""


def main() -> int:
    child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True)
    if child.returncode == 0:
        print(child.stdout.strip())
        return 0
    tail = (child.stderr.strip().splitlines() or ["(no output)"])[-1]
    print(f"llama-cpp-python cannot decode on this machine (exit {child.returncode}: {tail}). If it faulted, "
          "rebuild it without pip's cache and with the Makefile's flags: rm .venv/.llamacpp-installed; "
          "pip cache remove llama_cpp_python; make venv-llamacpp", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
