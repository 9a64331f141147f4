#!/usr/bin/env bash
# Set up .venv and run the demo on built-in defaults (see README.md). Output goes to runs/demo.
# It grows as capabilities land: today it builds a small checkpoint and inspects it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=${1:-runs/demo}
alloy=.venv/bin/alloy
set -x
"$alloy" lab tiny "$out/llama" --arch llama --force
"$alloy" inspect "$out/llama"
