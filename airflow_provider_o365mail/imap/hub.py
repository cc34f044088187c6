"""One IDLE connection per watched folder, shared by every waiter on that folder in this process.

Exchange Online allows about 20 concurrent IMAP connections per mailbox. A triggerer running many
deferred sensors and event streams (:mod:`.stream`) of one mailbox must not open one IDLE per
waiter, so it keeps one IDLE loop task per (key, folder) — the key names the connection and
mailbox, the hook builds it — and a *generation* per folder that grows on every push, IDLE renewal, poll and reconnect. A waiter
remembers the generation before its check (a sensor's search, a stream's read) and then waits for
"changed since generation g": a change that lands between its check and its wait is never lost.

The loop also remembers the folder's UIDNEXT at each SELECT: a waiter whose check saw a lower
UIDNEXT has missed mail that arrived while the loop was between sessions (after a push IDLE logs
out and in again) and is woken at once, without bumping the generation for everyone.

Nothing here blocks the event loop: the endpoint and the token come from blocking callables that
run in a worker thread. The IDLE task stops ``linger`` seconds after its last waiter left.

A waiter may pass ``slot`` (:data:`..core.budget.SharedSlot`), the mailbox's connection budget
across processes and hosts: each IDLE session then holds one of its slots from before its login
until it ends (taken in a thread; given back in one, so the loop never blocks on the shared store).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from airflow_provider_o365mail import exceptions
from airflow_provider_o365mail.core.budget import HeldSlot, SharedSlot
from airflow_provider_o365mail.core.credentials import ExpiringToken, TokenSource
from airflow_provider_o365mail.exceptions import MailAuthenticationError
from airflow_provider_o365mail.imap.idle import (
    MAX_IDLE_SECONDS,
    PERMANENT_ERRORS,
    RECONNECT,
    IdleUnsupported,
    ImapEndpoint,
    first_completed,
    wait_for_new_mail,
)
from airflow_provider_o365mail.retry import Backoff

log = logging.getLogger(__name__)

#: The IDLE task outlives its last waiter this long: a DAG's next sensor usually defers within seconds.
LINGER_SECONDS = 5.0

#: ``idle(endpoint, folder, token, max_idle, on_selected)``: one IDLE session; :func:`wait_for_new_mail` by default.
IdleSession = Callable[[ImapEndpoint, str, ExpiringToken, float, Callable[[int | None], None]], Awaitable[str]]


async def _idle_session(
    endpoint: ImapEndpoint,
    folder: str,
    token: ExpiringToken,
    max_idle: float,
    on_selected: Callable[[int | None], None],
) -> str:
    return await wait_for_new_mail(endpoint, folder, token, None, max_idle, on_selected=on_selected)


@dataclass
class _Wanted:
    """What one waiter asked for (the loop serves the most demanding of its waiters)."""

    poll_interval: float
    max_idle: float
    endpoint: Callable[[], ImapEndpoint]
    token_source: TokenSource
    slot: SharedSlot | None = None


@dataclass
class FolderState:
    """The shared watch of one folder: its generation, the UIDNEXT at the last SELECT, its waiters."""

    key: Hashable
    folder: str
    generation: int = 0
    reason: str = "start"
    uidnext: int | None = None
    error: BaseException | None = None
    idle_supported: bool | None = None
    sessions: int = 0
    waiters: dict[int, _Wanted] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    linger: asyncio.TimerHandle | None = None

    def notify(self) -> None:
        """Wake every waiter (each decides whether what it waits for happened)."""
        event, self.changed = self.changed, asyncio.Event()
        event.set()

    def bump(self, reason: str) -> None:
        self.generation += 1
        self.reason = reason
        self.notify()

    def latest(self) -> _Wanted:
        # The most recent waiter's factories: a connection edited since the first waiter is picked up.
        return next(reversed(self.waiters.values()))

    def poll_interval(self) -> float:
        return min(w.poll_interval for w in self.waiters.values())

    def max_idle(self) -> float:
        return min(w.max_idle for w in self.waiters.values())


class Subscription:
    """One waiter's handle on a shared folder watch; :meth:`close` it (or use ``with``)."""

    def __init__(self, hub: IdleHub, state: FolderState, waiter_id: int) -> None:
        self._hub = hub
        self.state = state
        self._id = waiter_id
        self.closed = False

    @property
    def generation(self) -> int:
        return self.state.generation

    async def wait(self, generation: int, uidnext: int | None = None) -> str:
        """Until the folder changed since ``generation`` (or after a check that saw ``uidnext``); the reason.

        Raises the loop's error when it stopped for a reason a person must fix (``PERMANENT_ERRORS``).
        """
        state = self.state
        while True:
            if state.error is not None:
                raise exceptions.fresh_copy(state.error)
            if state.generation > generation:
                return state.reason
            if uidnext is not None and state.uidnext is not None and state.uidnext > uidnext:
                return "changed"
            await state.changed.wait()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._hub._leave(self.state, self._id)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class IdleHub:
    """The folder watches of one event loop (get it with :func:`idle_hub`).

    :param idle: one IDLE session (tests pass a fake); it must raise on a dead connection.
    :param sleep: waits between reconnects and polls.
    :param retry: delays between reconnects after transient failures (never gives up).
    :param linger: seconds an unused IDLE task keeps running.
    """

    def __init__(
        self,
        *,
        idle: IdleSession = _idle_session,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        retry: Backoff = RECONNECT,
        linger: float = LINGER_SECONDS,
    ) -> None:
        self._idle = idle
        self._sleep = sleep
        self._retry = retry
        self._linger = linger
        self._folders: dict[tuple[Hashable, str], FolderState] = {}
        self._ids = itertools.count(1)

    # ------------------------------------------------------------------ waiters
    def subscribe(
        self,
        key: Hashable,
        folder: str,
        endpoint: Callable[[], ImapEndpoint],
        token_source: TokenSource,
        *,
        poll_interval: float = 60.0,
        max_idle: float = MAX_IDLE_SECONDS,
        slot: SharedSlot | None = None,
    ) -> Subscription:
        """Join (or start) the watch of ``folder`` for ``key``; no I/O here.

        :param endpoint: blocking; returns where to log in (called in a thread by the loop).
        :param token_source: blocking; called in a thread before each IDLE session.
        :param slot: blocking; a slot of the mailbox's shared budget, held by each IDLE session.
        """
        state = self._folders.get((key, folder))
        if state is None:
            state = self._folders[(key, folder)] = FolderState(key, folder)
        if state.linger is not None:
            state.linger.cancel()
            state.linger = None
        waiter_id = next(self._ids)
        state.waiters[waiter_id] = _Wanted(poll_interval, min(max_idle, MAX_IDLE_SECONDS), endpoint, token_source, slot)
        if state.task is None or state.task.done():  # a loop that ran out of waiters ends by itself
            state.task = asyncio.get_running_loop().create_task(self._run(state), name=f"o365mail-idle {folder}")
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
        log.error("Watching %s stopped: %s", state.folder, err)
        state.error = err
        state.notify()
        if self._folders.get((state.key, state.folder)) is state:
            del self._folders[(state.key, state.folder)]  # the next waiter starts afresh

    def watched(self) -> list[FolderState]:
        """The folder watches with a running IDLE task (for tests and the benchmark)."""
        return [s for s in self._folders.values() if s.task is not None and not s.task.done()]

    # ------------------------------------------------------------------ the loop
    async def _run(self, state: FolderState) -> None:
        failures = 0
        refresh_token = False  # after a refused login: once more with a refreshed token (as for IMAP and SMTP)
        while state.waiters:
            wanted = state.latest()
            try:
                if state.idle_supported is False:
                    await self._sleep(state.poll_interval())
                    state.bump("poll")
                    continue
                endpoint, token = await asyncio.to_thread(_resolve, wanted, refresh_token)
                held = await _take_slot(wanted.slot)
                reconnecting = failures > 0

                def selected(uidnext: int | None, reconnecting: bool = reconnecting) -> None:
                    nonlocal failures
                    state.sessions += 1
                    failures = 0
                    if uidnext is not None and uidnext != state.uidnext:
                        state.uidnext = uidnext
                        state.notify()
                    if reconnecting:  # pushes may have been missed while the connection was down
                        state.bump("reconnect")

                try:
                    reason = await self._idle(endpoint, state.folder, token, state.max_idle(), selected)
                finally:
                    _give_back(held)
                refresh_token = False
                state.idle_supported = True
                state.bump(reason)
            except asyncio.CancelledError:
                raise
            except IdleUnsupported as err:
                log.info("%s offers no IDLE: polling %s every %.0f s.", err, state.folder, state.poll_interval())
                state.idle_supported = False
                state.bump("poll")
            except MailAuthenticationError as err:
                if refresh_token:  # refused with a refreshed token too: a person must fix it
                    self._stop(state, err)
                    return
                log.info(
                    "IMAP refused the IDLE login for %s (%s); once more with a refreshed token.", state.folder, err
                )
                refresh_token = True
            except PERMANENT_ERRORS as err:
                self._stop(state, err)
                return
            except Exception as err:  # dropped, reset, timed out, 5xx: reconnect
                failures += 1
                delay = self._retry.delay(failures)
                log.warning(
                    "IDLE on %s failed (%s: %s); reconnecting in %.0f s (attempt %d), for %d waiter(s).",
                    state.folder,
                    type(err).__name__,
                    err,
                    delay,
                    failures,
                    len(state.waiters),
                )
                await self._sleep(delay)


