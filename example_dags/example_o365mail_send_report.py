"""Send a daily report with a CSV attachment through Microsoft 365 (SMTP XOAUTH2).

The recipient defaults to the connection's own mailbox; trigger with ``{"report_to": "team@contoso.com"}``
to send it elsewhere. Run it against the local sandbox with ``bash scripts/main-job.sh`` (see the README).

Manual runs (UI "Trigger", ``POST /api/v2/dags/{dag_id}/dagRuns`` with ``"logical_date": null``)
have no logical date, and then ``ds``/``logical_date`` are absent from the context: the report day
is the logical date when there is one, else the day the run was due (``dag_run.run_after``).
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

from airflow.sdk import Param, dag, task

from airflow_provider_o365mail.operators.send_mail import O365SendMailOperator

REPORT_DIR = Path(tempfile.gettempdir()) / "o365mail-example-reports"
# dag_run is always in the context; ``logical_date or ...`` would fail when logical_date is absent.
REPORT_DAY = "{{ (dag_run.logical_date or dag_run.run_after) | ds }}"


@dag(
    schedule="@daily",
    catchup=False,
    tags=["o365mail", "example"],
    params={
        # "null" in the type: the UI's trigger form treats a typed param without it as required and
        # keeps "Trigger" disabled while the field is empty (an emptied field is sent as null).
        "report_to": Param(
            None,
            type=["null", "string"],
            title="Recipient",
            description="Recipient; empty: the connection's mailbox",
        )
    },
)
def example_o365mail_send_report():
    @task
    def build_report(dag_run=None) -> str:
        day = (dag_run.logical_date or dag_run.run_after).date().isoformat()
        REPORT_DIR.mkdir(parents=True, exist_ok=True)
        path = REPORT_DIR / f"orders-{day}.csv"
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["region", "orders", "revenue_eur"])
            writer.writerows([["Île-de-France", 1204, 98113.5], ["Bayern", 877, 70211.0], ["Lombardia", 645, 51002.25]])
        return str(path)

    report = build_report()

    # [START howto_operator_o365_smtp]
    O365SendMailOperator(
        task_id="send_report",
        conn_id="o365mail_default",
        to="{{ params.report_to or conn.o365mail_default.extra_dejson.mailbox }}",
        subject=f"Orders report {REPORT_DAY}",
        html_content=f"<h3>Orders {REPORT_DAY}</h3><p>The report is attached (3 regions).</p>",
        text_content=f"Orders {REPORT_DAY}: the report is attached (3 regions).",
        files=[report],
    )
    # [END howto_operator_o365_smtp]


example_o365mail_send_report()
