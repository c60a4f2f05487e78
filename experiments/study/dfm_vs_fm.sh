#!/usr/bin/env bash
# The study (docs/STUDY.md), start to finish on CPU:
#   bash experiments/study/dfm_vs_fm.sh
# 1. builds the 32x32 crops of the scikit-image photographs if missing (no download);
# 2. trains, for each seed, SiT, DFM-SiT with the reference recipe, DFM-SiT calibrated
#    (dfm_sit_calibrated.yaml: stage scale + time shift), DFM-SiT with stage scales only
#    (dfm_sit_scales.yaml), the two SiT controls with the same levers on SiT's one stage
#    (sit_scales.yaml, sit_time_shift.yaml) and the multi-budget ELIT-SiT, plus DFM-ELIT-SiT calibrated for the
#    first seed; two runs at a time, one CPU thread each, SWD against the held-out crops every
#    250 steps, a checkpoint every 250 steps (for rescoring);
# 3. measures the real-vs-real SWD floor, draws the curves, writes the tables, and scores the
#    ELIT runs at every budget against their FLOPs (budget_curve.py).
# Environment: PYTHON (default python), OUT (default exps/study), SEEDS (default "0 1 2"),
# NICE (default 5), JOBS (parallel runs, default 2), EXTRA (extra key=value overrides for every run,
# e.g. "max_train_steps=500").
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
OUT=${OUT:-exps/study}
SEEDS=${SEEDS:-"0 1 2"}
NICE=${NICE:-5}
JOBS=${JOBS:-2}
EXTRA=${EXTRA:-}
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled OMP_NUM_THREADS=1
DATA=$OUT/data
RUNS=$OUT/runs
HELDOUT=32   # held-out crops per class: 256 in all = eval_num_samples (SWD compares equal-size sets)
FIRST=${SEEDS%% *}

if [ ! -f "$DATA/heldout_swd.npz" ]; then
  nice -n "$NICE" "$PY" experiments/study/build_data.py --dest "$DATA" --heldout-per-class "$HELDOUT"
fi
mkdir -p "$RUNS"
# one line per run: "<config name> <seed>"; run JOBS at a time
{
  for seed in $SEEDS; do
    for model in sit dfm_sit dfm_sit_calibrated dfm_sit_scales sit_scales sit_time_shift elit_sit; do
      echo "$model $seed"
    done
  done
  echo "dfm_elit_sit_calibrated $FIRST"   # the one-seed run: DFM on the ELIT backbone
} | xargs -P "$JOBS" -L 1 sh -c '
  model=$0 seed=$1
  if [ -f "'"$RUNS"'/${model}_s$seed/checkpoints/0002000.pt" ]; then exit 0; fi
  nice -n "'"$NICE"'" "'"$PY"'" train.py --config experiments/study/base.yaml --config "experiments/study/$model.yaml" \
    data_dir="'"$DATA"'/train" eval_ref_stats="'"$DATA"'/heldout_swd.npz" output_dir="'"$RUNS"'" \
    seed="$seed" exp_name="${model}_s$seed" checkpointing_steps=250 checkpoints_total_limit=null '"$EXTRA"' > "'"$RUNS"'/${model}_s$seed.out" 2>&1 \
    && echo "$model seed $seed done: $(date -u +%H:%M:%S)"'

nice -n "$NICE" "$PY" experiments/study/floor.py --data "$DATA" --num 256 --repeats 3 --out "$OUT/floor.json"
runs() { for seed in $SEEDS; do echo "$RUNS/$1_s$seed"; done; }
# shellcheck disable=SC2046
"$PY" -m evaluation.compare $(runs sit) $(runs dfm_sit) $(runs dfm_sit_calibrated) $(runs dfm_sit_scales) \
  $(runs sit_scales) $(runs sit_time_shift) $(runs elit_sit) \
  "$RUNS/dfm_elit_sit_calibrated_s$FIRST" --metric swd --interpolate --out "$OUT/compare_swd.png" \
  --table "$OUT/compare_swd.md" > /dev/null
for metric in swd swd_32 swd_16; do  # the mean and the two pyramid levels (32 px detail, 16 px)
  # shellcheck disable=SC2046
  "$PY" experiments/study/summarize.py --sit $(runs sit) --dfm $(runs dfm_sit) --names SiT "DFM-SiT (reference)" \
    --group "DFM-SiT (calibrated)" $(runs dfm_sit_calibrated) --group "DFM-SiT (stage scales only)" \
    $(runs dfm_sit_scales) --group "SiT x 0.7 (control)" $(runs sit_scales) \
    --group "SiT time shift (control)" $(runs sit_time_shift) \
    --group "ELIT-SiT (full budget)" $(runs elit_sit) \
    --group "DFM-ELIT-SiT (calibrated)" "$RUNS/dfm_elit_sit_calibrated_s$FIRST" \
    --floor "$OUT/floor.json" --metric "$metric" --out "$OUT" > /dev/null
done
# shellcheck disable=SC2046
"$PY" experiments/study/budget_curve.py --elit $(runs elit_sit) --sit $(runs sit) --out "$OUT" > /dev/null
# the sampler check: SiT with Heun (10 steps, 19 NFE) at steps 1000, 1500, 2000; calibrated DFM's Heun splits
# shellcheck disable=SC2046
"$PY" experiments/study/resample.py $(runs sit) --set eval_sampler.method=heun \
  --set "eval_sampler.num_steps_per_scale=[10]" --steps 1000 1500 2000 --out "$OUT/resample_heun.jsonl" > /dev/null
for split in "[9,1]" "[8,2]"; do
  # shellcheck disable=SC2046
  "$PY" experiments/study/resample.py $(runs dfm_sit_calibrated) --set eval_sampler.method=heun \
    --set "eval_sampler.num_steps_per_scale=$split" --steps 2000 --out "$OUT/resample_heun.jsonl" > /dev/null
done
echo "wrote $OUT/study_swd{,_32,_16}.{png,md}, $OUT/compare_swd.{png,md}, $OUT/elit_budgets.{png,md,jsonl}, $OUT/resample_heun.jsonl"
