#!/usr/bin/env bash
# Export (issue 6): the early-exit CIFAR-10 model exported per stage block and exit head (ONNX run
# with onnxruntime, torch.export) and as a torch.cond whole graph; equality with the eager model and
# eager vs exported speed at batch 1 and 64. Writes benchmarks/results/export.{json,md}.
# --quick: a digits model, a minute or two.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=2
.venv/bin/python -m dynets.bench.deploy export --threads 2 --json benchmarks/results/export.json "$@"
