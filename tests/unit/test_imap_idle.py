"""IDLE waiting with a fake aioimaplib client, a fake token and an injected clock (no server)."""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass

import pytest
from imap_fakes import FakeIdleClient

from airflow_provider_o365mail.exceptions import MailAuthenticationError, MailServerError, MailServerUnavailable
from airflow_provider_o365mail.imap.idle import (
    TOKEN_MARGIN_SECONDS,
    IdleUnsupported,
    ImapEndpoint,
    wait_for_new_mail,
)

ENDPOINT = ImapEndpoint("imap.test", 993, "me@example.com", 5.0, ssl.create_default_context())
NOW = 1_000_000.0


@dataclass(frozen=True)
class Token:
    token: str = "t"
    expires_on: float = NOW + 3600


def wait(
    client: FakeIdleClient,
    *,
    known_uidnext=None,
    token=Token(),
    max_idle=1500.0,
    probe_interval=30.0,
    probe_answer=10.0,
):
    return asyncio.run(
        wait_for_new_mail(
            ENDPOINT,
            "INBOX",
            token,
            known_uidnext,
            max_idle,
            probe_interval=probe_interval,
            probe_answer=probe_answer,
            client_factory=lambda _endpoint, on_lost: client.bind(on_lost),
            clock=lambda: NOW,
        )
    )


def test_a_pushed_exists_ends_the_wait():
    client = FakeIdleClient(pushes=[[b"3 EXISTS"]])
    assert wait(client, known_uidnext=5) == "push"
    assert client.calls[-3:] == ["done", "logout", "close"], "IDLE is ended and the session logged out"


def test_mail_that_arrived_before_idle_is_reported_without_waiting():
    client = FakeIdleClient(uidnext=9)
    assert wait(client, known_uidnext=5) == "changed"
    assert "idle" not in client.calls


def test_idle_never_outlives_the_token():
    client = FakeIdleClient()
    assert wait(client, token=Token(expires_on=NOW + TOKEN_MARGIN_SECONDS + 1.5), known_uidnext=5) == "timeout"
    assert client.idle_timeout == pytest.approx(1.5, abs=0.05)
    spent = FakeIdleClient()
    assert wait(spent, token=Token(expires_on=NOW + 60), known_uidnext=5) == "timeout"
    assert "idle" not in spent.calls, "a token inside the margin is not used for IDLE at all"


def test_bye_during_idle_is_an_error_not_new_mail():
    client = FakeIdleClient(pushes=[[b"BYE Session invalidated - AccessTokenExpired"]])
    with pytest.raises(MailServerError, match="AccessTokenExpired"):
        wait(client, known_uidnext=5)


def test_a_refused_login_is_an_authentication_error():
    with pytest.raises(MailAuthenticationError, match="for IDLE failed"):
        wait(FakeIdleClient(login_ok=False))


def test_no_idle_capability_is_reported():
    with pytest.raises(IdleUnsupported):
        wait(FakeIdleClient(capabilities=frozenset()))


def test_idle_is_renewed_every_probe_interval_while_the_server_answers():
    client = FakeIdleClient()

    async def later():
        await asyncio.sleep(0.35)
        client.pushes.put_nowait([b"4 EXISTS"])

    async def run():
        asyncio.get_running_loop().create_task(later())
        return await wait_for_new_mail(
            ENDPOINT,
            "INBOX",
            Token(),
            5,
            probe_interval=0.1,
            client_factory=lambda _e, on_lost: client.bind(on_lost),
            clock=lambda: NOW,
        )

    assert asyncio.run(run()) == "push"
    assert client.idles >= 3, "IDLE was ended (DONE answered) and re-issued"


def test_a_server_that_stops_answering_is_noticed_at_the_next_probe_and_dropped_without_logout():
    client = FakeIdleClient(answers_done=False)
    started = time.monotonic()
    with pytest.raises(MailServerUnavailable, match="did not answer DONE within 0.3 s: the connection is dead"):
        wait(client, known_uidnext=5, probe_interval=0.2, probe_answer=0.3)
    elapsed = time.monotonic() - started
    # Not the endpoint's 5 s timeout: the probe's own answer deadline (0.2 s interval + 0.3 s answer).
    assert elapsed < ENDPOINT.timeout - 1, f"noticed after {elapsed:.1f} s"
    assert client.calls[-2:] == ["done", "abort"], "a dead connection is dropped, not sent a LOGOUT nobody answers"


def test_a_server_that_stops_accepting_idle_is_noticed_within_the_answer_deadline():
    client = FakeIdleClient(answers_idles=2)  # answers DONE, then never says "+ idling" again
    started = time.monotonic()
    with pytest.raises(MailServerUnavailable, match="did not answer IDLE"):
        wait(client, known_uidnext=5, probe_interval=0.1, probe_answer=0.3)
    assert client.idles == 3 and client.calls[-1] == "abort"
    assert time.monotonic() - started < ENDPOINT.timeout - 1


def test_the_answer_deadline_is_never_longer_than_the_connections_timeout():
    client = FakeIdleClient(answers_done=False)
    quick = ImapEndpoint("imap.test", 993, "me@example.com", 0.3, ssl.create_default_context())

    async def run():
        return await wait_for_new_mail(
            quick,
            "INBOX",
            Token(),
            5,
            probe_interval=0.1,
            probe_answer=60.0,
            client_factory=lambda _e, on_lost: client.bind(on_lost),
            clock=lambda: NOW,
        )

    started = time.monotonic()
    with pytest.raises(MailServerUnavailable, match="did not answer DONE"):
        asyncio.run(run())
    assert time.monotonic() - started < 5, "the connection's 0.3 s timeout, not the 60 s probe answer"


def test_a_reset_connection_ends_the_wait_at_once():
    client = FakeIdleClient()

    async def run():
        asyncio.get_running_loop().call_later(0.2, client.drop)
        return await wait_for_new_mail(
            ENDPOINT, "INBOX", Token(), 5, client_factory=lambda _e, on_lost: client.bind(on_lost), clock=lambda: NOW
        )

    started = time.monotonic()
    with pytest.raises(MailServerUnavailable, match="was lost"):
        asyncio.run(run())
    assert time.monotonic() - started < 3, "not at the end of the 25-minute IDLE"
    assert "logout" not in client.calls and client.calls[-1] == "abort"


def test_a_reset_while_idle_is_being_accepted_is_noticed_at_once():
    client = FakeIdleClient(answers_idles=0)  # IDLE hangs: only the lost connection can end the wait

    async def run():
        asyncio.get_running_loop().call_later(0.2, client.drop)
        return await wait_for_new_mail(
            ENDPOINT,
            "INBOX",
            Token(),
            5,
            probe_answer=60.0,
            client_factory=lambda _e, on_lost: client.bind(on_lost),
            clock=lambda: NOW,
        )

    started = time.monotonic()
    with pytest.raises(MailServerUnavailable, match="was lost"):
        asyncio.run(run())
    assert time.monotonic() - started < 3, "not at the answer deadline"


def test_a_waiter_that_is_cancelled_logs_out():
    client = FakeIdleClient()

    async def run():
        task = asyncio.ensure_future(
            wait_for_new_mail(
                ENDPOINT,
                "INBOX",
                Token(),
                5,
                client_factory=lambda _e, on_lost: client.bind(on_lost),
                clock=lambda: NOW,
            )
        )
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    assert client.calls[-3:] == ["done", "logout", "close"], "the server is fine: it gets its LOGOUT"
