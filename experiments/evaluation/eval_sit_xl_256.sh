#!/usr/bin/env bash
# FID-50K, sFID, IS, precision, recall of SiT-XL/2, 256 px, no CFG (Euler, 50 steps).
#   REF_BATCH=/data/VIRTUAL_imagenet256_labeled.npz INCEPTION_WEIGHTS=/data/weights-inception-2015-12-05-6726825d.pth \
#   CKPT=exps/sit-xl-2-256/checkpoints/0400000.pt bash experiments/evaluation/eval_sit_xl_256.sh [key=value ...]
# Variables and outputs: see generate_and_evaluate.sh and docs/GENERATION.md.
set -euo pipefail
# the training config whose run this evaluates (its output_dir/exp_name give the default CKPT)
export TRAIN_CONFIG=${TRAIN_CONFIG:-experiments/train/sit_xl_2_256.yaml}
export CKPT=${CKPT:-exps/sit-xl-2-256/checkpoints/0400000.pt}
exec bash "$(dirname "${BASH_SOURCE[0]}")/generate_and_evaluate.sh" experiments/generation/sit_xl_256.yaml "$@"
