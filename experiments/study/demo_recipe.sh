#!/usr/bin/env bash
# Scores variants of the CPU demo (experiments/train/demo_cpu.yaml): trains each variant with 3 seeds
# and scores the EMA samples against 512 held-out demo images (SWD, the demo data generator with
# another seed) at the run's evaluation steps; then, for every sampler in SAMPLERS, samples 512 images
# from each run's final checkpoint with generate.py and scores them the same way (docs/TRAINING.md,
# "The CPU demo").
#   bash experiments/study/demo_recipe.sh        # PYTHON, OUT (default exps/demo_recipe), SEEDS, JOBS, NICE
#   VARIANTS="shipped p2" SAMPLERS="euler: heun_cfg2:method=heun+cfg_scale=2" bash experiments/study/demo_recipe.sh
# VARIANTS (default: shipped auto auto_shift, the calibration study) names the training variants of
# `variant_overrides` below. SAMPLERS (default: none) is a list of NAME:KEY=VALUE[+KEY=VALUE...] of
# generate.py keys. A run's log ends with its training time ("done: N steps in S s"); a sampler's
# score is $OUT/samples/VARIANT_sSEED_NAME.json ({"swd": ..., "sampling_seconds": ...}).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
OUT=${OUT:-exps/demo_recipe}
SEEDS=${SEEDS:-"0 1 2"}
JOBS=${JOBS:-2}
NICE=${NICE:-5}
VARIANTS=${VARIANTS:-"shipped auto auto_shift"}
SAMPLERS=${SAMPLERS:-}
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled OMP_NUM_THREADS=1 PY OUT NICE

# The demo config's keys that a variant changes (train.py key=value).
variant_overrides() {
  case $1 in
    shipped) echo "";;
    auto) echo "stage_scales=auto";;
    auto_shift) echo "stage_scales=auto stage_time_shift=[0.357,0.0]";;
    # longer runs, scored every 1,200 steps (the lr is constant: their step 1200 is the demo's end)
    steps2400) echo "max_train_steps=2400 eval_every=1200 sampling_steps=1200 checkpointing_steps=1200";;
    steps4800) echo "max_train_steps=4800 eval_every=1200 sampling_steps=1200 checkpointing_steps=1200";;
    lr1e-3_2400) echo "lr=1e-3 $(variant_overrides steps2400)";;
    lr4e-3_2400) echo "lr=4e-3 lr_scheduler=constant_with_linear_warmup warmup_steps=100 $(variant_overrides steps2400)";;
    beta0.99_2400) echo "betas=[0.9,0.99] $(variant_overrides steps2400)";;
    ema0.998_2400) echo "ema_decay=0.998 $(variant_overrides steps2400)";;
    sw0.8_2400) echo "stage_weights=[0.8,0.2] $(variant_overrides steps2400)";;
    uniform_2400) echo "weighting=uniform $(variant_overrides steps2400)";;
    combo_2400) echo "lr=1e-3 betas=[0.9,0.99] stage_weights=[0.8,0.2] $(variant_overrides steps2400)";;
    bs64_2400) echo "batch_size=64 $(variant_overrides steps2400)";;
    # model size and resolution, 1,200 steps unless named
    d8) echo "model_overrides.depth=8";;
    h192) echo "model_overrides.hidden_size=192";;
    p2) echo "model=DFM-SiT-S/2";;
    # 32 px with 8 px patches: the same 4x4 token grid (and nearly the same FLOPs) as the 16 px demo
    r32p8_2400) echo "model=DFM-SiT-S/8 resolution=32 data_dir=demo_runs/data/shapes32 preview.upscale=2
      eval_ref_stats=$(heldout 32) $(variant_overrides steps2400)";;
    *) echo "demo_recipe.sh: unknown variant $1" >&2; return 1;;
  esac
}

