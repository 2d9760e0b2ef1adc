#!/usr/bin/env bash
# Set-up (scripts/setup.sh), the linter and formatter (ruff, configured in pyproject.toml), then
# the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${VENV:-.venv}/bin/python
$PY -m ruff check .
$PY -m ruff format --check .
exec $PY -m pytest -q "$@"
