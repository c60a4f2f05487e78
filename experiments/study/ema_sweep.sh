#!/usr/bin/env bash
# The study's EMA-length sweep (docs/STUDY.md, "EMA length"):
#   bash experiments/study/ema_sweep.sh
# trains SiT and the calibrated DFM-SiT of the first setting again for each seed with two post-hoc
# EMA profiles (std 0.05 and 0.10, a snapshot every 100 steps; the profiles do not change the
# training, so these runs retrace the study's runs step for step), then reconstructs the EMA of
# every std of STDS at step 2000 and scores it (SWD, as eval_every) beside the fixed decay 0.995
# (ema_sweep.py). Environment: PYTHON, OUT (default exps), SEEDS ("0 1 2"), JOBS (2), NICE (5), STDS.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
OUT=${OUT:-exps}
SEEDS=${SEEDS:-"0 1 2"}
JOBS=${JOBS:-2}
NICE=${NICE:-5}
STDS=${STDS:-"0.03 0.05 0.07 0.1 0.15 0.2"}
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled OMP_NUM_THREADS=1
DATA=$OUT/study/data
RUNS=$OUT/study/ema_runs
[ -f "$DATA/heldout_swd.npz" ] || nice -n "$NICE" "$PY" experiments/study/build_data.py --dest "$DATA" --heldout-per-class 32
mkdir -p "$RUNS"
{ for seed in $SEEDS; do for model in sit dfm_sit_calibrated; do echo "$model $seed"; done; done; } \
| xargs -P "$JOBS" -L 1 sh -c '
  model=$0 seed=$1
  if [ -f "'"$RUNS"'/${model}_s$seed/checkpoints/0002000.pt" ]; then exit 0; fi
  nice -n "'"$NICE"'" "'"$PY"'" train.py --config experiments/study/base.yaml --config "experiments/study/$model.yaml" \
    data_dir="'"$DATA"'/train" eval_ref_stats="'"$DATA"'/heldout_swd.npz" output_dir="'"$RUNS"'" seed="$seed" \
    exp_name="${model}_s$seed" "posthoc_ema.stds=[0.05,0.1]" posthoc_ema.every=100 posthoc_ema.dtype=float32 posthoc_ema.keep=0 \
    > "'"$RUNS"'/${model}_s$seed.out" 2>&1 && echo "$model seed $seed done: $(date -u +%H:%M:%S)"'
for seed in $SEEDS; do for model in sit dfm_sit_calibrated; do echo "$RUNS/${model}_s$seed"; done; done \
| xargs -P "$JOBS" -I{} sh -c 'nice -n "'"$NICE"'" "'"$PY"'" experiments/study/ema_sweep.py {} --std '"$STDS"' \
    > {}.ema_sweep.jsonl'
cat "$RUNS"/*.ema_sweep.jsonl > "$OUT/study/ema_sweep.jsonl"
