#!/usr/bin/env bash
# The DFM vs flow-matching study (docs/STUDY.md), start to finish on CPU:
#   bash experiments/study/dfm_vs_fm.sh
# 1. builds the 32x32 crops of the scikit-image photographs if missing (no download);
# 2. trains SiT and DFM-SiT (S = 2) for each seed, the two runs of a seed side by side (one CPU
#    thread each), scoring SWD against the held-out crops every 250 steps;
# 3. measures the real-vs-real SWD floor, draws the curves and writes the tables.
# Environment: PYTHON (default python), OUT (default exps/study), SEEDS (default "0 1 2"),
# NICE (default 5), EXTRA (extra key=value overrides for both models, e.g. "max_train_steps=500").
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
OUT=${OUT:-exps/study}
SEEDS=${SEEDS:-"0 1 2"}
NICE=${NICE:-5}
EXTRA=${EXTRA:-}
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled
DATA=$OUT/data
RUNS=$OUT/runs
HELDOUT=32   # held-out crops per class: 256 in all = eval_num_samples (SWD compares equal-size sets)

if [ ! -f "$DATA/heldout_swd.npz" ]; then
  nice -n "$NICE" "$PY" experiments/study/build_data.py --dest "$DATA" --heldout-per-class "$HELDOUT"
fi
common=(--config experiments/study/base.yaml data_dir="$DATA/train" eval_ref_stats="$DATA/heldout_swd.npz"
        output_dir="$RUNS")
for seed in $SEEDS; do
  pids=()
  for model in sit dfm_sit; do
    mkdir -p "$RUNS"
    # shellcheck disable=SC2086
    nice -n "$NICE" "$PY" train.py "${common[@]}" --config "experiments/study/$model.yaml" seed="$seed" \
      exp_name="${model}_s$seed" $EXTRA > "$RUNS/${model}_s$seed.out" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  echo "seed $seed done: $(date -u +%H:%M:%S)"
done
nice -n "$NICE" "$PY" experiments/study/floor.py --data "$DATA" --num 256 --repeats 3 --out "$OUT/floor.json"
sit_runs=(); dfm_runs=()
for seed in $SEEDS; do sit_runs+=("$RUNS/sit_s$seed"); dfm_runs+=("$RUNS/dfm_sit_s$seed"); done
"$PY" -m evaluation.compare "${sit_runs[@]}" "${dfm_runs[@]}" --metric swd --out "$OUT/compare_swd.png" \
  --table "$OUT/compare_swd.md" > /dev/null
for metric in swd swd_32 swd_16; do  # the mean and the two pyramid levels (32 px detail, 16 px)
  "$PY" experiments/study/summarize.py --sit "${sit_runs[@]}" --dfm "${dfm_runs[@]}" --floor "$OUT/floor.json" \
    --metric "$metric" --out "$OUT" > /dev/null
done
echo "wrote $OUT/study_swd{,_32,_16}.{png,md}, $OUT/compare_swd.png, $OUT/compare_swd.md"
