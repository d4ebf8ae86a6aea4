#!/usr/bin/env bash
# Dynamic BERT on SST-2 (issue 3): MiniLM-L6 fine-tuned on SST-2's training rows less 2,000 validation
# sentences (complete training sentences, distributed like dev) and their phrases, for one epoch; exits
# trained by the two_stage (DeeBERT), distill (FastBERT) and joint_distill recipes; policy and recipe
# chosen on validation (drop + 1 SE within 1 point), measured on SST-2 dev; DynaBERT widths x depths.
# About 45 minutes of training on the session-9 host (static fine-tune ~14 min, two_stage and distill
# ~5 min each, joint_distill ~15 min, DynaBERT ~4 min), then about 5 minutes per re-run (models cached
# in ~/.cache/dynets/bench).
# Writes benchmarks/results/dynamic_bert_sst2.{json,md} and its PNGs.
# Earlier runs: sessions 3-5 --train-limit 12000 --epochs 2; sessions 7-8 --bert-val-rows long (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/dynets bench bert --threads 2 --train-limit 70000 --epochs 1 --bert-recipes two_stage,distill,joint_distill \
    --json benchmarks/results/dynamic_bert_sst2.json "$@"
