#!/usr/bin/env bash
# Set up .venv and run the demo on built-in defaults (see README.md). Output goes to runs/demo.
#
# Today: builds a small model family (a base and three other checkpoints of one architecture),
# then merges it with three shipped recipes (uniform soup, task arithmetic, TIES) and inspects
# the result. It grows as capabilities land (real corpora, trained experts, evaluation).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
alloy=.venv/bin/alloy
family=runs/demo/family   # the path the recipes under examples/merge/ refer to
seed=0
for name in base ft-a ft-b ft-c; do
  "$alloy" lab tiny "$family/$name" --arch llama --layers 4 --seed $seed --force
  seed=$((seed + 1))
done
for method in linear task_arithmetic ties; do
  echo "== alloy merge examples/merge/$method.yaml runs/demo/$method"
  "$alloy" merge "examples/merge/$method.yaml" "runs/demo/$method" --force
done
"$alloy" inspect runs/demo/ties
