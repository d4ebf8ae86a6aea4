#!/usr/bin/env bash
# Block skipping on a deeper backbone (issue 4): the zoo's ResNet with 5-5-5 blocks (ResNet-32
# layout, 138 MFLOPs) behind skip gates, against the default ResNet-20 layout (3-3-3) and the
# cheaper static baselines, every static model trained as long as the skip model (12 epochs, then
# the skip fine-tune's 6 more at lr 0.02). Budgets are fractions of the deep backbone's FLOPs, so
# 50% costs about 0.85 of a ResNet-20. SkipNet's own results are on deep ResNets (38-110 layers),
# where more blocks are redundant than in a ResNet-20.
# Writes benchmarks/results/skip_deep_cifar10.{json,md} and _pareto.png. Training ~40 minutes on 2
# quiet CPU cores (models cached in ~/.cache/dynets/bench; the baselines are shared with
# skip_width_cifar10.sh), then ~10 minutes of evaluation and timing.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m dynets.bench.skip_width --data cifar10 --parts skip \
  --backbone '{"blocks": [5, 5, 5]}' \
  --baselines '{"r20": {}, "shallow": {"blocks": [2, 2, 2]}, "narrow": {"widths": [24, 48, 96]}}' \
  --budgets 0.4,0.5,0.6,0.7 --operating-budget 0.5 \
  --json benchmarks/results/skip_deep_cifar10.json "$@"
