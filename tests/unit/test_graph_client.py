"""GraphClient's retries with a fake ``requests`` session, a fake token source, slot and sleep.

The exceptions the session raises are requests' real ones: a refused connection is produced by
connecting to a closed port on 127.0.0.1, so the "never sent" rule is tested against what requests
really raises.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections import deque
from dataclasses import dataclass

import pytest
import requests
import urllib3
from requests.structures import CaseInsensitiveDict

from airflow_provider_o365mail.exceptions import MailAuthenticationError, MailServerUnavailable
from airflow_provider_o365mail.graph.client import GraphClient, NoAnswer
from airflow_provider_o365mail.retry import Backoff

SECRET_TOKEN = "eyJhbGciOiJub25lIn0.c2VjcmV0LWdyYXBoLXRva2Vu.sig"  # a fake token
UPLOAD_URL = "https://outlook.example/api/v2.0/Users('x')/Messages('y')/AttachmentSessions('z')?authtoken=UPLOADSECRET"


@dataclass(frozen=True)
class Token:
    token: str
    expires_on: float = 0.0


def response(status: int, body: dict | None = None, headers: dict[str, str] | None = None) -> requests.Response:
    answer = requests.Response()
    answer.status_code = status
    answer.headers = CaseInsensitiveDict(headers or {})
    answer._content = json.dumps(body).encode() if body is not None else b""
    return answer


def graph_error(status: int, code: str, retry_after: int | None = None) -> requests.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    return response(status, {"error": {"code": code, "message": f"{code} happened."}}, headers)


def refused_connection_error() -> requests.ConnectionError:
    """What requests raises when nothing listens on the port (the request never went out)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        requests.get(f"http://127.0.0.1:{port}/v1.0/me/sendMail", timeout=5)
    except requests.ConnectionError as err:
        return err
    raise AssertionError("something listens on a port just freed")


def reset_after_sending() -> requests.ConnectionError:
    """What requests raises when the server closed the connection after the request went out."""
    return requests.ConnectionError(
        urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset by peer")),
        request=None,
    )


class FakeSession:
    """Answers each request with the next scripted outcome (a response or an exception to raise)."""

    def __init__(self, *outcomes, slot=None) -> None:
        self.outcomes = deque(outcomes)
        self.calls: list[dict] = []
        self.slot = slot
        self.closed = False

    def request(self, method, url, **kwargs):
        self.calls.append({"method": method, "url": url, **kwargs})
        if self.slot is not None:
            assert self.slot.held == 1, "every request runs inside the mailbox's slot"
        outcome = self.outcomes.popleft()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def close(self) -> None:
        self.closed = True


class Tokens:
    def __init__(self, slot=None) -> None:
        self.asked: list[bool] = []
        self.slot = slot

    def __call__(self, force_refresh: bool) -> Token:
        if self.slot is not None:
            assert self.slot.held == 0, "tokens are fetched outside the slot"
        self.asked.append(force_refresh)
        return Token(f"{SECRET_TOKEN}-{len(self.asked)}")


class Slot:
    def __init__(self) -> None:
        self.held = 0
        self.entered = 0

    @contextlib.contextmanager
    def __call__(self):
        self.held += 1
        self.entered += 1
        try:
            yield
        finally:
            self.held -= 1


RETRY = Backoff(first=2.0, maximum=60.0, attempts=4, jitter=(1.0, 1.0), max_retry_after=120.0)


def client_for(session: FakeSession, tokens: Tokens | None = None, slept: list | None = None, **options) -> GraphClient:
    return GraphClient(
        "https://graph.example/v1.0/",
        tokens or Tokens(),
        session=session,
        timeout=30,
        conn_id="o365mail_reports",
        mailbox="reports@contoso.example",
        retry=options.pop("retry", RETRY),
        sleep=(slept if slept is not None else []).append,
        **options,
    )


