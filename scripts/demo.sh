#!/usr/bin/env bash
# Set up, then build an index of Python's stdlib docstrings and ask it a question with citations.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/ragsae demo "$@"
