#!/usr/bin/env bash
# Early exit on CIFAR-10 (issue 2): trains the static ResNet and its multi-exit twin identically,
# calibrates on the validation split, measures on the test split, times both in one process.
# Writes benchmarks/results/early_exit_cifar10.{json,md} and the PNGs beside them.
# About 75 minutes on 2 CPU cores; trained models are cached in ~/.cache/dynets/bench, so a re-run
# with the same settings only repeats evaluation and timing (do that on a quiet machine).
set -euo pipefail
cd "$(dirname "$0")/.."
# Headline (session 11): the zoo's ResNet at 1.5x width (48/96/192 channels, 182 MFLOPs) with
# two-conv exit heads; recipe "finetune" (exits trained on the frozen static backbone, then the whole
# network fine-tuned 10 epochs; the static model gets the same fine-tune).
# The zoo's default width (32/64/128, conv heads), the headline until session 10:
#   .venv/bin/dynets bench early-exit --data cifar10 --epochs 12 --recipe finetune --finetune-epochs 10 \
#       --json benchmarks/results/early_exit_cifar10_narrow.json
# Other runs (longer schedule, conv2 heads, frozen, joint) are listed in benchmarks/README.md.
.venv/bin/dynets bench early-exit --data cifar10 --epochs 12 --recipe finetune --finetune-epochs 10 \
    --set 'widths=[48,96,192]' --set 'head={"kind":"conv2"}' \
    --json benchmarks/results/early_exit_cifar10.json "$@"
