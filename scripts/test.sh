#!/usr/bin/env bash
# Set up, lint and type-check, then run the whole test suite (unit tests, real-model end-to-end tests, notebook).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/ruff check ragsae tests benchmarks research
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
