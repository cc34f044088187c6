"""Send a daily report with a CSV attachment through Microsoft 365 (SMTP XOAUTH2).

The recipient defaults to the connection's own mailbox; trigger with ``{"report_to": "team@contoso.com"}``
to send it elsewhere. Run it against the local sandbox with ``bash scripts/main-job.sh`` (see the README).
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

from airflow.sdk import Param, dag, task

from airflow_provider_o365mail.operators.smtp import O365SmtpOperator

REPORT_DIR = Path(tempfile.gettempdir()) / "o365mail-example-reports"


@dag(
    schedule="@daily",
    catchup=False,
    tags=["o365mail", "example"],
    params={"report_to": Param("", type="string", description="Recipient; empty: the connection's mailbox")},
)
def example_o365mail_send_report():
    @task
    def build_report(ds=None) -> str:
        REPORT_DIR.mkdir(parents=True, exist_ok=True)
        path = REPORT_DIR / f"orders-{ds}.csv"
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["region", "orders", "revenue_eur"])
            writer.writerows([["Île-de-France", 1204, 98113.5], ["Bayern", 877, 70211.0], ["Lombardia", 645, 51002.25]])
        return str(path)

    report = build_report()

    # [START howto_operator_o365_smtp]
    O365SmtpOperator(
        task_id="send_report",
        conn_id="o365mail_default",
        to="{{ params.report_to or conn.o365mail_default.extra_dejson.mailbox }}",
        subject="Orders report {{ ds }}",
        html_content="<h3>Orders {{ ds }}</h3><p>The report is attached (3 regions).</p>",
        text_content="Orders {{ ds }}: the report is attached (3 regions).",
        files=[report],
    )
    # [END howto_operator_o365_smtp]


example_o365mail_send_report()
