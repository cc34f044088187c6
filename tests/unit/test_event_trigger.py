"""O365ImapEventTrigger without I/O: criteria on summaries, serialisation, version gate."""

from __future__ import annotations

import pytest

from airflow_provider_o365mail.core.criteria import CriteriaError, MailCriteria
from airflow_provider_o365mail.core.summary import headers_of
from airflow_provider_o365mail.core.watermark import FolderWatermark
from airflow_provider_o365mail.exceptions import O365MailError
from airflow_provider_o365mail.triggers.imap_events import O365ImapEventTrigger
from airflow_provider_o365mail.version_compat import AIRFLOW_V_3_3_PLUS, AIRFLOW_VERSION

needs_shared_streams = pytest.mark.skipif(
    not AIRFLOW_V_3_3_PLUS,
    reason=f"O365ImapEventTrigger needs Airflow >= 3.3 (shared streams); this is {AIRFLOW_VERSION}",
)

SUMMARY = {
    "folder": "INBOX",
    "uid": 7,
    "uidvalidity": 3,
    "message_id": "<a@b>",
    "from": "Billing Dept <billing@Supplier.example>",
    "to": ["ap@contoso.com"],
    "cc": ["boss@contoso.com"],
    "subject": "Rechnung / Invoice 2026-11",
    "date": "2026-11-03T10:00:00+00:00",
    "received": "2026-11-03T10:00:05+00:00",
    "flags": ["\\Seen"],
    "attachments": [{"name": "Invoice_2026-11.PDF", "content_type": "application/pdf"}],
}


@pytest.mark.parametrize(
    ("criteria", "expected"),
    [
        ({}, True),
        ({"sender": "supplier.example"}, True),
        ({"sender": ["nobody.example", "SUPPLIER"]}, True),
        ({"sender": "other.example"}, False),
        ({"recipient": "boss@"}, True),
        ({"subject": "invoice"}, True),
        ({"subject": "credit note"}, False),
        ({"since": "2026-11-03"}, True),
        ({"since": "2026-11-04"}, False),
        ({"before": "2026-11-03"}, False),
        ({"unseen": True}, False),
        ({"has_attachment": True}, True),
        ({"attachment_name": "invoice_*.pdf"}, True),
        ({"attachment_name": "*.csv"}, False),
        ({"header": {"X-Report-Id": "q3"}}, True),
        ({"header": {"X-Report-Id": "q4"}}, False),
    ],
)
def test_criteria_on_a_summary_follow_imap_search_semantics(criteria, expected):
    assert MailCriteria.build(**criteria).matches(SUMMARY, {"x-report-id": "Q3-final"}) is expected


@needs_shared_streams
def test_raw_criteria_cannot_run_on_a_stream():
    with pytest.raises(CriteriaError):
        MailCriteria.build(criteria="FLAGGED").matches(SUMMARY)
    with pytest.raises(CriteriaError):
        O365ImapEventTrigger(criteria="FLAGGED")


@needs_shared_streams
def test_watchers_share_a_stream_per_connection_mailbox_folder_and_post_action():
    a = O365ImapEventTrigger(conn_id="c", subject="Invoice")
    b = O365ImapEventTrigger(conn_id="c", sender="partner.example", attachment_name="*.pdf")
    c = O365ImapEventTrigger(conn_id="c", subject="Invoice", post_action="seen")
    d = O365ImapEventTrigger(conn_id="c", folder="Archive")
    assert a.shared_stream_key() == b.shared_stream_key()
    assert len({a.shared_stream_key(), c.shared_stream_key(), d.shared_stream_key()}) == 3
    classpath, kwargs = b.serialize()
    assert classpath == "airflow_provider_o365mail.triggers.imap_events.O365ImapEventTrigger"
    assert O365ImapEventTrigger(**kwargs).serialize() == (classpath, kwargs)


def test_older_airflow_is_refused_at_parse_time(monkeypatch):
    from airflow_provider_o365mail import version_compat

    monkeypatch.setattr(version_compat, "AIRFLOW_V_3_3_PLUS", False)
    with pytest.raises(O365MailError, match="needs Airflow 3.3 or newer.*O365ImapSensor"):
        O365ImapEventTrigger(conn_id="c")


@pytest.mark.skipif(AIRFLOW_V_3_3_PLUS, reason="the real refusal needs Airflow < 3.3 (scripts/compat-test.sh)")
def test_the_installed_older_airflow_refuses_the_trigger_with_its_version():
    with pytest.raises(O365MailError) as refused:
        O365ImapEventTrigger(conn_id="c", subject="Invoice")
    assert f"this is Airflow {AIRFLOW_VERSION}" in str(refused.value)
    assert "On Airflow 3.1 and 3.2 use O365ImapSensor" in str(refused.value)


def test_position_keeps_message_ids_across_uidvalidity_changes():
    start = FolderWatermark(uidvalidity=1, last_uid=10, seen_keys=["<old>"])
    moved = start.advanced(2, 3, ["<new>"], now=5.0)
    assert (moved.uidvalidity, moved.last_uid, moved.seen_keys) == (2, 3, ["<old>", "<new>"])
    assert FolderWatermark.from_dict(moved.to_dict()) == moved
    assert FolderWatermark.from_dict(None) is None


def test_headers_of_unfolds_and_joins():
    raw = b"Subject: a\r\n b\r\nX-Tag: one\r\nx-tag: two\r\nSubject2: =?utf-8?q?=C3=A4?=\r\n\r\n"
    headers = headers_of(raw)
    assert headers["subject"] == "a b" and headers["x-tag"] == "one, two" and headers["subject2"] == "ä"
