#!/usr/bin/env bash
# Every stage of configs/imagenette64.py (64x64 Imagenette, class-conditional over its 10
# classes) on a CPU budget, ending with <workdir>/evaluate/report.md.
#
#   scripts/imagenette_pipeline.sh [WORKDIR]            (default runs/imagenette64)
#
# The budget (about 20-25 minutes on 2 shared CPU cores) is set by the variables below;
# raise them on a bigger machine, e.g. VQ_STEPS=20000 PRIOR_STEPS=20000 EVAL_IMAGES=10000.
# Stages resume from what the workdir already holds, so a rerun continues.
#
# Guidance against rejection: LABEL_DROPOUT=0.1 trains both priors with a null label, and
# GUIDANCE=1,1.5,2,3 evaluates those classifier-free guidance scales beside the keep
# fractions (with a CAS classifier per point and the measured seconds per image), e.g.
#   LABEL_DROPOUT=0.1 GUIDANCE=1,1.5,2,3 REJECTION=trained scripts/imagenette_pipeline.sh
set -euo pipefail
cd "$(dirname "$0")/.."

WORKDIR=${1:-runs/imagenette64}
PY=${PYTHON:-.venv/bin/python}
DATA_ROOT=${IMAGENETTE_ROOT:-$(cd .. && pwd)/shared/data/imagenette}
VQ_STEPS=${VQ_STEPS:-400}
PRIOR_STEPS=${PRIOR_STEPS:-300}
CLS_STEPS=${CLS_STEPS:-300}
EVAL_IMAGES=${EVAL_IMAGES:-300}   # accepted samples per keep fraction
REAL_IMAGES=${REAL_IMAGES:-500}   # validation images for FID references and CAS tests

if [ ! -d "$DATA_ROOT/train" ]; then
  echo "no Imagenette at $DATA_ROOT (set IMAGENETTE_ROOT)" >&2
  exit 1
fi
# Rejection sampling with the ImageNet EfficientNet-Lite0 (weights from the core install,
# read without torch); REJECTION=trained uses the classifier trained on Imagenette instead.
REJECTION=${REJECTION:-efficientnet_lite0}
LABEL_DROPOUT=${LABEL_DROPOUT:-0}
GUIDANCE=${GUIDANCE:-1}

# Each stage gets only the overrides it uses: later stages rebuild every model from what
# the workdir recorded, so model fields are never repeated (and contradicting one fails).
COMMON=("--workdir=$WORKDIR" "--verbosity=-1" "--config.data.root=$DATA_ROOT")
declare -A STAGE_ARGS=(
  [vqvae]="--config.vqvae_train.steps=$VQ_STEPS --config.vqvae_train.eval_every=200 --config.vqvae_train.image_every=200 --config.vqvae_train.checkpoint_every=200"
  [extract]=""
  [prior_top]="--config.priors.top.train.steps=$PRIOR_STEPS --config.priors.top.train.eval_every=$PRIOR_STEPS --config.priors.top.label_dropout=$LABEL_DROPOUT"
  [prior_bottom]="--config.priors.bottom.train.steps=$PRIOR_STEPS --config.priors.bottom.train.eval_every=$PRIOR_STEPS --config.priors.bottom.label_dropout=$LABEL_DROPOUT"
  [classifier]="--config.classifier.train.steps=$CLS_STEPS --config.classifier.train.eval_every=$CLS_STEPS"
  [sample]="--config.sample.rejection.classifier=$REJECTION"
  [evaluate]="--config.sample.rejection.classifier=$REJECTION --config.evaluate.num_images=$EVAL_IMAGES --config.evaluate.max_real_images=$REAL_IMAGES --config.evaluate.mse_max_images=1000 --config.evaluate.guidance_scales=($GUIDANCE,)"
)

start=$(date +%s)
for stage in vqvae extract prior_top prior_bottom classifier sample evaluate; do
  echo "=== $stage ($(( $(date +%s) - start ))s since start) ==="
  # shellcheck disable=SC2086  # the per-stage overrides split on spaces on purpose
  "$PY" -m vqvae2_jax.main "--config=configs/imagenette64.py:$stage" "${COMMON[@]}" ${STAGE_ARGS[$stage]}
done
echo "=== done in $(( $(date +%s) - start ))s: $WORKDIR/evaluate/report.md ==="
