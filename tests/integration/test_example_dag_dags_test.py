"""An example DAG run end to end with ``airflow dags test`` against the sandbox, on any supported Airflow.

The compatibility job (``scripts/compat-test.sh``) runs this on the oldest supported Airflow with the
provider installed from the wheel: the operator sends the invoice over SMTP, the deferrable sensor
waits for it in the trigger (IMAP IDLE), the attachment is downloaded and processed. The full suite
runs the example DAGs through the real scheduler and triggerer too (test_example_dags_scheduler.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from airflow_provider_o365mail.testing.airflow_services import DagRunResult
from airflow_provider_o365mail.testing.mailbox import wait_for_messages

EXAMPLES = Path(__file__).parents[2] / "example_dags"
DAG_ID = "example_o365mail_invoice_roundtrip"


def test_example_invoice_roundtrip_runs_with_dags_test(o365_sandbox, o365_admin, o365_clean_mailboxes, airflow_db):
    connection = o365_sandbox.connection_json(refresh_token=o365_sandbox.new_refresh_token())
    env = {
        **os.environ,
        "AIRFLOW_CONN_O365MAIL_DEFAULT": connection,
        "AIRFLOW__CORE__DAGS_FOLDER": str(EXAMPLES),
    }
    completed = subprocess.run(
        [sys.executable, "-m", "airflow", "dags", "test", DAG_ID],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
        cwd=os.environ["AIRFLOW_HOME"],
    )
    result = DagRunResult(completed.returncode, completed.stdout + completed.stderr, DAG_ID)
    assert result.returncode == 0, result.output[-4000:]
    states = result.task_states()
    assert {task: state for task, (state, _) in states.items()} == {
        "write_invoice": "success",
        "supplier_sends_invoice": "success",
        "wait_for_invoice": "success",
        "download_invoice": "success",
        "process_invoice": "success",
    }, result.output[-4000:]
    assert "Invoice total: 127.70 EUR" in result.output
    (mail,) = wait_for_messages(o365_sandbox, o365_sandbox.user, lambda m: str(m["Subject"]).startswith("Invoice "))
    assert mail.get_content_maintype() == "multipart"  # the CSV went out as an attachment
