#!/usr/bin/env bash
# Dynamic BERT on SST-2 (issue 3): MiniLM-L6 fine-tuned on all of SST-2's training rows (less the
# validation phrases) for one epoch, exits trained by the two_stage (DeeBERT) and distill (FastBERT)
# recipes, policy and recipe chosen on validation, measured on SST-2 dev; DynaBERT widths x depths.
# About 33 minutes on the session-7 host (static fine-tune 18 min, each exit recipe 5 min), then a few
# minutes per re-run (models cached in ~/.cache/dynets/bench).
# Writes benchmarks/results/dynamic_bert_sst2.{json,md} and its PNGs.
# Earlier runs (sessions 3-5): --train-limit 12000 --epochs 2 with the joint recipe too (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/dynets bench bert --threads 2 --train-limit 70000 --epochs 1 --bert-recipes two_stage,distill \
    --json benchmarks/results/dynamic_bert_sst2.json "$@"
