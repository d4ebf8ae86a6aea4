#!/usr/bin/env bash
# Dynamic routing and dynamic convolution on CIFAR-10 (issue 4): trains static_resnet, dyconv_resnet,
# routed_resnet and a static ResNet of the routed model's FLOPs identically (12 epochs, the early-exit
# benchmark's recipe, so its trained static ResNet is reused), calibrates the routing cost bias on the
# validation split, measures accuracy, mean FLOPs and wall-clock (2 threads, batch 1 and 64) on the
# test split, and times DynamicConv2d as one grouped convolution vs a per-sample loop.
# Writes benchmarks/results/routing_params_cifar10.{json,md} and the Pareto PNG beside them.
# Several hours on 2 CPU cores; trained models are cached in ~/.cache/dynets/bench, so a re-run with
# the same settings only repeats evaluation and timing (do that on a quiet machine).
# Smoke test: benchmarks/routing_params_cifar10.sh --quick --json /tmp/rp/routing_params.json
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m dynets.bench.routing_params --data cifar10 --json benchmarks/results/routing_params_cifar10.json "$@"
