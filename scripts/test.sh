#!/usr/bin/env bash
# Set up .venv and run the checks CI runs: lint, format, types, then the test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k writer`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check src tests benchmarks experiments
.venv/bin/ruff format --check src tests benchmarks experiments
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
