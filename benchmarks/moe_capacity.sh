#!/usr/bin/env bash
# MoE capacity (issue 4): (a) a top-1 MoE with 8 experts vs the dense FFN of one expert's size at
# 4,096 tokens x d=384, forward and forward+backward timed alternately (medians, 2 threads);
# (b) moe_transformer vs dense_transformer (equal FLOPs per token) trained identically on SST-2,
# held-out (dev) accuracy and loss. Writes benchmarks/results/moe_capacity.{json,md}.
# About 10 minutes on 2 quiet CPU cores; pass --quick for a ~3 minute smoke run (1 epoch on 12k
# sentences, fewer timing rounds) and --json PATH to write elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
.venv/bin/dynets bench moe --threads 2 --json benchmarks/results/moe.json "$@"
