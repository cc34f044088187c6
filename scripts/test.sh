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
# The suite's sandbox: a new one for this run unless O365_SANDBOX_STATE_DIR names one. A state directory
# left by an earlier run on this machine keeps its ports, directory settings and mail; stopped and
# deleted when this script ends.
own_sandbox=0
if [ -z "${O365_SANDBOX_STATE_DIR:-}" ]; then
  O365_SANDBOX_STATE_DIR=$(mktemp -d /tmp/o365mail-test-sandbox.XXXXXX)
  export O365_SANDBOX_STATE_DIR
  own_sandbox=1
  trap '.venv/bin/python -m airflow_provider_o365mail.testing down --state-dir "$O365_SANDBOX_STATE_DIR" --purge > /dev/null 2>&1 || true' EXIT
fi
.venv/bin/python -m pytest "$@"
if [ "${O365MAIL_SKIP_COMPAT:-0}" != 1 ]; then
  if [ "$own_sandbox" = 1 ]; then  # the compatibility job starts a new sandbox of its own too
    env -u O365_SANDBOX_STATE_DIR bash scripts/compat-test.sh "$PWD/.venv/bin/python"
  else
    bash scripts/compat-test.sh "$PWD/.venv/bin/python"
  fi
fi
