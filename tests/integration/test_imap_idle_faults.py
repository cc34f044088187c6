"""A dead IMAP peer is noticed within its bound, and mail delivered meanwhile is found.

Every long-lived IMAP connection (the IDLE of the shared watch, the pooled IMAPClient sessions)
goes through a TCP fault proxy in front of Dovecot, and the peer dies in each of the three ways
(:mod:`airflow_provider_o365mail.imap.liveness`):

- reset: noticed at once (< 5 s);
- hung (the proxy stalls both directions, TCP stays up): within 60 s (next IDLE probe + its answer);
- silent drop (nftables drops the proxy port's packets, no FIN/RST): within 30 s (TCP keepalive and
  TCP_USER_TIMEOUT; an IDLE probe's answer deadline when a probe went into the dead path).

The bounds are the guarantees themselves, so they are asserted; each test prints what it measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import logging
import socket
import threading
import time
import uuid

import pytest

from airflow_provider_o365mail.exceptions import MailServerUnavailable
from airflow_provider_o365mail.hooks.o365mail import O365MailHook
from airflow_provider_o365mail.imap import liveness
from airflow_provider_o365mail.imap.hub import idle_hub
from airflow_provider_o365mail.imap.idle import aioimaplib_client, wait_for_new_mail
from airflow_provider_o365mail.imap.pool import ImapPool
from airflow_provider_o365mail.testing.connect_proxy import ConnectProxy
from airflow_provider_o365mail.testing.fault_proxy import FaultProxy
from airflow_provider_o365mail.testing.packet_drop import PacketDrop
from airflow_provider_o365mail.triggers.imap import O365ImapTrigger

#: The bounds this file proves (seconds from the fault to the client noticing it).
RESET_BOUND = 5
HUNG_BOUND = 60
SILENT_DROP_BOUND = 30


def _proxied(o365_sandbox, monkeypatch, proxy: FaultProxy, **extra) -> str:
    conn_id = f"o365mail_proxied_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{conn_id.upper()}",
        o365_sandbox.connection_json(refresh_token=o365_sandbox.new_refresh_token(), imap_port=proxy.port, **extra),
    )
    return conn_id


@pytest.fixture
def proxied_conn(o365_sandbox, monkeypatch):
    """A connection through a fault proxy, with a short 5 s timeout."""
    with FaultProxy(("127.0.0.1", o365_sandbox.imap_port)) as proxy:
        yield _proxied(o365_sandbox, monkeypatch, proxy, timeout=5), proxy


@pytest.fixture
def production_conn(o365_sandbox, monkeypatch):
    """A connection through a fault proxy with the default timeout (30 s): the shipped probe timings apply."""
    with FaultProxy(("127.0.0.1", o365_sandbox.imap_port)) as proxy:
        yield _proxied(o365_sandbox, monkeypatch, proxy), proxy


@pytest.fixture
def packet_drop_usable():
    reason = PacketDrop.unavailable()
    if reason is not None:
        pytest.skip(f"a silent drop needs nftables: {reason}")


class Noticed(logging.Handler):
    """When the shared IDLE watch logged that its connection failed (and it reconnects)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.at: float | None = None
        self.message = ""
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if not self.seen.is_set() and record.getMessage().startswith("IDLE on INBOX failed"):
            self.at, self.message = time.monotonic(), record.getMessage()
            self.seen.set()


@contextlib.contextmanager
def noticed_by_the_hub():
    handler = Noticed()
    hub_log = logging.getLogger("airflow_provider_o365mail.imap.hub")
    hub_log.addHandler(handler)
    try:
        yield handler
    finally:
        hub_log.removeHandler(handler)


def _fault_while_idle_then_mail(conn_id: str, proxy: FaultProxy, recipient: str, fault, bound: float) -> dict:
    """A deferred sensor's trigger waits in IDLE; ``fault()`` (a context manager) kills the peer and mail is sent.

    The fault lasts until the shared watch noticed (or ``bound`` + 30 s passed); then the peer is healthy
    again and the mail that arrived meanwhile must be found. Returns the seconds until the watch noticed
    and until it reconnected at the proxy, its log line, the sent and the reported subjects.
    """
    subject = f"dead peer {uuid.uuid4().hex[:8]}"
    trigger = O365ImapTrigger(conn_id=conn_id, spec={"folders": ["INBOX"], "subject": subject}, max_idle=1500)

    async def run() -> dict:
        events = trigger.run()
        first = asyncio.ensure_future(events.__anext__())
        # The first check, then the shared watch's IDLE session selects the folder and starts IDLE.
        for _ in range(600):
            if any(state.sessions >= 1 for state in idle_hub().watched()):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the shared watch never selected INBOX")
        await asyncio.sleep(1.0)  # "+ idling": the worst moment, a whole probe interval ahead
        assert not first.done(), "nothing matches before the mail is sent"
        with noticed_by_the_hub() as noticed:
            before = proxy.stats().accepted
            with fault():
                started = time.monotonic()
                await asyncio.to_thread(
                    O365MailHook(conn_id).send_email, to=recipient, subject=subject, text_content="meanwhile"
                )
                await asyncio.to_thread(noticed.seen.wait, bound + 30)
            assert noticed.at is not None, f"the dead IDLE connection went unnoticed for {bound + 30} s"
            await asyncio.to_thread(proxy.wait_for, lambda s: s.accepted > before, 120)
            reconnected = time.monotonic() - started
        event = await asyncio.wait_for(first, 120)
        await events.aclose()
        assert event.payload["status"] == "success", event.payload
        return {
            "noticed": noticed.at - started,
            "reconnected": reconnected,
            "line": noticed.message,
            "sent": subject,
            "found": [m["subject"] for m in event.payload["result"]["messages"]],
        }

    return asyncio.run(run())


