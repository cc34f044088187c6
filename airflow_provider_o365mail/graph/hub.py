"""One delta-poll loop per watched folder over Microsoft Graph, shared by every waiter in this process.

The Graph twin of :mod:`..imap.hub`. Outlook allows each app 4 concurrent requests and 10,000
requests per 10 minutes per mailbox; a triggerer running many deferred Graph sensors of one mailbox
must not poll once per sensor. It keeps one loop task per (key, folder) (the key names the
connection and mailbox, the hook builds it) and a *generation* per folder that grows when the loop
sees created messages. A waiter notes the generation before its check and then waits for "changed
since generation g": a change between its check and its wait is never lost.

The loop keeps its own delta link in memory (``changeType=created``, ``$select=id``: one cheap
request per poll when nothing happened):

- its first round starts :data:`BASELINE_MARGIN` before now (delta cannot start "from now");
  waiters are told to wait until that round is done (:meth:`Subscription.ready`), so their first
  check comes after it and what the round absorbed is seen by that check;
- it polls every :data:`FAST_INTERVAL` seconds for :data:`FAST_PERIOD` after a change (a burst
  usually brings more), then backs off, doubling, to the most demanding waiter's ``poll_interval``;
- every ``max_idle`` seconds (the most demanding waiter's) it bumps the generation anyway ("renewal",
  as IDLE is re-issued over IMAP): a message moved into the folder with an older
  ``receivedDateTime`` than the round's start is not in the round, and is found then;
- an expired delta token starts a new round, and the generation moves ("resync": what arrived
  between the last poll and the new round is found by the waiters' checks);
- transient failures (network, 429/5xx past the client's own retries) wait :data:`POLL_RETRY` and
  poll again with the same delta link (nothing is lost); permanent ones (:data:`PERMANENT_ERRORS`:
  revoked consent, a refused request) end the loop and reach every waiter.

Nothing here blocks the event loop: the Graph reader comes from a blocking factory and every
request runs in a worker thread. The loop task stops ``linger`` seconds after its last waiter left.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from airflow_provider_o365mail import exceptions
from airflow_provider_o365mail.graph import folders as graph_folders
from airflow_provider_o365mail.graph.query import odata_datetime
from airflow_provider_o365mail.graph.watch import GraphMailbox, is_expired, read_round
from airflow_provider_o365mail.retry import Backoff

log = logging.getLogger(__name__)

#: The loop outlives its last waiter this long: a DAG's next sensor usually defers within seconds.
LINGER_SECONDS = 5.0
#: After created messages: poll this often (seconds) ...
FAST_INTERVAL = 3.0
#: ... for this long, then back off (doubling) to the waiters' ``poll_interval``.
FAST_PERIOD = 120.0
#: The loop's first round starts this long before now (server stamps and clocks differ).
BASELINE_MARGIN = 600.0
#: Bump the generation at least this often (seconds) when no waiter asks for less (IMAP's IDLE renewal).
MAX_RENEWAL_SECONDS = 25 * 60.0
#: Waits between polls after transient failures (never gives up; the client already retried each request).
POLL_RETRY = Backoff(first=5.0, maximum=300.0, jitter=(0.5, 1.0))
#: Errors a person must fix: polling again cannot help.
PERMANENT_ERRORS = (
    exceptions.AuthorizationError,
    exceptions.ConnectionConfigError,
    exceptions.MailAuthenticationError,
    exceptions.TokenStoreError,
    exceptions.ProxyRefused,
    exceptions.GraphRequestRefused,
)
#: Created messages, ids only: the loop only needs to know that something arrived.
POLL_SELECT = "id"

#: ``reader_factory()``: blocking; a Graph reader of the mailbox (:class:`.watch.GraphMailbox`).
ReaderFactory = Callable[[], GraphMailbox]


@dataclass
class _Wanted:
    """What one waiter asked for (the loop serves the most demanding of its waiters)."""

    poll_interval: float
    max_idle: float
    reader: ReaderFactory


@dataclass
class FolderState:
    """The shared watch of one folder: its generation, the loop's delta link, its waiters."""

    key: Hashable
    folder: str
    generation: int = 0
    reason: str = "start"
    delta_link: str | None = None
    #: A round has completed (waiters may check: whatever arrives later shows in a poll).
    synced: bool = False
    #: A waiter noted the generation before the first round completed: bump when it does.
    marked_unsynced: bool = False
    failures: int = 0
    error: BaseException | None = None
    polls: int = 0
    created_seen: int = 0
    #: Monotonic time until which the loop polls fast; the current slow interval.
    fast_until: float = 0.0
    interval: float = FAST_INTERVAL
    last_bump: float = 0.0
    waiters: dict[int, _Wanted] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    linger: asyncio.TimerHandle | None = None

    def notify(self) -> None:
        """Wake every waiter (each decides whether what it waits for happened)."""
        event, self.changed = self.changed, asyncio.Event()
        event.set()

    def bump(self, reason: str, now: float) -> None:
        self.generation += 1
        self.reason = reason
        self.last_bump = now
        self.notify()

    def latest(self) -> _Wanted:
        # The most recent waiter's factory: a connection edited since the first waiter is picked up.
        return next(reversed(self.waiters.values()))

    def poll_interval(self) -> float:
        return min(w.poll_interval for w in self.waiters.values())

    def max_idle(self) -> float:
        return min(w.max_idle for w in self.waiters.values())


