#!/usr/bin/env bash
# Install mergekit 0.1.5 (the peer the merge benchmarks compare against) in its own virtual
# environment, CPU torch first so pip does not pull a CUDA build. Prints the mergekit-yaml path
# to pass to bench.py and parity.py as --mergekit.
#   bash benchmarks/merge/setup_mergekit.sh [VENV_DIR]   (default: /tmp/mergekit-venv)
set -euo pipefail
venv=${1:-/tmp/mergekit-venv}
if [ ! -x "$venv/bin/mergekit-yaml" ]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet torch==2.13.0
  "$venv/bin/python" -m pip install --quiet mergekit==0.1.5
fi
echo "$venv/bin/mergekit-yaml"
