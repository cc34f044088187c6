"""Process every invoice mail as it arrives: a DAG scheduled by inbound mail (Airflow >= 3.3).

An ``AssetWatcher`` with ``O365ImapEventTrigger`` turns each new matching message into an asset
event; the DAG runs for it with the message summary in ``triggering_asset_events`` and downloads
the attachment. No task waits: the triggerer holds one IMAP IDLE connection per folder for all
watchers of that folder. On Airflow 3.2 use ``O365ImapSensor`` instead (see
example_o365mail_invoice_roundtrip.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from airflow.sdk import Asset, AssetWatcher, dag, task

from airflow_provider_o365mail.operators.imap_attachments import O365ImapAttachmentOperator
from airflow_provider_o365mail.version_compat import AIRFLOW_V_3_3_PLUS

INBOX_FILES = Path(tempfile.gettempdir()) / "o365mail-example-invoice-events"

if AIRFLOW_V_3_3_PLUS:
    from airflow_provider_o365mail.triggers.imap_events import O365ImapEventTrigger

    # [START howto_trigger_o365_imap_events]
    invoice_mail = Asset(
        "o365mail://o365mail_default/INBOX/invoices",
        watchers=[
            AssetWatcher(
                name="invoice_mail",
                trigger=O365ImapEventTrigger(
                    conn_id="o365mail_default",
                    folder="INBOX",
                    subject="Invoice",
                    attachment_name="*.pdf",
                    post_action="seen",
                ),
            )
        ],
    )
    # [END howto_trigger_o365_imap_events]

    @dag(schedule=[invoice_mail], catchup=False, tags=["o365mail", "example"])
    def example_o365mail_invoice_events():
        @task
        def messages(triggering_asset_events=None) -> list[dict]:
            found = [e.extra["payload"] for events in triggering_asset_events.values() for e in events]
            for message in found:
                print(f"Invoice mail {message['subject']!r} from {message['from']} ({message['message_id']})")
            return found

        O365ImapAttachmentOperator(
            task_id="download_invoices",
            messages=messages(),
            attachment_name="*.pdf",
            target_dir=str(INBOX_FILES / "{{ run_id | replace(':', '_') }}"),
        )

    example_o365mail_invoice_events()
