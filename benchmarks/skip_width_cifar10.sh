#!/usr/bin/env bash
# Block skipping and dynamic width on CIFAR-10 (issue 4): the static ResNet (shared with the
# early-exit benchmark's cache: 12 epochs, reused if that benchmark already trained it), two static
# baselines of lower cost (narrower, shallower), skip_resnet fine-tuned from the static model with
# the budget loss, and slimmable_resnet fine-tuned with the sandwich rule; thresholds calibrated on
# validation, everything reported on test, wall-clock vs the static model at batch 1 and 64.
# Every static model then trains the skip fine-tune's 6 extra epochs too (like for like), and each
# calibrated budget is compared with the best static model (or mix of two) of at most its time.
# Writes benchmarks/results/skip_width_cifar10.{json,md} and _pareto.png.
# Training takes roughly 1.5 hours on 2 quiet CPU cores (the slimmable net's sandwich steps cost
# about 3x a static step); trained models are cached in ~/.cache/dynets/bench, so a re-run only
# repeats evaluation, calibration and timing (about 15 minutes; do it on a quiet machine).
# Reduced run (minutes): .venv/bin/python -m dynets.bench.skip_width --quick --json /tmp/sw.json
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m dynets.bench.skip_width --data cifar10 --json benchmarks/results/skip_width_cifar10.json "$@"