class Subscription:
    """One waiter's handle on a shared folder watch; :meth:`close` it (or use ``with``)."""

    def __init__(self, hub: GraphHub, state: FolderState, waiter_id: int) -> None:
        self._hub = hub
        self.state = state
        self._id = waiter_id
        self.closed = False

    @property
    def generation(self) -> int:
        state = self.state
        if not state.synced:
            state.marked_unsynced = True
        return state.generation

    async def ready(self) -> None:
        """Until the loop's first round is done (or it failed once: then checks go ahead, and the round's
        end wakes them again). Raises the loop's permanent error."""
        state = self.state
        while True:
            if state.error is not None:
                raise exceptions.fresh_copy(state.error)
            if state.synced or state.failures:
                return
            await state.changed.wait()

    async def wait(self, generation: int) -> str:
        """Until the folder changed since ``generation``; the reason. Raises the loop's permanent error."""
        state = self.state
        while True:
            if state.error is not None:
                raise exceptions.fresh_copy(state.error)
            if state.generation > generation:
                return state.reason
            await state.changed.wait()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._hub._leave(self.state, self._id)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class GraphHub:
    """The Graph folder watches of one event loop (get it with :func:`graph_hub`).

    :param sleep: waits between polls and after failures; ``clock``: monotonic seconds; ``wall``: epoch
        seconds (the first round's ``receivedDateTime`` bound).
    :param to_thread: runs the blocking Graph calls (``asyncio.to_thread``).
    :param retry: waits between polls after transient failures (never gives up).
    :param linger: seconds an unused loop keeps running.
    """

    def __init__(
        self,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        to_thread: Callable[..., Awaitable[Any]] = asyncio.to_thread,
        retry: Backoff = POLL_RETRY,
        linger: float = LINGER_SECONDS,
        fast_interval: float = FAST_INTERVAL,
        fast_period: float = FAST_PERIOD,
    ) -> None:
        self._sleep = sleep
        self._clock = clock
        self._wall = wall
        self._to_thread = to_thread
        self._retry = retry
        self._linger = linger
        self.fast_interval = fast_interval
        self.fast_period = fast_period
        self._folders: dict[tuple[Hashable, str], FolderState] = {}
        self._ids = itertools.count(1)

    # ------------------------------------------------------------------ waiters
    def subscribe(
        self,
        key: Hashable,
        folder: str,
        reader: ReaderFactory,
        *,
        poll_interval: float = 60.0,
        max_idle: float = MAX_RENEWAL_SECONDS,
    ) -> Subscription:
        """Join (or start) the watch of ``folder`` for ``key``; no I/O here.

        :param reader: blocking; a Graph reader of the mailbox (called in a thread by the loop).
        :param poll_interval: the longest this waiter accepts between polls when nothing happens.
        :param max_idle: the generation moves at least this often (a safety check).
        """
        state = self._folders.get((key, folder))
        if state is None:
            state = self._folders[(key, folder)] = FolderState(key, folder)
        if state.linger is not None:
            state.linger.cancel()
            state.linger = None
        waiter_id = next(self._ids)
        state.waiters[waiter_id] = _Wanted(
            max(float(poll_interval), self.fast_interval), min(float(max_idle), MAX_RENEWAL_SECONDS), reader
        )
        if state.task is None or state.task.done():  # a loop that ran out of waiters ends by itself
            state.task = asyncio.get_running_loop().create_task(self._run(state), name=f"o365mail-graph {folder}")
        return Subscription(self, state, waiter_id)

    def _leave(self, state: FolderState, waiter_id: int) -> None:
        state.waiters.pop(waiter_id, None)
        if state.waiters or state.task is None or state.task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # closed from a finalizer after the loop stopped: nothing to linger for
            self._stop_if_unused(state)
            return
        state.linger = loop.call_later(self._linger, self._stop_if_unused, state)

    def _stop_if_unused(self, state: FolderState) -> None:
        state.linger = None
        if state.waiters:
            return
        if state.task is not None:
            state.task.cancel()
        if self._folders.get((state.key, state.folder)) is state:
            del self._folders[(state.key, state.folder)]

    def _stop(self, state: FolderState, err: BaseException) -> None:
        """End the loop for a reason a person must fix: every waiter gets the error."""
        log.error("Watching %s over Microsoft Graph stopped: %s", state.folder, err)
        state.error = err
        state.notify()
        if self._folders.get((state.key, state.folder)) is state:
            del self._folders[(state.key, state.folder)]  # the next waiter starts afresh

    def watched(self) -> list[FolderState]:
        """The folder watches with a running loop (for tests and the benchmark)."""
        return [s for s in self._folders.values() if s.task is not None and not s.task.done()]

    # ------------------------------------------------------------------ the loop
    def next_wait(self, state: FolderState) -> float:
        """Seconds until the next poll: fast after a change, then doubling up to the waiters' interval."""
        slowest = max(state.poll_interval(), self.fast_interval)
        if self._clock() < state.fast_until:
            state.interval = self.fast_interval
        else:
            state.interval = min(slowest, max(self.fast_interval, state.interval * 2))
        return state.interval

    async def _run(self, state: FolderState) -> None:
        reader: GraphMailbox | None = None
        try:
            while state.waiters:
                wanted = state.latest()
                try:
                    if reader is None:
                        reader = await self._to_thread(wanted.reader)
                    if state.delta_link is None:
                        resync = state.synced
                        state.delta_link = await self._to_thread(_start_round, reader, state.folder, self._wall())
                        state.polls += 1
                        state.synced = True
                        state.last_bump = self._clock()
                        if resync or state.marked_unsynced or state.failures:
                            state.bump("resync" if resync else "synced", self._clock())
                        else:
                            state.notify()  # ready() returns
                        state.marked_unsynced = False
                    else:
                        created, state.delta_link = await self._to_thread(_poll, reader, state.delta_link)
                        state.polls += 1
                        if created:
                            state.created_seen += created
                            state.fast_until = self._clock() + self.fast_period
                            state.interval = self.fast_interval
                            state.bump("created", self._clock())
                        elif self._clock() - state.last_bump >= state.max_idle():
                            state.bump("renewal", self._clock())
                    state.failures = 0
                except asyncio.CancelledError:
                    raise
                except exceptions.GraphRequestRefused as err:
                    if is_expired(err):
                        log.info(
                            "The delta token of %s expired (%s); starting a new round.",
                            state.folder,
                            err.code or err.status,
                        )
                        state.delta_link = None
                        continue
                    if err.code != "ErrorItemNotFound" and err.status != 404:
                        self._stop(state, err)
                        return
                    # The folder was renamed, moved or deleted: resolve its name again in a new round, later.
                    # (A folder that no longer exists is reported by the waiters' own checks.)
                    if reader is not None:
                        graph_folders.forget(reader.key, state.folder)
                    state.delta_link = None
                    state.failures += 1
                    state.notify()
                    delay = self._retry.delay(state.failures)
                    log.warning("%s: %s; looking the folder up again in %.0f s.", state.folder, err, delay)
                    await self._sleep(delay)
                    continue
                except PERMANENT_ERRORS as err:
                    self._stop(state, err)
                    return
                except Exception as err:  # network, throttled past the client's retries, 5xx: poll again later
                    state.failures += 1
                    state.notify()  # ready() stops waiting: checks fail or succeed on their own
                    delay = self._retry.delay(state.failures)
                    log.warning(
                        "Polling %s over Microsoft Graph failed (%s: %s); again in %.0f s (attempt %d), for %d "
                        "waiter(s).",
                        state.folder,
                        type(err).__name__,
                        err,
                        delay,
                        state.failures,
                        len(state.waiters),
                    )
                    if reader is not None:
                        _close(reader)
                        reader = None  # a fresh session (and the connection as edited meanwhile)
                    await self._sleep(delay)
                    continue
                await self._sleep(self.next_wait(state))
        finally:
            if reader is not None:
                _close(reader)