def test_a_hung_server_is_noticed_within_60_s_and_mail_delivered_meanwhile_is_found(production_conn, o365_sandbox):
    conn_id, proxy = production_conn
    got = _fault_while_idle_then_mail(conn_id, proxy, o365_sandbox.user, lambda: proxy.stalled("both"), HUNG_BOUND)
    print(
        f"hung peer: noticed after {got['noticed']:.1f} s, reconnected after {got['reconnected']:.1f} s: {got['line']}"
    )
    assert "did not answer" in got["line"], got["line"]
    assert got["noticed"] <= HUNG_BOUND, f"a hung server was noticed after {got['noticed']:.1f} s"
    assert got["found"] == [got["sent"]]


def test_a_silent_drop_is_noticed_within_30_s_and_mail_delivered_meanwhile_is_found(
    production_conn, o365_sandbox, packet_drop_usable
):
    conn_id, proxy = production_conn
    got = _fault_while_idle_then_mail(
        conn_id, proxy, o365_sandbox.user, lambda: PacketDrop(proxy.port), SILENT_DROP_BOUND
    )
    print(
        f"silent drop: noticed after {got['noticed']:.1f} s, reconnected after {got['reconnected']:.1f} s: {got['line']}"
    )
    assert got["noticed"] <= SILENT_DROP_BOUND, f"a silent drop was noticed after {got['noticed']:.1f} s"
    assert got["found"] == [got["sent"]]


def test_a_pooled_session_notices_a_silent_drop_with_a_command_in_flight_before_its_timeout(
    o365_sandbox, monkeypatch, packet_drop_usable
):
    """TCP_USER_TIMEOUT: the socket timeout is 60 s here, yet the command fails within 30 s."""
    with FaultProxy(("127.0.0.1", o365_sandbox.imap_port)) as proxy:
        hook = O365MailHook(_proxied(o365_sandbox, monkeypatch, proxy, timeout=60))
        client, _ = hook.imap_login()
        try:
            with PacketDrop(proxy.port):
                started = time.monotonic()
                with pytest.raises((OSError, imaplib.IMAP4.abort)) as failed:  # ETIMEDOUT, or EOF after it
                    client.noop()
                noticed = time.monotonic() - started
        finally:
            client.shutdown()
    print(f"silent drop, command in flight (pooled session): failed after {noticed:.1f} s with {failed.value!r}")
    assert noticed <= SILENT_DROP_BOUND, f"the command waited {noticed:.1f} s on a dead connection"


def test_a_pooled_session_whose_server_hangs_holds_a_check_no_longer_than_the_probe_answer(o365_sandbox, monkeypatch):
    """Idle in the pool, its server hangs: the NOOP before use gives up after 10 s, not the 60 s timeout."""
    clock = [time.time()]
    with FaultProxy(("127.0.0.1", o365_sandbox.imap_port)) as proxy:
        hung = O365MailHook(_proxied(o365_sandbox, monkeypatch, proxy, timeout=60))
        direct = O365MailHook(_proxied_direct(o365_sandbox, monkeypatch))
        logins = iter([hung.imap_login, direct.imap_login])
        pool = ImapPool(2, name="dead peer", clock=lambda: clock[0], idle_ttl=0)
        with pool.lease(lambda: next(logins)()) as first:
            first.noop()
        clock[0] += pool.probe_after + 1
        with proxy.stalled("both"):
            started = time.monotonic()
            with pool.lease(lambda: next(logins)()) as client:
                waited = time.monotonic() - started
                assert client is not first
                client.noop()  # the new session works
        pool.close_idle()
    print(f"hung peer, pooled session: the lease gave up on it and logged in anew after {waited:.1f} s")
    assert waited <= liveness.PROBE_ANSWER_SECONDS + 10, f"a check waited {waited:.1f} s on a hung session"


