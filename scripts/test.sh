#!/usr/bin/env bash
# Set-up (scripts/setup.sh) then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec ${PYTHON:-python3} -m pytest -q "$@"
