#!/usr/bin/env bash
# The main job: start the local Microsoft 365 sandbox and run Airflow DAGs against it:
# a report mailed with an attachment (SMTP XOAUTH2), then a round trip: send an invoice, wait for
# it with the deferrable IMAP sensor (IDLE), download the attachment, process it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
ENV_FILE=${ENV_FILE:-$PWD/.sandbox.env}
.venv/bin/python -m airflow_provider_o365mail.testing up --env-file "$ENV_FILE"

export AIRFLOW_HOME=${AIRFLOW_HOME:-$PWD/.airflow-demo}
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_FOLDER=$PWD/example_dags
mkdir -p "$AIRFLOW_HOME"
if [ ! -f "$AIRFLOW_HOME/fernet.key" ]; then
  .venv/bin/python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())' > "$AIRFLOW_HOME/fernet.key"
fi
export AIRFLOW__CORE__FERNET_KEY=$(cat "$AIRFLOW_HOME/fernet.key")
set -a; . "$ENV_FILE"; set +a
.venv/bin/airflow db migrate > "$AIRFLOW_HOME/db-migrate.log"
.venv/bin/airflow dags test example_o365mail_send_report
.venv/bin/airflow dags test example_o365mail_invoice_roundtrip
echo "main job: OK (the sandbox keeps running; stop it with: .venv/bin/python -m airflow_provider_o365mail.testing down --env-file $ENV_FILE)"
