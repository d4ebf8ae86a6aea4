#!/usr/bin/env bash
# Early exit on CIFAR-10 (issue 2): trains the static ResNet and its multi-exit twin identically,
# calibrates on the validation split, measures on the test split, times both in one process.
# Writes benchmarks/results/early_exit_cifar10.{json,md} and the PNGs beside them.
# About an hour on 2 CPU cores; trained models are cached in ~/.cache/dynets/bench, so a re-run
# with the same settings only repeats evaluation and timing (do that on a quiet machine).
set -euo pipefail
cd "$(dirname "$0")/.."
# Headline: recipe "finetune" (exits trained on the frozen static backbone, then the whole network
# fine-tuned 10 epochs). Earlier recipes: --recipe frozen / joint with --json ..._frozen.json / _joint.json.
.venv/bin/dynets bench early-exit --data cifar10 --epochs 12 --recipe finetune --finetune-epochs 10 \
    --json benchmarks/results/early_exit_cifar10.json "$@"
