#!/usr/bin/env bash
# The distributed job's own virtualenv (the normal CI venv, .venv, is left alone): the provider
# (editable, this checkout) with its test tools at the versions of constraints/airflow-3.3.txt, plus
# what a CeleryExecutor deployment on PostgreSQL and Redis needs (apache-airflow-providers-celery,
# psycopg2-binary, asyncpg (the api-server's async engine); celery, kombu and redis come with the Celery provider). Those are not in the
# constraints file: pip resolves them against its pins (Airflow stays at the pinned release).
# Reused when it already imports them. Usage: bash scripts/distributed/venv.sh VENV_DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${1:?usage: venv.sh VENV_DIR}
PYTHON=${PYTHON:-python3}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import airflow.providers.celery, psycopg2, asyncpg, redis, pytest, airflow_provider_o365mail' 2>/dev/null; then
  exit 0
fi
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q --no-compile -e ".[test]" "apache-airflow-providers-celery" "psycopg2-binary" "asyncpg" \
  -c constraints/airflow-3.3.txt
"$VENV/bin/python" -c 'import airflow.providers.celery, psycopg2, redis; import airflow; print("distributed venv: Airflow", airflow.__version__)'
