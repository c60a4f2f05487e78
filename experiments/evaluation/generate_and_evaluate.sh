#!/usr/bin/env bash
# generate -> evaluate -> JSON for one generation config. Called by the eval_*.sh scripts:
#
#   bash experiments/evaluation/generate_and_evaluate.sh CONFIG.yaml [generate.py overrides...]
#
# Environment (paths may be relative to the directory you run the script from):
#   CKPT               checkpoint to sample from (the eval_*.sh scripts give a default)
#   REF_BATCH          ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz   (required)
#   INCEPTION_WEIGHTS  torch-fidelity's weights-inception-2015-12-05-6726825d.pth, or "auto" to let
#                      evaluation.evaluate use its torch.hub cache / download       (required)
#   NPROC              processes for torchrun (default: number of GPUs, else 1)
#   SAMPLE_DIR         output folder (default results/)
#   RUN_NAME           run folder / .npz name (default: EXPERIMENT-STEP-CONFIG[-hash of overrides], the
#                      checkpoint's run first, as generate.py names it, then the generation config)
#   RESULTS            metrics JSON (default SAMPLE_DIR/RUN_NAME.json)
#   EVAL_ARGS          extra evaluation.evaluate arguments, e.g. "--fdd --dinov2-weights PATH"
#   PYTHON             python interpreter (default python)
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }

[[ $# -ge 1 ]] || die "usage: $0 CONFIG.yaml [key=value ...]"
CONFIG=$1; shift
PYTHON=${PYTHON:-python}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
abspath() { realpath -m -- "$1"; }

[[ -f $CONFIG || -f $REPO/$CONFIG ]] || die "generation config not found: $CONFIG"
[[ -f $CONFIG ]] && CONFIG=$(abspath "$CONFIG") || CONFIG=$REPO/$CONFIG
[[ -n ${CKPT:-} ]] || die "CKPT is not set: CKPT=exps/<experiment>/checkpoints/0400000.pt bash $0 ..."
[[ -f $CKPT ]] || die "checkpoint not found: CKPT=$CKPT (set CKPT to a checkpoint file)"
CKPT=$(abspath "$CKPT")
[[ -n ${REF_BATCH:-} ]] || die "REF_BATCH is not set: point it to the ADM reference batch, e.g. REF_BATCH=/data/VIRTUAL_imagenet256_labeled.npz (https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz)"
[[ -f $REF_BATCH ]] || die "reference batch not found: REF_BATCH=$REF_BATCH"
REF_BATCH=$(abspath "$REF_BATCH")
[[ -n ${INCEPTION_WEIGHTS:-} ]] || die "INCEPTION_WEIGHTS is not set: give the path of weights-inception-2015-12-05-6726825d.pth (https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth), or INCEPTION_WEIGHTS=auto to use the torch.hub cache / a download"
INCEPTION_ARGS=()
if [[ $INCEPTION_WEIGHTS != auto ]]; then
    [[ -f $INCEPTION_WEIGHTS ]] || die "Inception weights not found: INCEPTION_WEIGHTS=$INCEPTION_WEIGHTS"
    INCEPTION_ARGS=(--inception-weights "$(abspath "$INCEPTION_WEIGHTS")")
fi
if [[ -z ${NPROC:-} ]]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ $NPROC -ge 1 ]] || NPROC=1
fi
SAMPLE_DIR=$(abspath "${SAMPLE_DIR:-results}")

if [[ -z ${RUN_NAME:-} ]]; then
    # the checkpoint's own name first (its run and step, as generate.py names it: exported weights and
    # post-hoc reconstructions too), then the sampler config it is evaluated with
    tag=$(cd "$REPO" && "$PYTHON" -c "import sys; from generation.config import checkpoint_tag; print(checkpoint_tag(sys.argv[1]))" "$CKPT") \
        || die "cannot name the run of CKPT=$CKPT (is $PYTHON this project's environment?)"
    RUN_NAME="$tag-$(basename "$CONFIG" .yaml)"
    if [[ $# -gt 0 ]]; then RUN_NAME="$RUN_NAME-$(printf '%s\n' "$@" | sha1sum | cut -c1-8)"; fi
fi
NPZ=$SAMPLE_DIR/$RUN_NAME.npz
RESULTS=${RESULTS:-$SAMPLE_DIR/$RUN_NAME.json}

cd "$REPO"
echo "== generate: $CONFIG, $CKPT -> $NPZ ($NPROC process(es))"
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" generate.py \
    --config "$CONFIG" --ckpt "$CKPT" sample_dir="$SAMPLE_DIR" run_name="$RUN_NAME" "$@"
[[ -f $NPZ ]] || die "generate.py finished without writing $NPZ (save_npz=false?)"

echo "== evaluate: $NPZ against $REF_BATCH -> $RESULTS"
# shellcheck disable=SC2086  # EVAL_ARGS is a list of words on purpose
"$PYTHON" -m evaluation.evaluate "$REF_BATCH" "$NPZ" "${INCEPTION_ARGS[@]}" --out "$RESULTS" ${EVAL_ARGS:-}
echo "== results: $RESULTS"
