#!/usr/bin/env bash
# Serving (issue 6): the budget-adaptive server against the same server pinned to its most accurate
# operating point, on loopback, at the rate the pinned one serves within the SLO (p95 <= 100 ms) and
# at 2x and 4x that rate. Uses the cached early-exit CIFAR-10 model of benchmarks/early_exit_cifar10.sh
# (else a digits model). Writes benchmarks/results/serving.{json,md,png}. About 10 minutes; run it on
# a quiet machine. --quick: a two-minute run on digits (e.g. --quick --json /tmp/serving.json).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
.venv/bin/python -m dynets.bench.serving --json benchmarks/results/serving.json "$@"
