"""The shared Graph delta-poll hub with a fake Graph folder and a fake clock (no server): fan-out,
generations, adaptive intervals, failures, expiry, lifetime; and the per-mailbox request pacer."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from airflow_provider_o365mail.exceptions import ConsentRevoked, GraphRequestRefused, MailServerUnavailable
from airflow_provider_o365mail.graph import folders as graph_folders
from airflow_provider_o365mail.graph.client import RequestPacer
from airflow_provider_o365mail.graph.hub import GraphFolderWatch, GraphHub
from airflow_provider_o365mail.graph.watch import GraphMailbox
from airflow_provider_o365mail.retry import Backoff

KEY = ("graph", "o365mail", "conn", "")
FAST, PERIOD, SLOW = 3.0, 120.0, 60.0


class Answer:
    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def json(self) -> dict[str, Any]:
        return self.body


class FakeFolder:
    """One Graph folder's delta: ``deliver()`` creates messages; links name how many were seen.

    ``fail_next`` raises on the next request; ``expire()`` makes every delta link answer syncStateNotFound.
    """

    def __init__(self) -> None:
        self.messages = 0
        self.requests: list[tuple[str, dict | None]] = []
        self.fail_next: list[BaseException] = []
        self.generation = 0  # bumped by expire(): older links are refused

    def deliver(self, count: int = 1) -> None:
        self.messages += count

    def expire(self) -> None:
        self.generation += 1

    def request(self, method: str, url: str, *, doing: str, params=None, headers=None, **_: Any) -> Answer:
        self.requests.append((url, params))
        if self.fail_next:
            raise self.fail_next.pop(0)
        if url == "me/mailFolders/inbox":
            return Answer({"id": "inbox-id"})
        if url == "me/mailFolders/inbox-id/messages/delta":
            assert params["changeType"] == "created" and params["$select"] == "id"
            assert params["$filter"].startswith("receivedDateTime ge ")
            return Answer({"value": [{"id": "old"}], "@odata.deltaLink": f"delta:{self.generation}:{self.messages}"})
        _, generation, seen = url.split(":")
        if int(generation) != self.generation:
            raise GraphRequestRefused("expired", status=400, code="syncStateNotFound")
        created = [{"id": f"m{i}"} for i in range(int(seen), self.messages)]
        return Answer({"value": created, "@odata.deltaLink": f"delta:{self.generation}:{self.messages}"})

    def polls(self) -> int:
        return sum(1 for url, _ in self.requests if url.startswith("delta:"))

    def rounds(self) -> int:
        return sum(1 for url, _ in self.requests if url.endswith("/messages/delta"))


class Clock:
    """Monotonic and wall time that move only when the hub sleeps; every sleep is recorded."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0.001)  # real time passes a little: the test's own tasks run


async def direct(func, *args):
    return func(*args)


@pytest.fixture(autouse=True)
def _no_cached_folder_ids():
    graph_folders._CACHE.clear()
    yield
    graph_folders._CACHE.clear()


def hub_for(clock: Clock, **kwargs) -> GraphHub:
    kwargs.setdefault("retry", Backoff(first=5.0, maximum=40.0, jitter=(1.0, 1.0)))
    return GraphHub(
        sleep=clock.sleep,
        clock=clock,
        wall=clock.wall,
        to_thread=direct,
        fast_interval=FAST,
        fast_period=PERIOD,
        **kwargs,
    )


def reader_of(folder: FakeFolder):
    return lambda: GraphMailbox(folder, "me", KEY)