train_one() {  # VARIANT SEED
  local run=$1_s$2
  grep -q "done:" "$OUT/runs/$run.out" 2>/dev/null && return 0
  nice -n "$NICE" "$PY" train.py --config experiments/train/demo_cpu.yaml output_dir="$OUT/runs" \
    exp_name="$run" seed="$2" eval_every=600 eval_num_samples=512 "eval_metrics=[swd]" \
    eval_ref_stats="$OUT/heldout_swd.npz" eval_sampler.batch_size=128 $(variant_overrides "$1") \
    > "$OUT/runs/$run.out" 2>&1
  echo "$run: $(grep -o "done: .* s;" "$OUT/runs/$run.out")"
}

sample_one() {  # VARIANT SEED NAME:KEYS
  local run=$1_s$2 name=${3%%:*} keys=${3#*:}
  local result="$OUT/samples/${run}_$name.json"
  [ -f "$result" ] && return 0
  local ckpt start
  ckpt=$(ls "$OUT/runs/$run/checkpoints/"*.pt | sort | tail -1)
  start=$(date +%s%N)
  nice -n "$NICE" "$PY" generate.py --ckpt "$ckpt" num_samples=512 labels=balanced seed=0 \
    per_proc_batch_size=128 cpu_threads=1 sample_dir="$OUT/samples" run_name="${run}_$name" save_png=false \
    ${keys//+/ } > "$OUT/samples/${run}_$name.out" 2>&1
  local ms=$(( ($(date +%s%N) - start) / 1000000 ))
  nice -n "$NICE" "$PY" - "$OUT/samples/${run}_$name.npz" "$keys" "$ms" "$result" "$OUT" <<'EOF'
import json, sys
import numpy as np
from evaluation.online import OnlineEvaluator
npz, keys, ms, result, out = sys.argv[1:]
images = np.load(npz)["arr_0"]  # uint8 [N, H, W, 3]
reference = f"{out}/heldout_swd.npz" if images.shape[1] == 16 else f"{out}/heldout{images.shape[1]}_swd.npz"
scores = OnlineEvaluator(reference, ["swd"], resolution=images.shape[1:3])(images)
with open(result, "w") as f:
    json.dump(dict(scores, sampler=keys, sampling_seconds=int(ms) / 1000), f)
EOF
  echo "$run $name: $(cat "$result")"
}
export -f variant_overrides train_one sample_one

mkdir -p "$OUT/runs" "$OUT/samples"
heldout() {  # RES: the held-out statistics at that resolution (16 px: the name of the first study)
  if [ "$1" = 16 ]; then echo "$OUT/heldout_swd.npz"; else echo "$OUT/heldout${1}_swd.npz"; fi
}
export -f heldout
for res in 16 32; do
  if [ ! -f "$(heldout $res)" ]; then
    "$PY" -c "from training.demo_data import write_demo_dataset as w; w('$OUT/heldout${res/#16/}', resolution=$res, num_classes=8, images_per_class=64, seed=1)"
    "$PY" -m evaluation.ref_stats "$OUT/heldout${res/#16/}" --out "$(heldout $res)" --no-inception --no-dinov2 \
      --swd-images all --no-progress
  fi
done
for variant in $VARIANTS; do variant_overrides "$variant" > /dev/null; done  # an unknown name stops here

# Training: JOBS runs at a time, one thread each.
{ for seed in $SEEDS; do for variant in $VARIANTS; do echo "$variant $seed"; done; done; } \
  | xargs -P "$JOBS" -L 1 bash -c 'train_one "$0" "$1"'

# Samplers on each run's final checkpoint: 512 images, balanced labels, seed 0 (the training
# evaluation's labels and noise), scored as the training evaluation scores.
{ for seed in $SEEDS; do for variant in $VARIANTS; do for sampler in $SAMPLERS; do
  echo "$variant $seed $sampler"; done; done; done; } \
  | xargs -r -P "$JOBS" -L 1 bash -c 'sample_one "$0" "$1" "$2"'
