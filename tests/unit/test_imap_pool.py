"""The per-mailbox IMAP pool and the async check gate with fake clients and an injected clock."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass

import pytest

from airflow_provider_o365mail.core.gate import CheckGate
from airflow_provider_o365mail.exceptions import MailServerUnavailable
from airflow_provider_o365mail.imap.pool import ImapPool
from airflow_provider_o365mail.imap.scan import ImapSession


@dataclass(frozen=True)
class Token:
    token: str
    expires_on: float


class FakeClient:
    def __init__(self, number: int) -> None:
        self.number = number
        self.logged_out = False
        self.dropped = False  # its socket closed without LOGOUT
        self.noops = 0
        self.alive = True

    def noop(self) -> None:
        self.noops += 1
        if not self.alive:
            raise OSError("connection reset")

    def logout(self) -> None:
        self.logged_out = True

    def shutdown(self) -> None:
        self.dropped = True


class Server:
    """Logs clients in (with a token of ``lifetime`` seconds) and counts open connections."""

    def __init__(self, clock: list[float], lifetime: float = 3600.0) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.clients: list[FakeClient] = []
        self.lock = threading.Lock()

    def login(self) -> tuple[FakeClient, Token]:
        with self.lock:
            client = FakeClient(len(self.clients) + 1)
            self.clients.append(client)
        return client, Token(f"t{client.number}", self.clock[0] + self.lifetime)

    def open(self) -> int:
        return sum(not (c.logged_out or c.dropped) for c in self.clients)


@pytest.fixture
def clock() -> list[float]:
    return [1_000_000.0]


def make_pool(clock: list[float], size: int = 4, **kwargs) -> ImapPool:
    return ImapPool(size, name="conn/me", clock=lambda: clock[0], idle_ttl=0, **kwargs)


def test_sessions_are_reused_between_checks(clock):
    server, pool = Server(clock), make_pool(clock)
    for _ in range(5):
        with pool.lease(server.login) as client:
            assert client.number == 1
    assert len(server.clients) == 1 and pool.opened == 1


def test_the_budget_is_never_exceeded_by_many_threads(clock):
    server, pool = Server(clock), make_pool(clock, size=3)
    peak = [0]
    inside = [0]
    lock = threading.Lock()

    def check() -> None:
        with pool.lease(server.login):
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0], server.open())
            time.sleep(0.002)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=lambda: [check() for _ in range(10)]) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 3, "200 checks from 20 threads, never more than 3 connections open"
    assert pool.max_leased == 3 and len(server.clients) == 3


def test_a_session_whose_token_nears_expiry_logs_in_again_before_use(clock):
    server, pool = Server(clock, lifetime=600.0), make_pool(clock, token_margin=120.0)
    with pool.lease(server.login) as first:
        pass
    clock[0] += 470.0  # 130 s left: still used
    with pool.lease(server.login) as client:
        assert client is first
    clock[0] += 20.0  # 110 s left: inside the margin
    with pool.lease(server.login) as client:
        assert client is not first and client.number == 2
    assert first.logged_out, "the old session is logged out, not left to Exchange's BYE AccessTokenExpired"


def test_a_session_is_dropped_after_an_error_in_its_lease(clock):
    server, pool = Server(clock), make_pool(clock)
    with pytest.raises(RuntimeError), pool.lease(server.login) as first:
        raise RuntimeError("the server refused a command")
    assert first.logged_out, "the connection works: the server gets its LOGOUT"
    with pool.lease(server.login) as client:
        assert client is not first
    assert pool.open_connections == 1


def test_a_session_idle_for_a_while_is_probed_and_a_dead_one_replaced(clock):
    server, pool = Server(clock), make_pool(clock, probe_after=20.0)
    with pool.lease(server.login) as first:
        pass
    clock[0] += 5
    with pool.lease(server.login) as client:
        assert client is first and first.noops == 0, "recently used: no probe"
    clock[0] += 30
    first.alive = False
    with pool.lease(server.login) as client:
        assert client.number == 2
    assert first.noops == 1 and first.dropped and not first.logged_out, "a dead session gets no LOGOUT to wait for"


class SocketClient(FakeClient):
    """A client on a real socket whose server reads commands and answers only while ``answering``."""

    def __init__(self, number: int, timeout: float) -> None:
        super().__init__(number)
        self.sock, self.server = socket.socketpair()
        self.sock.settimeout(timeout)  # what IMAPClient does with the connection's timeout
        self.answering = True

    def socket(self) -> socket.socket:
        return self.sock

    def shutdown(self) -> None:
        self.dropped = True
        self.sock.close()
        self.server.close()

    def _command(self, line: bytes) -> None:
        self.sock.sendall(line)
        self.server.recv(100)
        if self.answering:
            self.server.sendall(b"a OK\r\n")
        self.sock.recv(100)  # the answer, or a timeout

    def noop(self) -> None:
        self.noops += 1
        self._command(b"a NOOP\r\n")

    def logout(self) -> None:
        self._command(b"a LOGOUT\r\n")
        self.logged_out = True


def test_a_pooled_session_whose_server_hangs_holds_the_check_no_longer_than_the_probe_answer(clock):
    logins: list[SocketClient] = []

    def login():
        logins.append(SocketClient(len(logins) + 1, timeout=30.0))
        return logins[-1], Token("t", clock[0] + 3600)

    pool = make_pool(clock, probe_after=20.0, probe_answer=0.3)
    with pool.lease(login) as first:
        pass
    clock[0] += 30
    with pool.lease(login) as client:
        assert client is first and first.noops == 1
    assert first.sock.gettimeout() == 30.0, "the probe's deadline is undone after it"
    clock[0] += 30
    first.answering = False  # TCP is up, the kernel acknowledges, nobody answers
    started = time.monotonic()
    with pool.lease(login) as client:
        waited = time.monotonic() - started
    assert client.number == 2 and first.dropped and not first.logged_out
    assert waited < 5, f"the check waited {waited:.1f} s for a hung session (its socket timeout is 30 s)"
    client.shutdown()


def test_a_logout_nobody_answers_is_given_up_after_a_few_seconds(clock, monkeypatch):
    from airflow_provider_o365mail.imap import pool as pool_module

    monkeypatch.setattr(pool_module, "LOGOUT_SECONDS", 0.3)
    client = SocketClient(1, timeout=30.0)
    client.answering = False
    started = time.monotonic()
    pool_module.close_client(client)
    assert time.monotonic() - started < 5 and client.dropped and not client.logged_out


def test_a_lease_that_finds_the_budget_busy_gives_up_with_what_to_do(clock):
    server, pool = Server(clock), make_pool(clock, size=1, acquire_timeout=0.05)
    busy = "max_imap_connections_per_mailbox"
    with pool.lease(server.login), pytest.raises(MailServerUnavailable, match=busy), pool.lease(server.login):
        pass


def test_idle_sessions_are_logged_out_after_their_ttl(clock):
    server = Server(clock)
    pool = ImapPool(2, clock=lambda: clock[0], idle_ttl=30.0)
    with pool.lease(server.login):
        pass
    assert pool.close_idle(older_than=30.0) == 0
    clock[0] += 31
    assert pool.close_idle(older_than=30.0) == 1 and server.open() == 0


def test_reopen_in_a_scan_drops_the_pooled_client_instead_of_returning_it(clock):
    server, pool = Server(clock), make_pool(clock)
    with ImapSession(lambda: pool.lease(server.login)) as session:
        broken = session.client
        session.reopen()
        assert session.client is not broken
    assert broken.dropped, "a client a response broke must not go back to the pool"
    with pool.lease(server.login) as client:
        assert client.number == 2
    assert pool.open_connections == 1


# ---------------------------------------------------------------------- the async gate
def test_identical_checks_waiting_together_run_once():
    async def scenario():
        gate = CheckGate(limit=2)
        calls: list[str] = []
        release = threading.Event()

        def check(name: str):
            def run() -> str:
                calls.append(name)
                release.wait(5)
                return f"result of {name}"

            return run

        busy = [asyncio.ensure_future(gate.run(("busy", i), check(f"busy{i}"))) for i in range(2)]
        await asyncio.sleep(0.05)  # both slots taken: the next ones queue
        same = [asyncio.ensure_future(gate.run("same", check("same"))) for _ in range(50)]
        other = asyncio.ensure_future(gate.run("other", check("other")))
        await asyncio.sleep(0.05)
        release.set()
        results = await asyncio.gather(*busy, *same, other)
        assert calls.count("same") == 1, "50 identical queued checks, one IMAP check"
        assert results[2:52] == ["result of same"] * 50 and results[-1] == "result of other"
        assert gate.ran == 4 and gate.requested == 53

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_a_check_that_already_started_is_not_joined():
    """It may have read the folder before the change a new caller was woken for."""

    async def scenario():
        gate = CheckGate(limit=4)
        started = threading.Event()
        release = threading.Event()
        calls = []

        def check() -> int:
            calls.append(1)
            started.set()
            release.wait(5)
            return len(calls)

        first = asyncio.ensure_future(gate.run("same", check))
        await asyncio.to_thread(started.wait, 5)
        second = asyncio.ensure_future(gate.run("same", check))
        await asyncio.sleep(0.05)
        release.set()
        await asyncio.gather(first, second)
        assert len(calls) == 2

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_the_gate_never_runs_more_than_its_limit_and_keeps_the_executor_free():
    async def scenario():
        gate = CheckGate(limit=3)
        running = [0]
        peak = [0]
        lock = threading.Lock()

        def check() -> None:
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.005)
            with lock:
                running[0] -= 1

        checks = [asyncio.ensure_future(gate.run(i, check)) for i in range(60)]
        await asyncio.sleep(0.01)
        # Other blocking work (token reads) still gets a thread while 57 checks queue on the loop.
        started = time.monotonic()
        await asyncio.to_thread(lambda: None)
        assert time.monotonic() - started < 2.0
        await asyncio.gather(*checks)
        assert peak[0] == 3 == gate.max_running

    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_a_cancelled_caller_does_not_cancel_the_check_others_share():
    async def scenario():
        gate = CheckGate(limit=1)
        release = threading.Event()
        blocker = asyncio.ensure_future(gate.run("blocker", lambda: release.wait(5)))
        await asyncio.sleep(0.02)
        leaver = asyncio.ensure_future(gate.run("same", lambda: "shared"))
        stayer = asyncio.ensure_future(gate.run("same", lambda: "shared"))
        await asyncio.sleep(0.02)
        leaver.cancel()
        release.set()
        assert await stayer == "shared"
        await blocker

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_an_error_inside_a_scan_drops_the_pooled_client(clock):
    server, pool = Server(clock), make_pool(clock)
    with pytest.raises(OSError), ImapSession(lambda: pool.lease(server.login)) as session:
        first = session.client
        raise OSError("EOF occurred in violation of protocol")
    assert first.dropped and not first.logged_out, "a broken connection is closed, not sent a LOGOUT"
    with pool.lease(server.login) as client:
        assert client is not first


# ---------------------------------------------------------------------- the hook's side
def test_the_budget_options_are_read_and_a_wrong_value_names_the_option(monkeypatch):
    from airflow_provider_o365mail.exceptions import ConnectionConfigError
    from airflow_provider_o365mail.hooks.o365mail import configured_budget

    monkeypatch.setenv("AIRFLOW__O365MAIL__MAX_IMAP_CONNECTIONS_PER_MAILBOX", "7")
    assert configured_budget("max_imap_connections_per_mailbox", 4) == 7
    for wrong in ("0", "many"):
        monkeypatch.setenv("AIRFLOW__O365MAIL__MAX_IMAP_CONNECTIONS_PER_MAILBOX", wrong)
        with pytest.raises(ConnectionConfigError, match=rf"\[o365mail\] max_imap_connections_per_mailbox .*'{wrong}'"):
            configured_budget("max_imap_connections_per_mailbox", 4)


def test_joining_the_shared_watch_on_the_event_loop_reads_no_connection():
    """The triggerer calls it on its event loop: the connection is loaded later, in the IDLE task's thread."""
    from airflow_provider_o365mail.hooks.o365mail import O365MailHook

    async def scenario():
        hook = O365MailHook("o365mail_does_not_exist_yet")
        with hook.folder_watch(["INBOX", "Invoices"]) as watch:
            assert set(watch.mark()) == {"INBOX", "Invoices"}
            assert "settings" not in vars(hook)

    asyncio.run(scenario())


def test_a_pool_and_a_gate_are_shared_per_connection_and_mailbox():
    from airflow_provider_o365mail.hooks.o365mail import O365MailHook

    assert O365MailHook("a").imap_pool() is O365MailHook("a").imap_pool()
    assert O365MailHook("a").imap_pool() is not O365MailHook("b").imap_pool()
    assert O365MailHook("a").imap_pool("shared@example.com") is not O365MailHook("a").imap_pool()
    assert O365MailHook("a").smtp_budget() is O365MailHook("a").smtp_budget()


def test_close_idle_pools_logs_out_the_idle_sessions_of_every_pool_but_not_leased_ones(clock):
    from airflow_provider_o365mail.imap.pool import close_idle_pools, imap_pool

    server = Server(clock)
    first, second = imap_pool(("test", "one", "")), imap_pool(("test", "two", ""))
    with first.lease(server.login):
        pass
    with second.lease(server.login) as leased:
        assert close_idle_pools() >= 1
        assert server.clients[0].logged_out and not leased.logged_out
    assert first.open_connections == 0 and second.open_connections == 1
    close_idle_pools()
    assert server.open() == 0
