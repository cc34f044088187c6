"""The event stream's reads, retries, waits and advance with fakes (no server, no sleeping).

The first tests script the folder watch; the ones after "through the shared IDLE hub" run the real
:class:`IdleHub` over fake IDLE sessions, as the triggerer does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from imap_fakes import FakeFolder, FakeImapClient

from airflow_provider_o365mail.core.watermark import FolderWatermark
from airflow_provider_o365mail.exceptions import ConsentRevoked
from airflow_provider_o365mail.imap.stream import FolderStream
from airflow_provider_o365mail.retry import Backoff


class FakeWatch:
    """A scripted folder watch: each wait delivers the next message into the folder and ends with a push."""

    def __init__(self, folder: FakeFolder, arrivals: list[str]) -> None:
        self.folder = folder
        self.arrivals = list(arrivals)
        self.generation = 0
        self.waits: list[tuple[dict, dict]] = []
        self.joined = 0
        self.closed = 0

    def join(self) -> FakeWatch:
        self.joined += 1
        return self

    def mark(self) -> dict[str, int]:
        return {"INBOX": self.generation}

    async def wait(self, mark, uidnext):
        self.waits.append((dict(mark), dict(uidnext)))
        if self.arrivals:
            self.folder.deliver(self.arrivals.pop(0))
        self.generation += 1
        await asyncio.sleep(0)
        return "push"

    def close(self) -> None:
        self.closed += 1


@dataclass
class Sleeps:
    slept: list[float] = field(default_factory=list)

    async def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)


def take(stream: FolderStream, start: FolderWatermark | None, count: int, **kwargs: Any) -> list[dict]:
    async def run():
        got = []
        async for _raw, payload in stream.events(start, **kwargs):
            got.append(payload)
            if len(got) == count:
                return got
        return got

    return asyncio.run(asyncio.wait_for(run(), timeout=10))


def test_a_first_start_stores_its_position_before_anything_is_yielded_then_reads_in_uid_order():
    folder = FakeFolder()
    folder.deliver("<before-start>")
    client = FakeImapClient({"INBOX": folder})
    stored: list[FolderWatermark] = []

    async def on_first_position(position: FolderWatermark) -> None:
        assert not yielded, "the start must be durable before the first event"
        stored.append(position)

    yielded: list[dict] = []
    stream = FolderStream(client.session, FakeWatch(folder, ["<m1>", "<m2>"]).join, "INBOX")
    yielded.extend(take(stream, None, 2, on_first_position=on_first_position))
    assert [p["message_id"] for p in yielded] == ["<m1>", "<m2>"]
    assert stored == [FolderWatermark(1, 1)], "mail from before the first start is not reported"


def test_resuming_from_a_stored_position_reports_what_came_after_it():
    folder = FakeFolder()
    for message_id in ("<a>", "<b>", "<c>"):
        folder.deliver(message_id)
    stream = FolderStream(FakeImapClient({"INBOX": folder}).session, FakeWatch(folder, []).join, "INBOX")
    assert [p["uid"] for p in take(stream, FolderWatermark(1, 1), 2)] == [2, 3]


def test_transient_read_failures_back_off_by_the_policy_and_recover():
    folder = FakeFolder()
    client = FakeImapClient({"INBOX": folder})
    failures = [ConnectionResetError("reset by peer"), TimeoutError("timed out")]

    def flaky_session():
        if failures:
            raise failures.pop(0)
        return client.session()

    sleeps = Sleeps()
    stream = FolderStream(
        flaky_session,
        FakeWatch(folder, ["<m1>"]).join,
        "INBOX",
        retry=Backoff(first=2.0, maximum=8.0, jitter=(1.0, 1.0)),
        sleep=sleeps,
    )
    assert [p["message_id"] for p in take(stream, FolderWatermark(1, 0), 1)] == ["<m1>"]
    assert sleeps.slept == [2.0, 4.0]


def test_permanent_failures_park_the_stream_instead_of_failing_it():
    folder = FakeFolder()
    client = FakeImapClient({"INBOX": folder})
    failures = [ConsentRevoked("consent revoked", conn_id="c")] * 3

    def session():
        if failures:
            raise failures.pop(0)
        return client.session()

    sleeps = Sleeps()
    watch = FakeWatch(folder, ["<m1>"])
    stream = FolderStream(session, watch.join, "INBOX", sleep=sleeps)
    assert [p["message_id"] for p in take(stream, FolderWatermark(1, 0), 1)] == ["<m1>"]
    assert sleeps.slept == [60.0, 120.0, 240.0], "parked: checked again rarely, not in Airflow's restart loop"
    assert watch.joined == 4 and watch.closed >= 3, "a parked stream leaves the watch and joins it again"


def test_the_wait_is_for_a_change_since_before_the_read_and_is_told_the_uidnext_the_read_saw():
    folder = FakeFolder()
    folder.deliver("<a>")
    watch = FakeWatch(folder, ["<b>"])
    watch.generation = 7
    stream = FolderStream(FakeImapClient({"INBOX": folder}).session, watch.join, "INBOX")
    take(stream, FolderWatermark(1, 1), 1)
    assert watch.waits[0] == ({"INBOX": 7}, {"INBOX": 2})
    assert watch.joined == 1, "one watch for the stream's whole life"


@pytest.mark.parametrize("clean", [2, 1])
def test_the_producer_advances_only_over_messages_airflow_stored(clean):
    from airflow_provider_o365mail.exceptions import O365MailError
    from airflow_provider_o365mail.triggers import imap_events

    producer = imap_events.ImapStreamProducer({"conn_id": "c", "folder": "INBOX"})
    stored: dict[str, Any] = {}

    class Accessor:
        async def aset(self, key, value):
            stored[key] = value

    imap_events._group(producer.key).stores[1] = Accessor()

    @dataclass(frozen=True)
    class Outcome:
        is_clean: bool

    @dataclass(frozen=True)
    class Item:
        broker_payload: dict
        outcome: Outcome

    batch = [
        Item(
            {"uidvalidity": 1, "uid": uid, "message_id": f"<{uid}>", "seen_key": f"<{uid}>|100"},
            Outcome(is_clean=i < clean),
        )
        for i, uid in enumerate((5, 6))
    ]
    try:
        if clean == 2:
            asyncio.run(producer.advance(batch))
        else:
            with pytest.raises(O365MailError, match="restarting the stream from the last confirmed position"):
                asyncio.run(producer.advance(batch))
    finally:
        imap_events._GROUPS.clear()
    position = FolderWatermark.from_dict(stored[imap_events.POSITION_KEY])
    assert position.last_uid == (6 if clean == 2 else 5)
    assert position.seen_keys == [f"<{uid}>|100" for uid in (5, 6)[:clean]]


def test_building_a_stream_reads_no_connection():
    """The triggerer builds it on its event loop: loading the connection there would block it (and fail
    before the stream's retry loop could recover from a connection that appears later)."""
    from airflow_provider_o365mail.hooks.o365mail import O365MailHook

    hook = O365MailHook("o365mail_does_not_exist_yet")
    hook.folder_stream("INBOX")
    assert "settings" not in vars(hook)


# ---------------------------------------------------------------------- through the shared IDLE hub
KEY = ("o365mail", "c", "")


@dataclass(frozen=True)
class Token:
    token: str = "t"
    expires_on: float = 4_000_000_000.0


def endpoint():
    import ssl

    from airflow_provider_o365mail.imap.idle import ImapEndpoint

    return ImapEndpoint("imap.test", 993, "me@example.com", 5.0, ssl.create_default_context())


class FolderIdle:
    """The server's side of IDLE on a :class:`FakeFolder`, as the hub runs it: SELECT reports the folder's
    UIDNEXT, :meth:`push` ends the session with new mail. Sessions after ``hold_after`` wait for
    ``release`` before their SELECT (a slow reconnect); ``fail_first`` ends the first session with it."""

    def __init__(self, folder: FakeFolder, *, hold_after: int | None = None, fail_first=None) -> None:
        self.folder = folder
        self.hold_after = hold_after
        self.fail_first = fail_first
        self.sessions = 0
        self.active = 0
        self.max_active = 0
        self.release = asyncio.Event()
        self._pushes: asyncio.Queue[str] = asyncio.Queue()

    async def idle(self, _endpoint, _folder, _token, _max_idle, on_selected) -> str:
        self.sessions += 1
        if self.hold_after is not None and self.sessions > self.hold_after:
            await self.release.wait()
        if self.sessions == 1 and self.fail_first is not None:
            raise self.fail_first
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            on_selected(self.folder.uidnext)
            return await self._pushes.get()
        finally:
            self.active -= 1

    def push(self) -> None:
        self._pushes.put_nowait("push")


class Reads:
    """The stream's ``open_client``: counts reads and runs ``after(n)`` in the read's thread once read n is done."""

    def __init__(self, client: FakeImapClient, after=None) -> None:
        self.client = client
        self.after = after or (lambda _n: None)
        self.count = 0

    @contextlib.contextmanager
    def __call__(self):
        yield self.client
        self.count += 1
        self.after(self.count)


def until(condition, timeout: float = 5.0) -> None:
    """Block the calling (worker) thread until ``condition()`` holds, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.001)


def hub_for(idle, **kwargs):
    from airflow_provider_o365mail.imap.hub import IdleHub

    async def no_sleep(_seconds: float) -> None:
        await asyncio.sleep(0)

    kwargs.setdefault("sleep", no_sleep)
    return IdleHub(idle=idle, retry=Backoff(first=0.0, maximum=0.0), **kwargs)


def hub_stream(hub, reads: Reads, **kwargs) -> FolderStream:
    from airflow_provider_o365mail.imap.hub import FolderWatch

    return FolderStream(
        reads, lambda: FolderWatch.join(hub, KEY, ["INBOX"], endpoint, Token, poll_interval=7), "INBOX", **kwargs
    )


async def first_events(stream: FolderStream, start: FolderWatermark | None, count: int) -> list[dict]:
    got: list[dict] = []
    events = stream.events(start)
    try:
        async for _raw, payload in events:
            got.append(payload)
            if len(got) == count:
                break
    finally:
        await events.aclose()
    return got


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


def test_a_push_during_the_streams_read_is_not_lost_while_the_idle_reconnects():
    """Mail lands after the read looked and the IDLE pushes before the stream waits; the IDLE's next
    session is slow to SELECT, so only "changed since before the read" can wake the stream."""

    async def scenario():
        loop = asyncio.get_running_loop()
        folder = FakeFolder()
        server = FolderIdle(folder, hold_after=1)
        hub = hub_for(server.idle)

        def after(n: int) -> None:
            if n != 1:
                return
            # Bounded waits: a broken hub fails the test instead of hanging it.
            until(lambda: server.active == 1)  # the first IDLE session selected the folder before the mail
            state = hub.watched()[0]
            seen = state.generation
            folder.deliver("<during-read>")
            loop.call_soon_threadsafe(server.push)
            until(lambda: state.generation > seen)  # the push reached the hub before this read returns

        stream = hub_stream(hub, Reads(FakeImapClient({"INBOX": folder}), after))
        got = await first_events(stream, FolderWatermark(1, 0), 1)
        assert [p["message_id"] for p in got] == ["<during-read>"]
        (state,) = hub._folders.values()
        assert state.uidnext == 1, "no IDLE session selected the folder after the mail came: only the push woke it"
        server.release.set()

    run(scenario())


def test_mail_between_idle_sessions_wakes_the_stream_by_uidnext_without_a_push():
    """No push ever comes: the IDLE selects after the mail arrived, and its UIDNEXT is above the read's."""

    async def scenario():
        loop = asyncio.get_running_loop()
        folder = FakeFolder()
        server = FolderIdle(folder, hold_after=0)
        hub = hub_for(server.idle)

        def after(n: int) -> None:
            if n == 1:
                folder.deliver("<between-sessions>")
                loop.call_soon_threadsafe(server.release.set)

        stream = hub_stream(hub, Reads(FakeImapClient({"INBOX": folder}), after))
        got = await first_events(stream, FolderWatermark(1, 0), 1)
        assert [p["message_id"] for p in got] == ["<between-sessions>"]
        state = hub.watched()[0] if hub.watched() else None
        assert state is None or state.generation == 0, "woken by UIDNEXT, not by a generation bump"

    run(scenario())


def test_a_deferred_sensor_and_a_stream_of_one_folder_share_one_idle_and_one_push_wakes_both():
    """Wired as in the triggerer: the sensor's trigger joins through ``hook.folder_watch``, the event
    stream through ``hook.folder_stream``; both land on the same IDLE loop of the process's hub."""
    from airflow_provider_o365mail.hooks.o365mail import O365MailHook
    from airflow_provider_o365mail.imap import hub as imap_hub

    async def scenario():
        folder = FakeFolder()
        server = FolderIdle(folder)
        hub = imap_hub._HUBS[asyncio.get_running_loop()] = hub_for(server.idle)
        hook = O365MailHook("c")
        hook.imap_endpoint = lambda mailbox=None: endpoint()  # type: ignore[method-assign]
        hook.access_token = lambda **_kw: Token()  # type: ignore[method-assign]
        hook.shared_slot = lambda kind, mailbox=None: None  # type: ignore[method-assign]  # no Variables here
        reads = Reads(FakeImapClient({"INBOX": folder}))
        stream = hook.folder_stream("INBOX")
        stream.open_client = reads
        with hook.folder_watch(["INBOX"]) as sensor:
            mark = sensor.mark()
            sensor_woken = asyncio.ensure_future(sensor.wait(mark, {"INBOX": folder.uidnext}))
            streamed = asyncio.ensure_future(first_events(stream, FolderWatermark(1, 0), 1))
            while reads.count < 1 or server.active < 1:
                await asyncio.sleep(0.001)
            (state,) = hub._folders.values()
            assert len(state.waiters) == 2, "the sensor and the stream wait on one watch of the folder"
            folder.deliver("<one>")
            server.push()
            assert await sensor_woken == "push"
            assert [p["message_id"] for p in await streamed] == ["<one>"]
        assert server.max_active == 1 and len(hub.watched()) <= 1, "one IDLE connection for the folder"
        assert server.sessions <= 2, "the push's session and the one after it, nothing per waiter"

    run(scenario())


def test_a_permanent_error_of_the_shared_idle_parks_the_stream_without_holding_the_watch():
    from airflow_provider_o365mail.exceptions import ProxyRefused

    async def scenario():
        folder = FakeFolder()
        refused = ProxyRefused("The proxy refused the tunnel (403).", proxy="http://proxy.test:3128", status=403)
        server = FolderIdle(folder, fail_first=refused)
        hub = hub_for(server.idle, linger=0.0)
        parked_with: list[int] = []

        async def park(seconds: float) -> None:
            await asyncio.sleep(0.01)
            parked_with.append(sum(len(s.waiters) for s in hub._folders.values()))
            folder.deliver("<while-parked>")

        stream = hub_stream(hub, Reads(FakeImapClient({"INBOX": folder})), sleep=park)
        events = stream.events(FolderWatermark(1, 0))
        _raw, payload = await anext(events)
        assert payload["message_id"] == "<while-parked>"
        assert parked_with == [0], "parked once, subscribed to nothing (no IDLE held for a stream that waits 60 s)"
        (fresh,) = hub._folders.values()
        assert fresh.error is None and len(fresh.waiters) == 1, "the check after the park joined a fresh IDLE loop"
        await events.aclose()

    run(scenario())


def test_where_idle_is_missing_the_stream_reads_at_each_shared_poll():
    from airflow_provider_o365mail.imap.idle import IdleUnsupported

    async def scenario():
        folder = FakeFolder()
        polls: list[float] = []

        async def idle(*_args):
            raise IdleUnsupported("imap.test")

        async def sleep(seconds: float) -> None:
            polls.append(seconds)
            if len(polls) == 2:
                folder.deliver("<polled>")
            await asyncio.sleep(0)

        hub = hub_for(idle, sleep=sleep)
        reads = Reads(FakeImapClient({"INBOX": folder}))
        got = await first_events(hub_stream(hub, reads), FolderWatermark(1, 0), 1)
        assert [p["message_id"] for p in got] == ["<polled>"]
        assert set(polls) == {7}, "the stream's poll_interval"
        assert reads.count >= 2

    run(scenario())


def test_closing_the_stream_leaves_the_shared_watch():
    async def scenario():
        folder = FakeFolder()
        server = FolderIdle(folder)
        hub = hub_for(server.idle, linger=0.0)
        folder.deliver("<m1>")
        reads = Reads(FakeImapClient({"INBOX": folder}))
        assert len(await first_events(hub_stream(hub, reads), FolderWatermark(1, 0), 1)) == 1
        await asyncio.sleep(0.01)
        assert hub._folders == {} and server.active == 0

    run(scenario())
