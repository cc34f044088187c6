"""Round trip through Microsoft 365: send an invoice CSV, wait for it, download it, process it.

In production the first task is someone else (a supplier); here the DAG mails itself so it can run
unattended against the local sandbox (``bash scripts/main-job.sh``). The sensor is deferrable: it
waits in the triggerer with IMAP IDLE, then the attachment is streamed to disk and parsed.
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

from airflow.sdk import dag, task

from airflow_provider_o365mail.operators.imap_attachments import O365ImapAttachmentOperator
from airflow_provider_o365mail.operators.send_mail import O365SendMailOperator
from airflow_provider_o365mail.sensors.imap import O365ImapSensor

WORK_DIR = Path(tempfile.gettempdir()) / "o365mail-example-invoices"
MAILBOX = "{{ conn.o365mail_default.extra_dejson.mailbox }}"


@dag(schedule=None, catchup=False, tags=["o365mail", "example"])
def example_o365mail_invoice_roundtrip():
    @task
    def write_invoice(run_id=None) -> str:
        WORK_DIR.mkdir(parents=True, exist_ok=True)
        path = WORK_DIR / "invoice_2026-11.csv"
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["item", "quantity", "unit_price_eur"])
            writer.writerows([["Widget", 12, 4.5], ["Gadget", 3, 19.9], ["Sprocket", 40, 0.35]])
        return str(path)

    send = O365SendMailOperator(
        task_id="supplier_sends_invoice",
        to=MAILBOX,
        subject="Invoice 2026-11 [{{ run_id }}]",
        text_content="Please find the November invoice attached.",
        files=[write_invoice()],
    )

    # [START howto_sensor_o365_imap]
    wait = O365ImapSensor(
        task_id="wait_for_invoice",
        folders="INBOX",
        subject="Invoice 2026-11 [{{ run_id }}]",
        attachment_name="invoice_*.csv",
        new_only=True,
        post_action="seen",
        deferrable=True,
        timeout=600,
    )
    # [END howto_sensor_o365_imap]

    download = O365ImapAttachmentOperator(
        task_id="download_invoice",
        messages=wait.output,
        attachment_name="*.csv",
        target_dir=str(WORK_DIR / "inbox" / "{{ run_id | replace(':', '_') }}"),
    )

    @task
    def process_invoice(paths: list[str]) -> float:
        total = 0.0
        for path in paths:
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
            total += sum(int(r["quantity"]) * float(r["unit_price_eur"]) for r in rows)
            print(f"{path}: {len(rows)} lines")
        if not paths or round(total, 2) != 127.7:
            raise ValueError(f"unexpected invoice content: {paths} total={total}")
        print(f"Invoice total: {total:.2f} EUR")
        return round(total, 2)

    send >> wait
    process_invoice(download.output)


example_o365mail_invoice_roundtrip()
