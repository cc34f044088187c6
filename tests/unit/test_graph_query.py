"""Readable criteria as a Graph query (server half + client half) and Graph message JSON as a summary."""

from __future__ import annotations

import datetime as dt

import pytest

from airflow_provider_o365mail.core.criteria import MailCriteria
from airflow_provider_o365mail.exceptions import CriteriaError
from airflow_provider_o365mail.graph.query import compile_query, matches, odata_string, summarize

MESSAGE = {
    "id": "AAMkAG-1=",
    "internetMessageId": "<inv-42@partner.test>",
    "subject": "Invoice 42 – März",
    "from": {"emailAddress": {"name": "Billing, Partner", "address": "billing@partner.test"}},
    "toRecipients": [{"emailAddress": {"name": "", "address": "ap@contoso.com"}}],
    "ccRecipients": [],
    "sentDateTime": "2026-03-02T10:00:00Z",
    "receivedDateTime": "2026-03-02T10:00:05Z",
    "isRead": False,
    "flag": {"flagStatus": "flagged"},
    "hasAttachments": True,
    "internetMessageHeaders": [{"name": "X-Report-Id", "value": "Q3-2026"}],
    "attachments": [{"id": "att1", "name": "INV-42.PDF", "contentType": "application/pdf", "size": 1234}],
}


def test_what_graph_can_decide_goes_to_filter_with_received_first():
    query = compile_query(
        MailCriteria.build(since="2026-03-01", before="2026-04-01", unseen=True, attachment_name="*.pdf")
    )
    assert query.filter == (
        "receivedDateTime ge 2026-03-01T00:00:00Z and receivedDateTime lt 2026-04-01T00:00:00Z "
        "and isRead eq false and hasAttachments eq true"
    )
    assert query.client_side == ("attachment_name",)
    params = query.params(top=10)
    assert params["$orderby"] == "receivedDateTime asc" and params["$top"] == "10"
    assert params["$expand"].startswith("attachments(")


def test_substrings_and_headers_are_decided_client_side():
    criteria = MailCriteria.build(sender="partner.test", subject="invoice", header={"X-Report-Id": "Q3"})
    query = compile_query(criteria)
    assert query.filter == "receivedDateTime ge 1970-01-01T00:00:00Z"
    assert query.client_side == ("sender", "subject", "header")
    assert "internetMessageHeaders" in query.select and "$expand" not in query.params()
    summary = summarize(MESSAGE, "inbox")
    assert matches(criteria, MESSAGE, summary)
    assert not matches(MailCriteria.build(header={"X-Report-Id": "Q4"}), MESSAGE, summary)
    assert not matches(MailCriteria.build(sender="other.test"), MESSAGE, summary)


def test_a_lower_bound_from_a_watermark_wins_over_an_older_since():
    query = compile_query(
        MailCriteria.build(since="2026-01-01"), received_from=dt.datetime(2026, 3, 2, 10, tzinfo=dt.UTC)
    )
    assert query.filter == "receivedDateTime ge 2026-03-02T10:00:00Z"


def test_raw_imap_criteria_are_refused_with_the_alternative():
    with pytest.raises(CriteriaError, match="readable criteria"):
        compile_query(MailCriteria.build(criteria="UNSEEN"))


def test_odata_strings_double_single_quotes():
    assert odata_string("O'Brien") == "'O''Brien'"


def test_summary_fields_and_hostile_shapes():
    summary = summarize(MESSAGE, "inbox")
    assert summary["message_id"] == "<inv-42@partner.test>"
    assert summary["from"] == '"Billing, Partner" <billing@partner.test>'
    assert summary["to"] == ["ap@contoso.com"]
    assert summary["flags"] == ["\\Flagged"]
    assert summary["attachments"][0]["name"] == "INV-42.PDF" and summary["graph_id"] == "AAMkAG-1="
    broken = summarize({"from": "not an object", "toRecipients": [None, {"emailAddress": 3}], "subject": None}, "x")
    assert broken["from"] is None and broken["to"] == [] and broken["subject"] == ""
