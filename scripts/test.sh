#!/usr/bin/env bash
# Lint, the docs site build (strict), the packaging checks (build, twine, file lists, installed-wheel smoke test; about a minute),
# then the whole test suite (unit + integration against the local sandbox, which the pytest
# fixtures start and stop) on the newest supported Airflow, then the compatibility job: a subset on
# the oldest supported Airflow from the built wheel (scripts/compat-test.sh, target ~6 min).
# O365MAIL_SKIP_PACKAGE_CHECK=1 skips the packaging checks, O365MAIL_SKIP_COMPAT=1 the compatibility
# job (local runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports  # the layer contracts in pyproject.toml (docs/architecture.md)
NO_MKDOCS_2_WARNING=1 bash scripts/docs-build.sh  # the docs site, strict (broken links fail)
if [ "${O365MAIL_SKIP_PACKAGE_CHECK:-0}" != 1 ]; then
  bash scripts/package-check.sh "$PWD/.venv/bin/python"
fi
.venv/bin/python -m pytest "$@"
if [ "${O365MAIL_SKIP_COMPAT:-0}" != 1 ]; then
  bash scripts/compat-test.sh "$PWD/.venv/bin/python"
fi
