#!/usr/bin/env bash
# Set-up on a fresh machine (Python, pip and apt only): PyTorch, glowflow with its
# test extras, and Debian's real Fashion-MNIST. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch, torchvision" 2>/dev/null; then
  $PY -m pip install --quiet torch==2.14.1 torchvision==0.29.1
fi
$PY -m pip install --quiet -e ".[test]"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
echo "glowflow set-up done"