def _start_round(reader: GraphMailbox, folder: str, now: float) -> str:
    """A new delta round from :data:`BASELINE_MARGIN` ago; its delta link (what it listed is not news)."""
    folder_id = graph_folders.resolve(reader.client, reader.who, folder, key=reader.key)
    since = dt.datetime.fromtimestamp(now - BASELINE_MARGIN, dt.UTC)
    params = {
        "changeType": "created",
        "$select": POLL_SELECT,
        "$filter": f"receivedDateTime ge {odata_datetime(since)}",
    }
    _found, link = read_round(reader, f"{reader.who}/mailFolders/{folder_id}/messages/delta", params)
    return link


def _poll(reader: GraphMailbox, delta_link: str) -> tuple[int, str]:
    """How many messages were created since ``delta_link``, and the next link."""
    found, link = read_round(reader, delta_link, None)
    return len(found), link


def _close(reader: GraphMailbox) -> None:
    close = getattr(reader.client, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # closing a broken session must not hide why it broke
            log.debug("Closing the Graph session failed.", exc_info=True)


_HUBS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, GraphHub] = weakref.WeakKeyDictionary()


def graph_hub() -> GraphHub:
    """The hub of the running event loop (the triggerer runs all triggers on one loop)."""
    loop = asyncio.get_running_loop()
    hub = _HUBS.get(loop)
    if hub is None:
        hub = _HUBS[loop] = GraphHub()
    return hub


