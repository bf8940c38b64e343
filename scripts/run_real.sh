#!/usr/bin/env bash
# The whole pipeline on the real Roboflow exports (params `data.local.datasets`, by default
# ../shared/realdata/), as the DVC experiment `real`, then its record copied to metrics/real/.
#
#   bash scripts/run_real.sh                       # scratch weights, the CPU recipe below
#   bash scripts/run_real.sh -S model.weights=CIDAS/clipseg-rd64-refined -S model.freeze_backbone=true \
#        -S model.image_size=352                   # pretrained CLIPSeg, on a machine with Hub access
#
# Extra arguments go to `dvc exp run` after the recipe, so a later `-S key=value` wins.
# `--temp` runs the experiment in a temporary copy of the repo (.dvc/tmp/exps/): params.yaml,
# dvc.lock and the workspace outputs of the default (synthetic) pipeline stay as they are. The
# stages' MLflow runs still land in this repo's store (DVC sets DVC_ROOT to it), tagged
# DVC_EXP_NAME=$REAL_EXP_NAME. Inspect with `dvc exp show`, restore with `dvc exp apply real`.
set -euo pipefail
cd "$(dirname "$0")/.."

name="${REAL_EXP_NAME:-real}"
out="${REAL_OUT_DIR:-metrics/real}"

# Training from scratch on ~1,500 photos on a CPU, at the photos' own scale (issue: native scale):
# the 640 px photos are scaled by 0.75 (480 px; a 16 px patch covers ~21 photo pixels instead of ~53
# at the old 192 px resize), the `tiny` preset trains on 224 px crops of them with scale jitter
# 0.7-1.4, 70% of crops centred on foreground, and validation, evaluation and predict make each mask
# in one whole-photo pass at 480 px (HF CLIPSeg interpolates the position embeddings), upsampled to
# 640. Whole vs sliding windows and the other levers were compared on val: metrics/real/ablation.md.
# lr 5e-4 with BCE + Dice 1:1 (probed on val: lr 1e-3 with Dice x2 stalled at a flat loss).
# One torch thread, for training and (OMP_NUM_THREADS) evaluation: on a busy 2-core machine two
# threads oversubscribe and ran 4-6x slower than one. Native CPU kernels: the real run is not gated,
# so it takes the fastest ones (see params.yaml cpu_numerics).
recipe=(
  -S data.source=local
  -S model.preset=tiny
  -S model.image_size=224
  -S inference.mode=whole
  -S inference.scale=0.75
  -S train.crop_scale_jitter=[0.7,1.4]
  -S train.crop_foreground_prob=0.7
  -S lr=5e-4
  -S train.epochs=20
  -S train.batch_size=8
  -S train.bce_weight=1.0
  -S train.dice_weight=1.0
  -S train.negative_prompts=true
  -S train.augment=true
  -S train.early_stopping_patience=8
  -S train.num_threads=1
  -S cpu_numerics=native
)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

started=$(date +%s)
echo "run_real: dvc exp run --temp --force -n $name ${recipe[*]} $*"
dvc exp run --temp --force -n "$name" "${recipe[@]}" "$@"
python scripts/collect_experiment.py --name "$name" --out "$out" --since "$started"
echo "run_real: done in $(( $(date +%s) - started )) s; record in $out/ (report: $out/report.md)"
