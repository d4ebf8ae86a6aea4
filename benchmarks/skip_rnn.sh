#!/usr/bin/env bash
# Skip-RNN vs the full RNN (issue 5): UCR ECG5000, UCR ElectricDevices and spoken digits (FSDD,
# 13 MFCCs per 10 ms frame), LSTM with 256 hidden units. Trains the full LSTM (fused kernel),
# fine-tunes its Skip-LSTM twin with the budget loss, picks the update threshold on validation
# (within 1 point of the full RNN), reports test accuracy, the fraction of state updates and the
# wall-clock speed-up at batch 64 (per batch and streamed), 1 and 256 with 2 threads; then a
# frame-skipping RNN fine-tuned likewise, its run-time knob (skip cap or skip bias) chosen on
# validation the same way (accuracy, frames read, speed-up). It trains with a random skip cap per
# sequence; `--no-frame-train-caps` trains the policy alone, as before session 16
# (-> results/skiprnn_policy_only.*). Writes benchmarks/results/skiprnn.{json,md} and PNGs beside them.
# About 20 minutes on 2 CPU cores; trained models are cached in
# ~/.cache/dynets/bench, so a re-run with the same settings only repeats evaluation and timing (do
# that on a quiet machine).
# Reduced run: python -m dynets.bench.temporal --quick --json /tmp/skiprnn_quick.json  (< 5 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m dynets.bench.temporal --json benchmarks/results/skiprnn.json "$@"