def test_throttling_waits_retry_after_then_succeeds():
    session = FakeSession(graph_error(429, "ApplicationThrottled", retry_after=7), response(202))
    slept: list[float] = []
    answer = client_for(session, slept=slept).request("POST", "me/sendMail", data=b"x", doing="sending")
    assert answer.status_code == 202
    assert slept == [7.0], "Graph's Retry-After, not our own backoff"
    assert [c["url"] for c in session.calls] == ["https://graph.example/v1.0/me/sendMail"] * 2
    assert all(c["allow_redirects"] is False and c["timeout"] == 30 for c in session.calls)


def test_retry_after_is_capped():
    session = FakeSession(graph_error(503, "ServiceUnavailable", retry_after=86_400), response(200, {}))
    slept: list[float] = []
    client_for(session, slept=slept).request("GET", "me", doing="reading")
    assert slept == [120.0]


def test_without_retry_after_the_backoff_grows():
    session = FakeSession(graph_error(500, "InternalServerError"), graph_error(502, ""), response(200, {}))
    slept: list[float] = []
    client_for(session, slept=slept).request("GET", "me", doing="reading")
    assert slept == [2.0, 4.0]


def test_attempts_are_bounded_and_the_error_names_graph_limits():
    session = FakeSession(*[graph_error(429, "ApplicationThrottled", retry_after=1) for _ in range(10)])
    slept: list[float] = []
    with pytest.raises(MailServerUnavailable) as caught:
        client_for(session, slept=slept).request("POST", "me/sendMail", data=b"x", doing="sending message <m@x>")
    assert len(session.calls) == RETRY.attempts and len(slept) == RETRY.attempts - 1
    text = str(caught.value)
    assert "failed 4 times while sending message <m@x>" in text and "ApplicationThrottled" in text
    assert "4 concurrent requests" in text and "10,000 requests per 10 minutes" in text and "Airflow pool" in text


def test_a_401_refreshes_the_token_once_then_succeeds():
    tokens = Tokens()
    session = FakeSession(graph_error(401, "InvalidAuthenticationToken"), response(202))
    slept: list[float] = []
    client_for(session, tokens, slept=slept).request("POST", "me/sendMail", data=b"x", doing="sending")
    assert tokens.asked == [False, True], "the second try forces a refresh"
    assert [c["headers"]["Authorization"] for c in session.calls] == [
        f"Bearer {SECRET_TOKEN}-1",
        f"Bearer {SECRET_TOKEN}-2",
    ]
    assert slept == [], "a refused token is retried at once"


def test_a_second_401_is_permanent_and_names_no_token():
    tokens = Tokens()
    session = FakeSession(*[graph_error(401, "InvalidAuthenticationToken") for _ in range(5)])
    with pytest.raises(MailAuthenticationError) as caught:
        client_for(session, tokens).request("POST", "me/sendMail", data=b"x", doing="sending")
    assert tokens.asked == [False, True] and len(session.calls) == 2
    assert "authorize --conn-id o365mail_reports" in str(caught.value)
    shown = f"{caught.value} {caught.value!r} {json.dumps(caught.value.to_payload())}"
    assert SECRET_TOKEN not in shown


def test_a_401_after_a_refresh_and_a_503_is_not_refreshed_again():
    tokens = Tokens()
    session = FakeSession(
        graph_error(401, "InvalidAuthenticationToken"),
        graph_error(503, "ServiceUnavailable", retry_after=1),
        graph_error(401, "InvalidAuthenticationToken"),
    )
    with pytest.raises(MailAuthenticationError):
        client_for(session, tokens).request("GET", "me", doing="reading")
    assert tokens.asked == [False, True, False]


def test_a_504_to_a_send_is_no_answer_but_is_retried_when_repeatable():
    session = FakeSession(graph_error(504, "GatewayTimeout"))
    with pytest.raises(NoAnswer, match="504"):
        client_for(session).request("POST", "me/sendMail", data=b"x", doing="sending", repeatable=False)
    assert len(session.calls) == 1

    session = FakeSession(graph_error(504, "GatewayTimeout"), response(200, {"value": []}))
    client_for(session).request("GET", "me/mailFolders/SentItems/messages", doing="looking")
    assert len(session.calls) == 2


