#!/usr/bin/env bash
# Dynamic BERT on SST-2 (issue 3): MiniLM-L6 fine-tuned statically vs with an exit after every layer
# (two_stage and distill recipes, the better one on validation kept), plus the DynaBERT width x depth
# grid. Validation is carved from SST-2 train; SST-2 dev (872 sentences) is the test set.
# Writes benchmarks/results/dynamic_bert_sst2.{json,md} and the PNGs beside them
# (_curves: accuracy vs wall-clock speed-up per policy; _pareto: accuracy vs FLOPs; _dynabert: grid).
# Trains on a seeded subset of 12,000 SST-2 training rows for 2 epochs at max_length 64 to fit a
# 2-core CPU budget (roughly 20-40 minutes); trained models are cached in ~/.cache/dynets/bench, so a
# re-run with the same settings repeats only the evaluation and the timing (do that on a quiet machine).
# Extra arguments are passed on, e.g. --quick (a few minutes) or --train-limit N.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/dynets bench bert --threads 2 --json benchmarks/results/dynamic_bert_sst2.json "$@"
