#!/usr/bin/env bash
# FID-50K, sFID, IS, precision, recall of multi-budget ELIT-SiT-XL/2, 512 px, at the full budget,
# no CFG (Euler, 50 steps). Other budgets: append inference_budget=0.5 (a new run folder each).
#   REF_BATCH=/data/VIRTUAL_imagenet512.npz INCEPTION_WEIGHTS=/data/weights-inception-2015-12-05-6726825d.pth \
#   CKPT=exps/elit-sit-xl-2-512-multibudget/checkpoints/0400000.pt bash experiments/evaluation/eval_elit_sit_xl_512_multibudget.sh [key=value ...]
# Variables and outputs: see generate_and_evaluate.sh and docs/GENERATION.md.
set -euo pipefail
# the training config whose run this evaluates (its output_dir/exp_name give the default CKPT)
export TRAIN_CONFIG=${TRAIN_CONFIG:-experiments/train/elit_sit_xl_2_512_multibudget.yaml}
export CKPT=${CKPT:-exps/elit-sit-xl-2-512-multibudget/checkpoints/0400000.pt}
exec bash "$(dirname "${BASH_SOURCE[0]}")/generate_and_evaluate.sh" experiments/generation/elit_sit_xl_512.yaml "$@"
