#!/usr/bin/env bash
# Spatial dynamic networks on CIFAR-10 (issue 5), 2 CPU threads:
#   ViT: static vit_tiny vs DynamicViT token pruning (keep ratios 0.7 and 0.5, fine-tuned from the
#   static ViT with distillation), A-ViT halting (fine-tuned likewise) and ToMe merging (r = 4, 8,
#   no training): accuracy drop and images/s gain at batch 1 and 64;
#   glance and focus vs the static ResNet trained with the same schedule: accuracy vs mean FLOPs,
#   an operating point calibrated on validation data, and its wall-clock.
# Writes benchmarks/results/vit_cifar10.{json,md} and the PNGs beside them (kept patches, halting
# depth, merged groups, where glance-and-focus looked, trade-off plots).
# Designed for about 45 minutes on 2 CPU cores; trained models are cached in ~/.cache/dynets/bench,
# so a re-run with the same settings only repeats evaluation and timing (do that on a quiet machine).
# Quick check (a few minutes): benchmarks/vit_cifar10.sh --quick --json /tmp/vit_quick.json
# The reference ViT run (session 13, results/vit_cifar10_long*.json; ~45 min + ~30 min for the 4-epoch
# fine-tunes): benchmarks/vit_cifar10.sh --parts vit --train-limit 0 --vit-epochs 10 --finetune-epochs 4 \
#   --tome-r 8,10 --json benchmarks/results/vit_cifar10_long_ft4.json
# Session 17 (keep predictors after blocks 0, 2, 4; ~90 min with training, on an AMD EPYC host):
# benchmarks/vit_cifar10.sh --parts vit --train-limit 0 --vit-epochs 10 --finetune-epochs 4 \
#   --tome-r 8,10,12 --dvit-prune-after 0,2,4 --json benchmarks/results/vit_cifar10_long_ft4_early.json
# and again from the cache with the A-ViT threshold knob (~10 min): the same flags plus
#   --halting-thresholds 0.99,0.9,0.8,0.7 --json benchmarks/results/vit_cifar10_long_ft4_early_halt.json
# Session 18 (A-ViT recipes that halt earlier; each A-ViT ~18 min, the rest from the cache): the session-17
# flags plus --keep-ratios 0.7,0.8,0.5 --halting-thresholds 0.99,0.9 and
#   --halting-target-depth 3.5 --halting-distr-weight 1.0 --json benchmarks/results/vit_cifar10_long_ft4_early_avit35.json
#   --halting-target-depth 3 --halting-distr-weight 1.0 --json benchmarks/results/vit_cifar10_long_ft4_early_avit30.json
# and DynamicViT with keep stages after blocks 1, 2, 4 (~24 min to train): the prior-3.5 command with
#   --dvit-prune-after 1,2,4 (not 0,2,4) --keep-ratios 0.7,0.75,0.8 --json benchmarks/results/vit_cifar10_long_ft4_mid.json
# Session 19 (the control: the static ViT given the same 4-epoch fine-tune, now on by default, ~20 min once;
# ToMe then merges on its weights): the stage-1/2/4 command above
#   --json benchmarks/results/vit_cifar10_long_ft4_mid_ctrl.json
# and DynamicViT fine-tuned at the control's lr (~24 min to train): that command plus
#   --dvit-lr 3e-4 --dvit-predictor-lr-scale 3 --json benchmarks/results/vit_cifar10_long_ft4_mid_ctrl_dlr3.json
# and that again from the cache with --tome-r 10,11,8 --json benchmarks/results/vit_cifar10_long_ft4_mid_ctrl_dlr3_run2.json
#   (and once more: ..._ctrl_dlr3_run3.json)
# Session 20 (ToMe's merge and DynamicViT's gather by whole rows; the same models from the cache, ~13 min each):
#   the _ctrl_dlr3_run2 flags plus --no-progress --json benchmarks/results/vit_cifar10_long_ft4_mid_ctrl_fastmerge.json
#   (and again: ..._fastmerge_run2.json, ..._fastmerge_run3.json with --tome-r 10,11,8,9)
# and ToMe fine-tuned with merging on at r = 11 (~15 min to train; timing now alternates over groups of batches):
#   benchmarks/vit_cifar10.sh --parts vit --train-limit 0 --vit-epochs 10 --finetune-epochs 4 --tome-r 11,10,9,8 \
#   --tome-finetune-r 11 --dvit-prune-after 1,2,4 --keep-ratios 0.7,0.8 --halting-thresholds 0.99 \
#   --halting-target-depth 3.5 --halting-distr-weight 1.0 --dvit-lr 3e-4 --dvit-predictor-lr-scale 3 \
#   --no-progress --json benchmarks/results/vit_cifar10_long_ft4_mid_ctrl_tomeft.json   (again: ..._tomeft_run2.json)
# Session 21 (ToMe fine-tuned with merging at r = 9 and at r = 12, ~14 min each to train; fewer rows):
#   benchmarks/vit_cifar10.sh --parts vit --train-limit 0 --vit-epochs 10 --finetune-epochs 4 --tome-r 9,8 \
#   --tome-finetune-r 9 --dvit-prune-after 1,2,4 --keep-ratios 0.7 --halting-thresholds 0.99 \
#   --halting-target-depth 3.5 --halting-distr-weight 1.0 --dvit-lr 3e-4 --dvit-predictor-lr-scale 3 \
#   --no-progress --json benchmarks/results/vit_cifar10_long_ft4_mid_ctrl_tomeft9.json
#   and the same with --tome-r 12,11 --tome-finetune-r 12 --json benchmarks/results/vit_cifar10_long_ft4_mid_ctrl_tomeft12.json
#   (from the cache with --tome-r 13,12: ..._tomeft12_run2.json), with --tome-r 14,13 --tome-finetune-r 13
#   --json ..._tomeft13.json, and the r = 9 model again from the cache with --tome-r 9,10: ..._tomeft9_run2.json
#   and with --tome-r 10 --tome-finetune-r 10 --json ..._tomeft10.json
# Session 22 (compiled timing: the static ViT, DynamicViT and ToMe timed compiled by torch.compile; models from the
#   cache, 7-13 min): the _tomeft9 command above plus --compile --json benchmarks/results/vit_cifar10_long_ft4_mid_ctrl_tomeft9_compiled.json,
#   and with --tome-r 13 --tome-finetune-r 13 --compile --json ..._tomeft13_compiled.json
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " == *" --json "* ]]; then
  exec .venv/bin/python -m dynets.bench.spatial --data cifar10 "$@"
fi
exec .venv/bin/python -m dynets.bench.spatial --data cifar10 --json benchmarks/results/vit_cifar10.json "$@"