def _proxied_direct(o365_sandbox, monkeypatch) -> str:
    conn_id = f"o365mail_direct_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{conn_id.upper()}", o365_sandbox.connection_json(refresh_token=o365_sandbox.new_refresh_token())
    )
    return conn_id


def _options(sock) -> tuple[int, int, int, int, int]:
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
    )


WANTED = (
    1,
    liveness.KEEPALIVE_IDLE_SECONDS,
    liveness.KEEPALIVE_INTERVAL_SECONDS,
    liveness.KEEPALIVE_PROBES,
    liveness.USER_TIMEOUT_SECONDS * 1000,
)


@pytest.mark.parametrize("through", ["direct", "connect proxy"])
def test_every_imap_socket_has_keepalive_and_a_user_timeout(o365_sandbox, monkeypatch, through):
    """Pooled IMAPClient sessions and IDLE sessions, direct and tunnelled through an HTTP CONNECT proxy."""
    with contextlib.ExitStack() as stack:
        extra = {}
        if through == "connect proxy":
            extra["proxy"] = stack.enter_context(ConnectProxy()).url
        conn_id = f"o365mail_sockopts_{uuid.uuid4().hex[:8]}"
        monkeypatch.setenv(
            f"AIRFLOW_CONN_{conn_id.upper()}",
            o365_sandbox.connection_json(refresh_token=o365_sandbox.new_refresh_token(), **extra),
        )
        hook = O365MailHook(conn_id)
        client, _ = hook.imap_login()
        try:
            assert _options(client.socket()) == WANTED, "pooled session"
        finally:
            client.logout()

        seen = []

        def spying_client(endpoint, on_lost):
            idle = aioimaplib_client(endpoint, on_lost)
            idle_start = idle.idle_start

            async def started(*args, **kwargs):
                seen.append(_options(idle.protocol.transport.get_extra_info("socket")))
                return await idle_start(*args, **kwargs)

            idle.idle_start = started
            return idle

        async def run():
            task = asyncio.ensure_future(
                wait_for_new_mail(
                    hook.imap_endpoint(), "INBOX", hook.access_token(), None, client_factory=spying_client
                )
            )
            for _ in range(300):
                if seen:
                    break
                await asyncio.sleep(0.1)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        asyncio.run(run())
        assert seen == [WANTED], "IDLE session"


def test_a_reset_idle_connection_is_noticed_at_once(proxied_conn):
    conn_id, proxy = proxied_conn
    hook = O365MailHook(conn_id)
    endpoint, token = hook.imap_endpoint(), hook.access_token()
    idling = asyncio.Event()

    def spying_client(endpoint, on_lost):
        client = aioimaplib_client(endpoint, on_lost)
        idle_start = client.idle_start

        async def started(*args, **kwargs):
            idle = await idle_start(*args, **kwargs)
            idling.set()  # the server answered "+ idling": the session is in IDLE now
            return idle

        client.idle_start = started
        return client

    async def run():
        task = asyncio.ensure_future(
            wait_for_new_mail(endpoint, "INBOX", token, None, max_idle=1500, client_factory=spying_client)
        )
        await asyncio.wait_for(idling.wait(), 60)
        started = time.monotonic()
        proxy.reset()
        with pytest.raises(MailServerUnavailable, match="lost"):
            await asyncio.wait_for(task, 30)
        return time.monotonic() - started

    noticed = asyncio.run(run())
    print(f"reset: noticed after {noticed:.2f} s")
    assert noticed < RESET_BOUND, f"a reset took {noticed:.1f} s to notice (the IDLE would have run 25 min)"


def test_mail_after_a_reset_fires_the_trigger_within_15_s(proxied_conn, o365_sandbox):
    conn_id, proxy = proxied_conn
    sbx = o365_sandbox
    subject = f"after reset {uuid.uuid4().hex[:8]}"
    trigger = O365ImapTrigger(conn_id=conn_id, spec={"folders": ["INBOX"], "subject": subject}, max_idle=1500)

    async def run():
        events = trigger.run()
        first = asyncio.ensure_future(events.__anext__())
        await asyncio.to_thread(proxy.wait_for, lambda s: s.accepted >= 2, 30)  # the check, then IDLE
        await asyncio.sleep(1.5)
        proxy.reset()
        started = time.monotonic()
        await asyncio.to_thread(O365MailHook(conn_id).send_email, to=sbx.user, subject=subject, text_content="x")
        event = await asyncio.wait_for(first, 60)
        return event, time.monotonic() - started

    event, elapsed = asyncio.run(run())
    print(f"reset: the trigger fired {elapsed:.1f} s after it")
    assert event.payload["status"] == "success"
    assert [m["subject"] for m in event.payload["result"]["messages"]] == [subject]
    assert elapsed < 15, f"the trigger fired {elapsed:.1f} s after the reset"
