"""The shared IDLE hub with a scripted fake IDLE session (no server): fan-out, generations, lifetime."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

import pytest

from airflow_provider_o365mail.exceptions import ConsentRevoked, MailAuthenticationError, MailServerUnavailable
from airflow_provider_o365mail.imap.hub import FolderWatch, IdleHub
from airflow_provider_o365mail.imap.idle import IdleUnsupported, ImapEndpoint
from airflow_provider_o365mail.retry import Backoff

ENDPOINT = ImapEndpoint("imap.test", 993, "me@example.com", 5.0, ssl.create_default_context())
KEY = ("o365mail", "conn", "")


@dataclass(frozen=True)
class Token:
    token: str = "t"
    expires_on: float = 4_000_000_000.0


class FakeServer:
    """IDLE sessions that end when the test says so: ``push()``, ``fail(exc)``; counts sessions."""

    def __init__(self, uidnext: int = 10) -> None:
        self.uidnext = uidnext
        self.sessions = 0
        self.active = 0
        self.max_active = 0
        self.tokens_fetched = 0
        self._outcome: asyncio.Queue | None = None
        self.selected = asyncio.Event()

    async def idle(self, endpoint, folder, token, max_idle, on_selected) -> str:
        self._outcome = self._outcome or asyncio.Queue()
        self.sessions += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            on_selected(self.uidnext)
            self.selected.set()
            outcome = await self._outcome.get()
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        finally:
            self.active -= 1

    async def push(self, count: int = 1) -> None:
        await self._started()
        self.uidnext += count
        self._outcome.put_nowait("push")

    async def fail(self, err: BaseException) -> None:
        await self._started()
        self._outcome.put_nowait(err)

    async def _started(self) -> None:
        await asyncio.wait_for(self.selected.wait(), 5)
        self.selected.clear()

    def token_source(self, *, force_refresh: bool = False) -> Token:
        self.tokens_fetched += 1
        self.forced = getattr(self, "forced", 0) + int(force_refresh)
        return Token()


async def no_sleep(_seconds: float) -> None:
    await asyncio.sleep(0)


def hub_for(server: FakeServer, **kwargs) -> IdleHub:
    return IdleHub(idle=server.idle, sleep=no_sleep, retry=Backoff(first=0.0, maximum=0.0), **kwargs)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


def test_one_idle_session_serves_a_thousand_waiters_and_one_push_wakes_every_one():
    async def scenario():
        server = FakeServer()
        hub = hub_for(server)
        subs = [hub.subscribe(KEY, "INBOX", lambda: ENDPOINT, server.token_source) for _ in range(1000)]
        marks = [s.generation for s in subs]
        waits = [asyncio.ensure_future(s.wait(m, 10)) for s, m in zip(subs, marks, strict=True)]
        await server.push()
        reasons = await asyncio.gather(*waits)
        assert reasons == ["push"] * 1000
        assert server.max_active == 1, "one IDLE connection for all waiters of the folder"
        assert server.tokens_fetched <= 2, (
            "one token read per IDLE session (the second one may be starting), not per waiter"
        )
        for s in subs:
            s.close()

    run(scenario())


def test_a_change_between_mark_and_wait_is_not_lost():
    async def scenario():
        server = FakeServer()
        hub = hub_for(server)
        sub = hub.subscribe(KEY, "INBOX", lambda: ENDPOINT, server.token_source)
        mark = sub.generation
        await server.push()  # while the waiter's check would run
        await asyncio.sleep(0)
        assert await sub.wait(mark, 11) == "push", "returns at once: the generation moved since the mark"
        sub.close()

    run(scenario())


def test_mail_that_arrived_before_the_idle_select_wakes_waiters_whose_check_saw_less():
    async def scenario():
        server = FakeServer(uidnext=12)
        hub = hub_for(server)
        sub = hub.subscribe(KEY, "INBOX", lambda: ENDPOINT, server.token_source)
        mark = sub.generation
        # The waiter's check saw UIDNEXT 11; the IDLE session selected the folder at 12 (mail in between).
        assert await sub.wait(mark, 11) == "changed"
        up_to_date = asyncio.ensure_future(sub.wait(mark, 12))
        await asyncio.sleep(0.05)
        assert not up_to_date.done(), "a waiter that saw UIDNEXT 12 has nothing to re-check"
        await server.push()
        assert await up_to_date == "push"
        sub.close()

    run(scenario())


def test_folders_and_mailboxes_have_their_own_idle_and_generation():
    async def scenario():
        server = FakeServer()
        hub = hub_for(server)
        inbox = hub.subscribe(KEY, "INBOX", lambda: ENDPOINT, server.token_source)
        other = hub.subscribe(
            ("o365mail", "conn", "shared@example.com"), "INBOX", lambda: ENDPOINT, server.token_source
        )
        invoices = hub.subscribe(KEY, "Invoices", lambda: ENDPOINT, server.token_source)
        await asyncio.sleep(0.01)
        assert len(hub.watched()) == 3 and server.active == 3
        for sub in (inbox, other, invoices):
            sub.close()

    run(scenario())


def test_a_multi_folder_watch_wakes_on_any_folder():
    async def scenario():
        server = FakeServer()
        hub = hub_for(server)
        with FolderWatch.join(hub, KEY, ["INBOX", "Invoices"], lambda: ENDPOINT, server.token_source) as watch:
            mark = watch.mark()
            waiting = asyncio.ensure_future(watch.wait(mark, {"INBOX": 10, "Invoices": 10}))
            await asyncio.sleep(0.01)
            assert not waiting.done()
            await server.push()
            assert await waiting == "push"
        await asyncio.sleep(0)
        assert all(not s.waiters for s in hub._folders.values())

    run(scenario())


def test_the_idle_task_stops_shortly_after_its_last_waiter_left_and_not_before():
    async def scenario():
        server = FakeServer()
        hub = hub_for(server, linger=0.2)
        first = hub.subscribe(KEY, "INBOX", lambda: ENDPOINT, server.token_source)
        second = hub.subscribe(KEY, "INBOX", lambda: ENDPOINT, server.token_source)
        await asyncio.sleep(0.01)
        first.close()
        await asyncio.sleep(0.3)
        assert server.active == 1, "one waiter left: the IDLE goes on"
        second.close()
        await asyncio.sleep(0.05)
        assert server.active == 1, "lingers a moment for the next waiter"
        again = hub.subscribe(KEY, "INBOX", lambda: ENDPOINT, server.token_source)
        await asyncio.sleep(0.3)
        assert server.active == 1 and server.sessions == 1, "a waiter that came back reuses the running IDLE"
        again.close()
        await asyncio.sleep(0.4)
        assert server.active == 0 and hub.watched() == [], "no waiter: the IDLE connection is closed"

    run(scenario())


def test_a_dropped_connection_reconnects_and_every_waiter_rechecks():
    async def scenario():
        server = FakeServer()
        hub = hub_for(server)
        subs = [hub.subscribe(KEY, "INBOX", lambda: ENDPOINT, server.token_source) for _ in range(5)]
        marks = [s.generation for s in subs]
        waits = [asyncio.ensure_future(s.wait(m, 10)) for s, m in zip(subs, marks, strict=True)]
        await server.fail(MailServerUnavailable("The IDLE connection to imap.test:993 was lost; reconnecting."))
        assert await asyncio.gather(*waits) == ["reconnect"] * 5, "pushes may have been missed while down"
        assert server.sessions == 2
        for s in subs:
            s.close()

    run(scenario())


def test_a_permanent_error_reaches_every_waiter_and_a_later_waiter_starts_afresh():
    async def scenario():
        server = FakeServer()
        hub = hub_for(server)
        subs = [hub.subscribe(KEY, "INBOX", lambda: ENDPOINT, server.token_source) for _ in range(3)]
        waits = [asyncio.ensure_future(s.wait(s.generation, 10)) for s in subs]
        await server.fail(ConsentRevoked("AADSTS65001: consent revoked; run airflow o365mail authorize"))
        results = await asyncio.gather(*waits, return_exceptions=True)
        assert all(isinstance(r, ConsentRevoked) and "AADSTS65001" in str(r) for r in results)
        assert len({id(r) for r in results}) == 3, "each waiter raises its own instance"
        for s in subs:
            s.close()
        fresh = hub.subscribe(KEY, "INBOX", lambda: ENDPOINT, server.token_source)
        await asyncio.sleep(0.01)
        assert server.sessions == 2 and fresh.state.error is None
        fresh.close()

    run(scenario())


def test_a_permanent_error_with_keyword_only_arguments_reaches_the_waiter_as_itself():
    from airflow_provider_o365mail.exceptions import ProxyRefused

    async def scenario():
        server = FakeServer()
        hub = hub_for(server)
        sub = hub.subscribe(KEY, "INBOX", lambda: ENDPOINT, server.token_source)
        waiting = asyncio.ensure_future(sub.wait(sub.generation, 10))
        await server.fail(
            ProxyRefused("The proxy refused the tunnel (403).", proxy="http://proxy.test:3128", status=403)
        )
        with pytest.raises(ProxyRefused, match="refused the tunnel") as raised:
            await waiting
        assert (raised.value.proxy, raised.value.status) == ("http://proxy.test:3128", 403)
        sub.close()

    run(scenario())


def test_without_idle_the_shared_loop_polls_at_the_shortest_interval():
    async def scenario():
        slept: list[float] = []

        async def idle(*_args):
            raise IdleUnsupported("imap.test")

        async def sleep(seconds: float) -> None:
            slept.append(seconds)
            await asyncio.sleep(0.01)

        hub = IdleHub(idle=idle, sleep=sleep)
        slow = hub.subscribe(KEY, "INBOX", lambda: ENDPOINT, Token, poll_interval=60)
        fast = hub.subscribe(KEY, "INBOX", lambda: ENDPOINT, Token, poll_interval=15)
        first = await fast.wait(fast.generation)
        assert first == "poll"
        assert await slow.wait(slow.generation) == "poll"
        assert slept and set(slept) == {15}
        slow.close()
        fast.close()

    run(scenario())


def test_the_token_and_endpoint_are_fetched_off_the_event_loop():
    async def scenario():
        loop_thread = asyncio.get_running_loop()._thread_id  # type: ignore[attr-defined]
        seen: list[int] = []
        import threading

        server = FakeServer()

        def token_source() -> Token:
            seen.append(threading.get_ident())
            return Token()

        hub = hub_for(server)
        sub = hub.subscribe(KEY, "INBOX", lambda: ENDPOINT, token_source)
        await asyncio.wait_for(server.selected.wait(), 5)
        assert seen and loop_thread not in seen
        sub.close()

    run(scenario())


@pytest.mark.parametrize("waiters", [1, 50])
def test_closing_every_subscription_leaves_no_waiter_behind(waiters):
    async def scenario():
        server = FakeServer()
        hub = hub_for(server, linger=0.0)
        subs = [hub.subscribe(KEY, "INBOX", lambda: ENDPOINT, server.token_source) for _ in range(waiters)]
        for s in subs:
            s.close()
            s.close()  # twice is harmless
        await asyncio.sleep(0.05)
        assert hub._folders == {} and server.active == 0

    run(scenario())


def test_a_loop_that_ended_with_its_last_waiter_is_started_again_by_the_next():
    async def scenario():
        server = FakeServer()
        hub = hub_for(server, linger=60.0)
        first = hub.subscribe(KEY, "INBOX", lambda: ENDPOINT, server.token_source)
        await asyncio.sleep(0.01)
        state = first.state
        first.close()
        await server.push()  # the session ends while nobody waits: the loop returns instead of lingering on
        await asyncio.wait_for(asyncio.shield(state.task), 5)
        again = hub.subscribe(KEY, "INBOX", lambda: ENDPOINT, server.token_source)
        assert again.state is state
        await asyncio.wait_for(server.selected.wait(), 5)
        assert server.active == 1 and server.sessions == 2
        again.close()

    run(scenario())


def test_a_refused_idle_login_is_tried_once_more_with_a_refreshed_token():
    """As for IMAP and SMTP logins: a token refused before its expiry is refreshed once; only a second
    refusal ends the watch for every waiter."""

    async def scenario():
        server = FakeServer()
        hub = hub_for(server)
        sub = hub.subscribe(KEY, "INBOX", lambda: ENDPOINT, server.token_source)
        wait = asyncio.ensure_future(sub.wait(sub.generation, 10))
        await server.fail(MailAuthenticationError("AUTHENTICATE failed"))
        await server.push()  # the session with the refreshed token works
        assert await wait == "push"
        assert server.forced == 1 and server.sessions == 2
        again = asyncio.ensure_future(sub.wait(sub.generation, 11))
        await server.fail(MailAuthenticationError("AUTHENTICATE failed"))
        await server.fail(MailAuthenticationError("AUTHENTICATE failed again"))
        with pytest.raises(MailAuthenticationError, match="again"):
            await again
        assert server.forced == 2
        sub.close()

    run(scenario())