async def until(predicate, what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


def test_one_loop_serves_a_thousand_waiters_and_one_created_message_wakes_every_one():
    async def scenario():
        clock, folder = Clock(), FakeFolder()
        hub = hub_for(clock)
        subs = [hub.subscribe(KEY, "INBOX", reader_of(folder), poll_interval=SLOW) for _ in range(1000)]
        await asyncio.gather(*(s.ready() for s in subs))
        marks = [s.generation for s in subs]
        waits = [asyncio.ensure_future(s.wait(m)) for s, m in zip(subs, marks, strict=True)]
        await until(lambda: folder.polls() >= 3, "a few polls")
        assert not any(w.done() for w in waits), "nothing was created: nobody wakes"
        folder.deliver()
        reasons = await asyncio.gather(*waits)
        assert reasons == ["created"] * 1000
        # Whatever the number of waiters: one round, one folder lookup, one request per poll.
        assert folder.rounds() == 1
        assert sum(1 for url, _ in folder.requests if url == "me/mailFolders/inbox") == 1
        assert len(folder.requests) == 2 + folder.polls()
        assert len(hub.watched()) == 1
        for s in subs:
            s.close()

    run(scenario())


def test_a_change_between_mark_and_wait_is_not_lost():
    async def scenario():
        clock, folder = Clock(), FakeFolder()
        hub = hub_for(clock)
        sub = hub.subscribe(KEY, "INBOX", reader_of(folder))
        await sub.ready()
        mark = sub.generation
        folder.deliver()  # while the waiter's check would run
        await until(lambda: sub.state.created_seen == 1, "the poll that sees it")
        assert await sub.wait(mark) == "created", "returns at once: the generation moved since the mark"
        sub.close()

    run(scenario())


def test_a_waiter_that_marked_before_the_first_round_is_woken_when_it_completes():
    async def scenario():
        clock, folder = Clock(), FakeFolder()
        folder.fail_next.append(MailServerUnavailable("down"))  # the first round fails once
        hub = hub_for(clock)
        sub = hub.subscribe(KEY, "INBOX", reader_of(folder))
        await sub.ready()  # returns after the failure: the check goes ahead on its own
        assert not sub.state.synced
        mark = sub.generation
        # Mail that arrives now is absorbed by the round when it succeeds: the waiter is woken to check.
        folder.deliver()
        assert await sub.wait(mark) == "synced"
        sub.close()

    run(scenario())


def test_waiters_that_mark_after_the_first_round_are_not_woken_by_it():
    async def scenario():
        clock, folder = Clock(), FakeFolder()
        hub = hub_for(clock)
        sub = hub.subscribe(KEY, "INBOX", reader_of(folder))
        await sub.ready()
        mark = sub.generation
        assert mark == 0, "a clean first round moves no generation: no extra check for every waiter"
        waiting = asyncio.ensure_future(sub.wait(mark))
        await until(lambda: folder.polls() >= 3, "polls")
        assert not waiting.done()
        waiting.cancel()
        sub.close()

    run(scenario())


def test_polls_fast_after_a_change_then_back_off_to_the_most_demanding_waiters_interval():
    async def scenario():
        clock, folder = Clock(), FakeFolder()
        hub = hub_for(clock)
        slow = hub.subscribe(KEY, "INBOX", reader_of(folder), poll_interval=600)
        keen = hub.subscribe(KEY, "INBOX", reader_of(folder), poll_interval=SLOW)
        await keen.ready()
        await until(lambda: len(clock.sleeps) >= 8, "idle polls")
        assert clock.sleeps[:6] == [6.0, 12.0, 24.0, 48.0, SLOW, SLOW], "doubling up to the keenest interval"
        folder.deliver()
        start = len(clock.sleeps)
        await until(lambda: keen.state.created_seen == 1, "the change")
        await until(lambda: len(clock.sleeps) >= start + 50, "more polls")
        after = clock.sleeps[start:]
        fast = [s for s in after if s == FAST]
        assert len(fast) >= PERIOD / FAST - 1, "fast polls for the period after the change"
        assert after[len(fast) : len(fast) + 5] == [6.0, 12.0, 24.0, 48.0, SLOW]
        assert max(clock.sleeps) == SLOW, "never slower than the keenest waiter asked"
        keen.close()
        await until(lambda: clock.sleeps[-1] == 600 or len(clock.sleeps) > start + 80, "slower once it left")
        assert clock.sleeps[-1] == 600
        slow.close()

    run(scenario())


def test_transient_failures_back_off_boundedly_and_lose_nothing():
    async def scenario():
        clock, folder = Clock(), FakeFolder()
        hub = hub_for(clock)
        sub = hub.subscribe(KEY, "INBOX", reader_of(folder), poll_interval=SLOW)
        await sub.ready()
        mark = sub.generation
        folder.fail_next.extend(MailServerUnavailable(f"429 {i}") for i in range(6))
        folder.deliver(2)  # arrives while polls fail
        assert await sub.wait(mark) == "created"
        assert sub.state.created_seen == 2, "the same delta link after the failures: both messages seen"
        backoff = [s for s in clock.sleeps if s not in (6.0, 12.0, 24.0, 48.0, SLOW, FAST)]
        assert backoff == [5.0, 10.0, 20.0, 40.0, 40.0, 40.0], "bounded, doubling waits"
        assert folder.rounds() == 1, "no new round: the delta link survived"
        sub.close()

    run(scenario())


def test_an_expired_delta_token_starts_a_new_round_and_wakes_the_waiters():
    async def scenario():
        clock, folder = Clock(), FakeFolder()
        hub = hub_for(clock)
        sub = hub.subscribe(KEY, "INBOX", reader_of(folder))
        await sub.ready()
        mark = sub.generation
        folder.expire()
        folder.deliver()  # what arrived meanwhile is found by the waiters' checks
        assert await sub.wait(mark) == "resync"
        assert folder.rounds() == 2
        assert sub.state.error is None
        mark = sub.generation
        folder.deliver()
        assert await sub.wait(mark) == "created", "polling goes on from the new round"
        sub.close()

    run(scenario())


@pytest.mark.parametrize(
    "error",
    [
        ConsentRevoked("AADSTS65001: consent revoked; run airflow o365mail authorize"),
        GraphRequestRefused("ErrorAccessDenied: Mail.Read missing", status=403, code="ErrorAccessDenied"),
    ],
)
def test_a_permanent_error_reaches_every_waiter_and_stops_the_loop(error):
    async def scenario():
        clock, folder = Clock(), FakeFolder()
        hub = hub_for(clock)
        subs = [hub.subscribe(KEY, "INBOX", reader_of(folder)) for _ in range(3)]
        await subs[0].ready()
        marks = [s.generation for s in subs]
        waits = [asyncio.ensure_future(s.wait(m)) for s, m in zip(subs, marks, strict=True)]
        folder.fail_next.append(error)
        results = await asyncio.gather(*waits, return_exceptions=True)
        assert all(type(r) is type(error) and str(r) == str(error) for r in results)
        assert len({id(r) for r in results}) == 3, "a fresh copy per waiter"
        assert hub.watched() == []
        polls = folder.polls()
        await asyncio.sleep(0.05)
        assert folder.polls() == polls, "no polling after a permanent error"
        for s in subs:
            s.close()
        # The next waiter starts afresh.
        again = hub.subscribe(KEY, "INBOX", reader_of(folder))
        await again.ready()
        assert again.state.error is None
        again.close()

    run(scenario())


def test_a_renamed_folder_is_looked_up_again():
    async def scenario():
        clock, folder = Clock(), FakeFolder()
        hub = hub_for(clock)
        sub = hub.subscribe(KEY, "INBOX", reader_of(folder))
        await sub.ready()
        folder.fail_next.append(GraphRequestRefused("gone", status=404, code="ErrorItemNotFound"))
        await until(lambda: folder.rounds() == 2, "a new round")
        assert sub.state.error is None
        lookups = sum(1 for url, _ in folder.requests if url == "me/mailFolders/inbox")
        assert lookups == 2, "the cached folder id was dropped"
        sub.close()

    run(scenario())


def test_the_generation_moves_at_least_every_max_idle():
    async def scenario():
        clock, folder = Clock(), FakeFolder()
        hub = hub_for(clock)
        sub = hub.subscribe(KEY, "INBOX", reader_of(folder), poll_interval=SLOW, max_idle=300)
        await sub.ready()
        start = sub.state.last_bump  # the first round
        assert await sub.wait(sub.generation) == "renewal"
        assert 300 <= sub.state.last_bump - start <= 300 + SLOW, "within one poll interval past max_idle"
        sub.close()

    run(scenario())


def test_the_loop_lingers_then_stops_and_a_new_waiter_restarts_it():
    async def scenario():
        clock, folder = Clock(), FakeFolder()
        hub = hub_for(clock, linger=0.05)
        sub = hub.subscribe(KEY, "INBOX", reader_of(folder))
        await sub.ready()
        sub.close()
        assert len(hub.watched()) == 1, "lingers"
        again = hub.subscribe(KEY, "INBOX", reader_of(folder))  # a sensor deferring right after
        await asyncio.sleep(0.1)
        assert len(hub.watched()) == 1 and folder.rounds() == 1, "the same loop, no new round"
        again.close()
        await asyncio.sleep(0.1)
        assert hub.watched() == []
        later = hub.subscribe(KEY, "INBOX", reader_of(folder))
        await later.ready()
        assert folder.rounds() == 2
        later.close()

    run(scenario())


def test_a_watch_of_two_folders_wakes_on_either():
    async def scenario():
        clock, inbox, other = Clock(), FakeFolder(), FakeFolder()
        hub = hub_for(clock)
        readers = {"INBOX": reader_of(inbox), "Other": reader_of(other)}
        # One reader factory per watch in production; here each folder has its own fake.
        watch = GraphFolderWatch({f: hub.subscribe(KEY, f, readers[f]) for f in readers})
        await watch.ready()
        mark = watch.mark()
        inbox.deliver()
        assert await watch.wait(mark) == "created"
        watch.close()

    run(scenario())


# ---------------------------------------------------------------------- the pacer
class PacerClock:
    """A shared fake clock for threads: ``sleep`` moves time (the pacer's waits are the only sleeps)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.lock = threading.Lock()
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        with self.lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.sleeps.append(seconds)
            self.now = max(self.now, self.now + seconds)


def test_the_pacer_lets_at_most_limit_requests_start_in_any_window():
    clock = PacerClock()
    pacer = RequestPacer(5, 10.0, clock=clock, sleep=clock.sleep)
    starts = []
    for _ in range(23):
        pacer.wait_turn()
        starts.append(clock())
        clock.now += 0.5  # a request takes half a second
    for i, t in enumerate(starts):
        in_window = [s for s in starts if t - 10.0 < s <= t]
        assert len(in_window) <= 5, f"request {i} at {t}: {len(in_window)} in the window"
    assert starts[5] >= starts[0] + 10.0, "the sixth waits until the first left the window"
    assert pacer.granted == 23
    assert max(clock.sleeps) <= 10.0, "never longer than the window for one turn"


def test_the_pacer_is_shared_by_threads_and_never_over_the_limit():
    clock = PacerClock()
    pacer = RequestPacer(20, 60.0, clock=clock, sleep=clock.sleep)
    starts: list[float] = []
    lock = threading.Lock()

    def worker():
        for _ in range(25):
            pacer.wait_turn()
            with lock:
                starts.append(clock())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(starts) == 100
    starts.sort()
    for t in starts:
        assert sum(1 for s in starts if t - 60.0 < s <= t) <= 20
    assert clock() >= 4 * 60.0, "100 requests at 20 per minute need at least 4 more windows"


def test_a_pacer_without_pressure_never_waits():
    clock = PacerClock()
    pacer = RequestPacer(8000, 600.0, clock=clock, sleep=clock.sleep)
    for _ in range(1000):
        assert pacer.wait_turn() == 0.0
        clock.now += 0.1
    assert clock.sleeps == []
    assert pacer.in_window() == 1000


def test_a_pacer_needs_a_positive_limit_and_window():
    with pytest.raises(ValueError):
        RequestPacer(0)
    with pytest.raises(ValueError):
        RequestPacer(1, 0)
