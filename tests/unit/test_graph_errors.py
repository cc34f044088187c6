"""Graph's error answers: parsing (code, request-id, Retry-After) and each permanent code's exception and fix."""

from __future__ import annotations

import json

import pytest

from airflow_provider_o365mail.exceptions import (
    GraphRequestRefused,
    MailAuthenticationError,
    MessageRejectedError,
    MessageTooLargeError,
    SendingBlockedError,
)
from airflow_provider_o365mail.graph.errors import parse_reply, permanent_error

MAILBOX = "reports@contoso.example"
CONN_ID = "o365mail_reports"


def graph_body(code: str, message: str = "", request_id: str = "") -> bytes:
    error: dict = {"code": code, "message": message}
    if request_id:
        error["innerError"] = {"request-id": request_id, "date": "2026-12-05T17:00:00"}
    return json.dumps({"error": error}).encode()


def test_parse_reply_takes_code_message_request_id_and_retry_after():
    reply = parse_reply(
        429,
        {"Retry-After": "17", "Content-Type": "application/json"},
        graph_body("ApplicationThrottled", "Application is over its\n  MailboxConcurrency limit.", "req-1"),
    )
    assert (reply.status, reply.code, reply.request_id, reply.retry_after) == (
        429,
        "ApplicationThrottled",
        "req-1",
        17.0,
    )
    assert reply.message == "Application is over its MailboxConcurrency limit."
    assert reply.temporary
    assert reply.describe() == (
        "HTTP 429 ApplicationThrottled: Application is over its MailboxConcurrency limit. (request-id req-1)"
    )


def test_parse_reply_of_a_proxy_page_and_an_http_date_retry_after():
    reply = parse_reply(
        502, {"retry-after": "Wed, 21 Oct 2026 07:28:00 GMT", "request-id": "hdr-9"}, b"<html>Bad   gateway</html>"
    )
    assert reply.code == "" and reply.message == "<html>Bad gateway</html>"
    assert reply.retry_after is None, "an HTTP date falls back to our own backoff"
    assert reply.request_id == "hdr-9", "the request-id header when the body has none"
    assert reply.temporary


@pytest.mark.parametrize(
    ("status", "code", "expected", "fix"),
    [
        (403, "ErrorAccessDenied", GraphRequestRefused, "application access policy"),
        (403, "ErrorSendAsDenied", MessageRejectedError, "Mail.Send.Shared"),
        (404, "MailboxNotEnabledForRESTAPI", GraphRequestRefused, "no Exchange Online mailbox"),
        (404, "ErrorInvalidUser", GraphRequestRefused, "no Exchange Online mailbox"),
        (401, "InvalidAuthenticationToken", MailAuthenticationError, f"authorize --conn-id {CONN_ID}"),
        (413, "", MessageTooLargeError, "MaxSendSize"),
        (400, "ErrorMessageSizeExceeded", MessageTooLargeError, "MaxSendSize"),
        (403, "ErrorQuotaExceeded", SendingBlockedError, f"The mailbox {MAILBOX} is full"),
        (400, "ErrorInvalidRecipients", MessageRejectedError, "Check the message's addresses"),
        (400, "ErrorSomethingNobodyKnows", GraphRequestRefused, ""),
    ],
)
def test_each_permanent_code_maps_to_its_exception_and_fix(status, code, expected, fix):
    reply = parse_reply(status, {}, graph_body(code, "Graph's own words.", "req-42"))
    assert not reply.temporary
    err = permanent_error(reply, doing="sending message <m@x>", mailbox=MAILBOX, conn_id=CONN_ID)
    assert type(err) is expected
    text = str(err)
    assert text.startswith("Microsoft Graph refused sending message <m@x> (HTTP ")
    assert f"HTTP {status} {code}".rstrip() in text and "req-42" in text
    assert fix in text
    if expected is GraphRequestRefused:
        assert (err.status, err.code) == (status, code)
        assert err.to_payload()["fields"] == {"status": status, "code": code}


def test_access_denied_names_the_permissions_the_mailbox_and_the_connection():
    reply = parse_reply(403, {}, graph_body("ErrorAccessDenied", "Access is denied."))
    text = str(permanent_error(reply, doing="creating a draft", mailbox=MAILBOX, conn_id=CONN_ID))
    assert "Mail.Send" in text and "Mail.ReadWrite" in text and MAILBOX in text and CONN_ID in text


def test_an_error_message_carries_no_request_or_response_header():
    """Only the body's error reaches the text: not the ``WWW-Authenticate`` challenge, cookies or other
    headers (the bearer token itself never reaches the parser; see test_graph_client)."""
    headers = {"WWW-Authenticate": 'Bearer realm="", error="invalid_token"', "Set-Cookie": "x-ms-gateway=s3cr3t"}
    reply = parse_reply(401, headers, graph_body("InvalidAuthenticationToken", "Access token has expired."))
    err = permanent_error(reply, doing="sending", mailbox=MAILBOX, conn_id=CONN_ID)
    for shown in (str(err), repr(err), json.dumps(err.to_payload())):
        assert "Bearer" not in shown and "s3cr3t" not in shown
    assert "Access token has expired." in str(err)
