#!/usr/bin/env bash
# The study's second setting and its controls (docs/STUDY.md, "Beyond one setting"):
#   bash experiments/study/second_setting.sh
# 1. builds the 64x64 crops (build_data.py --size 64) and the 32x32 ones if missing (no download);
# 2. trains, for each seed, at 64x64 with /8 models (64 tokens, as the first setting): SiT,
#    calibrated DFM-SiT with the first setting's fixed scales and with `stage_scales: auto`,
#    multi-budget ELIT-SiT, calibrated DFM-ELIT-SiT, SiT controls with ELIT-SiT's parameters
#    (sit_params.yaml) and FLOPs (sit_flops.yaml), a calibrated DFM-SiT with DFM-ELIT-SiT's parameters
#    (s64/dfm_sit_params.yaml); and the two SiT controls in the first setting (32x32);
#    two runs at a time, one CPU thread each, seed by seed (restartable: finished runs are skipped).
# The tables and curves of docs/STUDY.md come from summarize.py and budget_curve.py on these runs.
# Environment: PYTHON (default python), OUT (default exps), SEEDS (default "0 1 2"), JOBS (default 2),
# NICE (default 5), RUNS_64 / RUNS_32 (the configs to run, default all), EXTRA (overrides for every run).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
OUT=${OUT:-exps}
SEEDS=${SEEDS:-"0 1 2"}
JOBS=${JOBS:-2}
NICE=${NICE:-5}
EXTRA=${EXTRA:-}
RUNS_64=${RUNS_64:-"sit dfm_sit_calibrated dfm_sit_auto elit_sit dfm_elit_sit_calibrated sit_params sit_flops dfm_sit_params"}
RUNS_32=${RUNS_32:-"sit_params sit_flops"}
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled OMP_NUM_THREADS=1
D64=$OUT/study64/data
D32=$OUT/study/data
[ -f "$D64/heldout_swd.npz" ] || nice -n "$NICE" "$PY" experiments/study/build_data.py --dest "$D64" --size 64 --heldout-per-class 32
[ -f "$D32/heldout_swd.npz" ] || nice -n "$NICE" "$PY" experiments/study/build_data.py --dest "$D32" --heldout-per-class 32
mkdir -p "$OUT/study64/runs" "$OUT/study/runs"
# one line per run: "<setting> <config> <seed>", seed by seed (the first seed of every model first)
{
  for seed in $SEEDS; do
    for model in $RUNS_64; do echo "64 $model $seed"; done
    for model in $RUNS_32; do echo "32 $model $seed"; done
  done
} | xargs -P "$JOBS" -L 1 sh -c '
  size=$0 model=$1 seed=$2
  if [ "$size" = 64 ]; then base=base64.yaml; conf="s64/$model.yaml"; data="'"$D64"'"; runs="'"$OUT"'/study64/runs"
  else base=base.yaml; conf="$model.yaml"; data="'"$D32"'"; runs="'"$OUT"'/study/runs"; fi
  if [ -f "$runs/${model}_s$seed/checkpoints/0002000.pt" ]; then exit 0; fi
  nice -n "'"$NICE"'" "'"$PY"'" train.py --config "experiments/study/$base" --config "experiments/study/$conf" \
    data_dir="$data/train" eval_ref_stats="$data/heldout_swd.npz" output_dir="$runs" seed="$seed" \
    exp_name="${model}_s$seed" checkpointing_steps=250 checkpoints_total_limit=null '"$EXTRA"' \
    > "$runs/${model}_s$seed.out" 2>&1 && echo "$size $model seed $seed done: $(date -u +%H:%M:%S)"'