@pytest.mark.parametrize(
    "lost", [requests.ReadTimeout("read timed out"), reset_after_sending()], ids=["read-timeout", "reset"]
)
def test_an_unanswered_send_is_no_answer_never_repeated(lost):
    session = FakeSession(lost, response(202))
    with pytest.raises(NoAnswer) as caught:
        client_for(session).request("PUT", UPLOAD_URL, data=b"x", doing="uploading", authorized=False, repeatable=False)
    assert len(session.calls) == 1
    assert "UPLOADSECRET" not in caught.value.reason


def test_a_refused_connection_was_never_sent_so_a_send_is_retried():
    refused = refused_connection_error()
    session = FakeSession(refused, response(202))
    slept: list[float] = []
    answer = client_for(session, slept=slept).request(
        "POST", "me/sendMail", data=b"x", doing="sending", repeatable=False
    )
    assert answer.status_code == 202 and len(session.calls) == 2 and len(slept) == 1


def test_unanswered_repeatable_requests_are_retried_and_errors_carry_no_url_secret():
    session = FakeSession(
        *[requests.ConnectionError(f"HTTPSConnectionPool: Max retries exceeded url: {UPLOAD_URL}")] * 4
    )
    with pytest.raises(MailServerUnavailable) as caught:
        client_for(session).request("GET", UPLOAD_URL, doing="reading the upload session", authorized=False)
    assert len(session.calls) == 4
    assert "UPLOADSECRET" not in str(caught.value) and "ConnectionError" in str(caught.value)


def test_unauthorized_requests_send_no_token():
    tokens = Tokens()
    session = FakeSession(response(200, {"nextExpectedRanges": ["4-"]}))
    client_for(session, tokens).request(
        "PUT", UPLOAD_URL, data=b"abcd", headers={"Content-Range": "bytes 0-3/8"}, doing="uploading", authorized=False
    )
    assert tokens.asked == []
    assert "Authorization" not in session.calls[0]["headers"]
    assert session.calls[0]["headers"]["Content-Range"] == "bytes 0-3/8"
    assert session.calls[0]["url"] == UPLOAD_URL, "an absolute upload URL is used as it is"


def test_each_request_holds_the_slot_and_tokens_are_fetched_outside_it():
    slot = Slot()
    tokens = Tokens(slot)
    session = FakeSession(graph_error(429, "ApplicationThrottled", retry_after=1), response(202), slot=slot)
    client = client_for(session, tokens, slot=slot)
    client.request("POST", "me/sendMail", data=b"x", doing="sending")
    assert slot.entered == 2 and slot.held == 0 and client.requests_made == 2


def test_the_slot_is_released_when_a_request_fails():
    slot = Slot()
    session = FakeSession(reset_after_sending(), slot=slot)
    with pytest.raises(NoAnswer):
        client_for(session, slot=slot).request("POST", "me/sendMail", data=b"x", doing="sending", repeatable=False)
    assert slot.held == 0


def test_a_tls_failure_is_not_retried_and_names_the_ca_bundle():
    session = FakeSession(requests.exceptions.SSLError("certificate verify failed"), response(202))
    with pytest.raises(MailServerUnavailable, match="ca_bundle"):
        client_for(session).request("POST", "me/sendMail", data=b"x", doing="sending")
    assert len(session.calls) == 1


def test_permanent_refusals_are_not_retried():
    session = FakeSession(graph_error(403, "ErrorAccessDenied"), response(202))
    with pytest.raises(Exception, match="ErrorAccessDenied"):
        client_for(session).request("POST", "me/sendMail", data=b"x", doing="sending")
    assert len(session.calls) == 1


def test_an_unbounded_retry_policy_is_refused():
    with pytest.raises(ValueError, match="bounded"):
        client_for(FakeSession(), retry=Backoff(attempts=None))
