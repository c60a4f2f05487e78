#!/usr/bin/env bash
# FID-50K, sFID, IS, precision, recall of DFM-SiT-B/2, 256 px, no CFG (DFM Euler [40, 10], tau 0.1).
#   REF_BATCH=/data/VIRTUAL_imagenet256_labeled.npz INCEPTION_WEIGHTS=/data/weights-inception-2015-12-05-6726825d.pth \
#   CKPT=exps/dfm-sit-b-2-256/checkpoints/0400000.pt bash experiments/evaluation/eval_dfm_sit_b_256.sh [key=value ...]
# Variables and outputs: see generate_and_evaluate.sh and docs/GENERATION.md.
set -euo pipefail
# the training config whose run this evaluates (its output_dir/exp_name give the default CKPT)
export TRAIN_CONFIG=${TRAIN_CONFIG:-experiments/train/dfm_sit_b_2_256.yaml}
export CKPT=${CKPT:-exps/dfm-sit-b-2-256/checkpoints/0400000.pt}
exec bash "$(dirname "${BASH_SOURCE[0]}")/generate_and_evaluate.sh" experiments/generation/dfm_sit_b_256.yaml "$@"
