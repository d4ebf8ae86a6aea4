#!/usr/bin/env bash
# Input-adaptive quantization (issue 6): fp32 vs int8 (static FX quantization, x86 kernels) vs
# adaptive precision (int8 first, re-run in fp32 when the int8 prediction is not confident), with
# and without early exits: accuracy, mean FLOPs, speed at batch 1 and 64 on the CIFAR-10 model.
# Writes benchmarks/results/quantization.{json,md}. --quick: a digits model, about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=2
.venv/bin/python -m dynets.bench.deploy quantization --threads 2 --json benchmarks/results/quantization.json "$@"
