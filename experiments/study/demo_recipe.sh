#!/usr/bin/env bash
# Does the study's stage calibration help the CPU demo (experiments/train/demo_cpu.yaml)? Trains the
# demo as it ships and with the calibration (stage_scales: auto; auto + the study's coarse time
# shift), 3 seeds each, and scores the EMA samples against 512 held-out demo images (SWD, the demo
# data generator with another seed) at steps 600 and 1200 (docs/TRAINING.md, "The CPU demo").
#   bash experiments/study/demo_recipe.sh        # PYTHON, OUT (default exps/demo_recipe), SEEDS, JOBS
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
OUT=${OUT:-exps/demo_recipe}
SEEDS=${SEEDS:-"0 1 2"}
JOBS=${JOBS:-2}
NICE=${NICE:-5}
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled OMP_NUM_THREADS=1
mkdir -p "$OUT"
if [ ! -f "$OUT/heldout_swd.npz" ]; then
  "$PY" -c "from training.demo_data import write_demo_dataset as w; w('$OUT/heldout', resolution=16, num_classes=8, images_per_class=64, seed=1)"
  "$PY" -m evaluation.ref_stats "$OUT/heldout" --out "$OUT/heldout_swd.npz" --no-inception --no-dinov2 \
    --swd-images all --no-progress
fi
{ for seed in $SEEDS; do for variant in shipped auto auto_shift; do echo "$variant $seed"; done; done; } \
| xargs -P "$JOBS" -L 1 sh -c '
  variant=$0 seed=$1
  case $variant in
    shipped) extra="";;
    auto) extra="stage_scales=auto";;
    auto_shift) extra="stage_scales=auto stage_time_shift=[0.357,0.0]";;
  esac
  if [ -f "'"$OUT"'/runs/${variant}_s$seed/checkpoints/0001200.pt" ]; then exit 0; fi
  mkdir -p "'"$OUT"'/runs"
  nice -n "'"$NICE"'" "'"$PY"'" train.py --config experiments/train/demo_cpu.yaml output_dir="'"$OUT"'/runs" \
    exp_name="${variant}_s$seed" seed="$seed" eval_every=600 eval_num_samples=512 "eval_metrics=[swd]" \
    eval_ref_stats="'"$OUT"'/heldout_swd.npz" eval_sampler.batch_size=128 $extra \
    > "'"$OUT"'/runs/${variant}_s$seed.out" 2>&1 && echo "$variant seed $seed done: $(date -u +%H:%M:%S)"'
