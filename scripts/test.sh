#!/usr/bin/env bash
# Lint, then the whole test suite (unit + integration against the local sandbox, which the
# pytest fixtures start and stop).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
