#!/usr/bin/env bash
# Export (issue 6), the families no other benchmark trains: Skip-LSTM, ACT and frame-skip RNNs on UCR
# ECG5000, the MoE transformer on SST-2, A-ViT halting on CIFAR-10. Each is trained briefly (cached),
# exported to ONNX and torch.export, and compared with its eager self on the test split: decisions,
# predictions, logits, per-sample FLOPs, eager vs exported speed at batch 1 and 64.
# Writes benchmarks/results/export_families.{json,md}. About 15 minutes; run it on a quiet machine.
# --quick: one epoch on 2,000 samples each (e.g. --quick --json /tmp/ef.json).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=2
.venv/bin/python -m dynets.bench.export_families --threads 2 --json benchmarks/results/export_families.json "$@"
