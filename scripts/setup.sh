#!/usr/bin/env bash
# Set-up on a fresh machine (Python 3.9+, pip and apt only), into a virtual environment of the
# project's own, .venv/ beside this folder (never the system's or the user's Python):
#   PyTorch 2.14.1 / torchvision 0.29.1 when the venv has none (the package itself accepts
#   torch>=2.1), glowflow with its test extras, and Debian's real Fashion-MNIST (apt, as root,
#   or through sudo when it is there; it says so first). Safe to run again: a second run checks
#   and returns in seconds. The first run takes about 2-3 minutes and about 6 GB of disk (most
#   of it PyTorch's CUDA build; the CPU is enough to run everything here).
#   VENV=path chooses another folder; PYTHON=python3.X the interpreter that creates it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
BASE_PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "glowflow set-up: creating the virtual environment $VENV (PyTorch and the rest go there)"
  "$BASE_PY" -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  echo "glowflow set-up: installing PyTorch 2.14.1 and torchvision 0.29.1 into $VENV (a few minutes, about 5.5 GB)"
  "$PY" -m pip install --quiet torch==2.14.1 torchvision==0.29.1
fi
"$PY" -m pip install --quiet -e ".[test]"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then
      SUDO="sudo"
      echo "glowflow set-up: installing Debian's dataset-fashion-mnist with sudo apt-get (it may ask for your password)"
    else
      echo "glowflow set-up: Debian's dataset-fashion-mnist is missing and this user is not root: run as root" \
           "'apt-get install dataset-fashion-mnist', or use --data_root with the IDX files" >&2
      exit 1
    fi
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
echo "glowflow set-up done: $PY (activate with 'source $VENV/bin/activate')"
