"""After building llama-cpp-python: one decode of the embedded GGUF in a child process, so a build
that faults on this machine is one clear message at install time, not a crash of the test run.

Seen here: llama.cpp's native build (-march=native) compiles its AMX kernels on a CPU that has
AMX; where the kernel does not grant AMX tile state (a VM on a Sapphire Rapids host), the first
matrix product faults (SIGSEGV at ldtilecfg).  The Makefile builds without AMX on x86-64, and when
this check fails (pip's wheel cache can hand back a wheel built with other flags), removes the cached
wheel, builds again from source and runs this check once more with --rebuilt."""

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


def main(argv: list[str]) -> int:
    rebuilt = "--rebuilt" in argv
    child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True)
    if child.returncode == 0:
        print(child.stdout.strip())
        return 0
    tail = (child.stderr.strip().splitlines() or ["(no output)"])[-1]
    if rebuilt:
        advice = ("It was just built from source with the Makefile's flags; llama.cpp's tests will not run "
                  "here until it decodes (CMAKE_ARGS can pass llama.cpp's own build options)")
    else:
        advice = ("The Makefile now rebuilds it from source with its flags, without pip's cached wheel "
                  "(a wheel built elsewhere or with other flags is installed as is from that cache)")
    print(f"llama-cpp-python cannot decode on this machine (exit {child.returncode}: {tail}). {advice}.",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
