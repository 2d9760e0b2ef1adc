#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set-up, then Glow on the real Fashion-MNIST
# (Debian's package, offline) at the default architecture, then sampling, reconstruction,
# interpolation and outlier detection from the checkpoint alone. samples_compared.png puts this
# run's samples beside those of the model that ships with glowflow (pretrained:fashionmnist,
# 14 epochs), each row labelled with its model.
#   EPOCHS=1 (default) trains one epoch; OUT sets the output folder.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${VENV:-.venv}/bin/python
OUT=${OUT:-outputs/Glow_fashionmnist}
EPOCHS=${EPOCHS:-1}
CKPT="$OUT/Glow_fashionmnist.pt"
$PY -m glowflow --train --dataset fashionmnist --n_epochs "$EPOCHS" --lr 1e-3 --warmup 1 --amp auto --no_wandb --output_dir "$OUT"
$PY -m glowflow --sample --checkpoint "$CKPT" --output_dir "$OUT" --temperature 0.5 0.7 1.0 --reconstruct --interpolate \
    --compare_with pretrained:fashionmnist
$PY -m glowflow --outlier_detection --checkpoint "$CKPT" --output_dir "$OUT" --dataset fashionmnist \
    --out_dataset mnist5k digits vflip:fashionmnist noise constant