class GraphFolderWatch:
    """A waiter's subscriptions to several folders: ``await ready()``, ``mark()`` before a check,
    ``wait(mark)`` after (the same shape as :class:`..imap.hub.FolderWatch`)."""

    def __init__(self, subscriptions: Mapping[str, Subscription]) -> None:
        self.subscriptions = dict(subscriptions)

    @classmethod
    def join(
        cls,
        hub: GraphHub,
        key: Hashable,
        folders: Sequence[str],
        reader: ReaderFactory,
        *,
        poll_interval: float = 60.0,
        max_idle: float = MAX_RENEWAL_SECONDS,
    ) -> GraphFolderWatch:
        subs = {
            f: hub.subscribe(key, f, reader, poll_interval=poll_interval, max_idle=max_idle)
            for f in dict.fromkeys(folders)
        }
        return cls(subs)

    async def ready(self) -> None:
        for sub in self.subscriptions.values():
            await sub.ready()

    def mark(self) -> dict[str, int]:
        return {folder: sub.generation for folder, sub in self.subscriptions.items()}

    async def wait(self, mark: Mapping[str, int], _uidnext: Mapping[str, int | None] | None = None) -> str:
        """Until one folder changed since ``mark``; returns why (``"created"``, ``"renewal"``, ``"resync"``...)."""
        if len(self.subscriptions) == 1:  # the common case: no extra tasks
            ((folder, sub),) = self.subscriptions.items()
            return await sub.wait(mark.get(folder, 0))
        tasks = [asyncio.ensure_future(sub.wait(mark.get(f, 0))) for f, sub in self.subscriptions.items()]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            return next(iter(done)).result()
        finally:
            for task in tasks:
                task.cancel()

    def close(self) -> None:
        for sub in self.subscriptions.values():
            sub.close()

    def __enter__(self) -> GraphFolderWatch:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


__all__ = [
    "FAST_INTERVAL",
    "FAST_PERIOD",
    "PERMANENT_ERRORS",
    "GraphFolderWatch",
    "GraphHub",
    "Subscription",
    "graph_hub",
]