async def _take_slot(slot: SharedSlot | None) -> HeldSlot | None:
    """A shared slot, taken in a thread; a slot that arrives after the waiting task was cancelled is given back."""
    if slot is None:
        return None
    lock = threading.Lock()
    abandoned = False
    handed: list[HeldSlot] = []

    def take() -> HeldSlot | None:
        held = slot()
        with lock:
            if abandoned:
                _give_back(held)
                return None
            handed.append(held)
        return held

    try:
        return await asyncio.to_thread(take)
    except asyncio.CancelledError:
        with lock:
            abandoned = True
            for held in handed:
                _give_back(held)
        raise


def _give_back(held: HeldSlot | None) -> None:
    """Release in a thread of its own: a release writes to the shared store, the loop must not wait for it."""
    if held is not None:
        threading.Thread(target=held.release, name="o365mail-slot-release", daemon=True).start()


def _resolve(wanted: _Wanted, refresh_token: bool = False) -> tuple[ImapEndpoint, ExpiringToken]:
    token = wanted.token_source(force_refresh=True) if refresh_token else wanted.token_source()
    return wanted.endpoint(), token


_HUBS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, IdleHub] = weakref.WeakKeyDictionary()


def idle_hub() -> IdleHub:
    """The hub of the running event loop (the triggerer runs all triggers on one loop)."""
    loop = asyncio.get_running_loop()
    hub = _HUBS.get(loop)
    if hub is None:
        hub = _HUBS[loop] = IdleHub()
    return hub


class FolderWatch:
    """A waiter's subscriptions to several folders: ``mark()`` before a check, ``wait(mark, uidnext)`` after."""

    def __init__(self, subscriptions: Mapping[str, Subscription]) -> None:
        self.subscriptions = dict(subscriptions)

    @classmethod
    def join(
        cls,
        hub: IdleHub,
        key: Hashable,
        folders: Sequence[str],
        endpoint: Callable[[], ImapEndpoint],
        token_source: TokenSource,
        *,
        poll_interval: float = 60.0,
        max_idle: float = MAX_IDLE_SECONDS,
        slot: SharedSlot | None = None,
    ) -> FolderWatch:
        subs = {
            f: hub.subscribe(key, f, endpoint, token_source, poll_interval=poll_interval, max_idle=max_idle, slot=slot)
            for f in dict.fromkeys(folders)
        }
        return cls(subs)

    def mark(self) -> dict[str, int]:
        return {folder: sub.generation for folder, sub in self.subscriptions.items()}

    async def wait(self, mark: Mapping[str, int], uidnext: Mapping[str, int | None] | None = None) -> str:
        """Until one folder changed since ``mark``; returns why (``"push"``, ``"changed"``, ``"timeout"``...)."""
        uidnext = uidnext or {}
        if len(self.subscriptions) == 1:  # the common case: no extra tasks
            ((folder, sub),) = self.subscriptions.items()
            return await sub.wait(mark.get(folder, 0), uidnext.get(folder))
        waits = [sub.wait(mark.get(folder, 0), uidnext.get(folder)) for folder, sub in self.subscriptions.items()]
        return (await first_completed(waits)).result()

    def close(self) -> None:
        for sub in self.subscriptions.values():
            sub.close()

    def __enter__(self) -> FolderWatch:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
