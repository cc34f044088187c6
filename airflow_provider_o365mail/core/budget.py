"""The one connection-budget type: at most N concurrent connections of a kind to a mailbox, per process.

Exchange Online caps connections per mailbox (about 20 IMAP, 3 SMTP AUTH sessions; it answers the
next SMTP session with ``432 4.3.2 Concurrent connections limit exceeded.``). Tasks or triggers of
one process that each open a connection would mostly be retrying each other; a budget makes them
queue instead: a connection holds a slot from its login until it is closed. The SMTP sender and the
IMAP pool (``imap.pool``) both hold their connections in one.

That budget is the first level, per process. The second level is shared by every process and host
(:data:`SharedSlot`: one slot of a mailbox's budget, held until released; the hook builds it from
Airflow Variables, ``hooks/shared_budget.py``): a connection holds a slot of each, the process's
first, so one process never queues on the shared store for more than its own budget. The servers'
own refusals stay retried for what no budget sees.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Hashable, Iterator
from typing import Protocol

from airflow_provider_o365mail.exceptions import MailServerUnavailable

ACQUIRE_TIMEOUT_SECONDS = 300.0


class ConnectionBudget:
    """At most ``limit`` connections at once (thread-safe); :meth:`slot` holds one.

    :param what: the connections, as a user reads them (``"SMTP sessions of conn/mailbox"``).
    :param option: the ``[o365mail]`` option that sets ``limit``.
    :param advice: what to do when a slot stays busy (names ``option``); a default one otherwise.
    """

    def __init__(
        self,
        limit: int,
        *,
        what: str,
        option: str,
        advice: str = "",
        acquire_timeout: float = ACQUIRE_TIMEOUT_SECONDS,
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, not {limit}")
        self.limit = limit
        self.what = what
        self.option = option
        self.advice = advice or f"Run fewer at once, or raise [o365mail] {option} if the mailbox allows more."
        self.acquire_timeout = acquire_timeout
        self._slots = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self.in_use = 0
        self.max_in_use = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if not self._slots.acquire(timeout=self.acquire_timeout):
            raise MailServerUnavailable(
                f"All {self.limit} {self.what} of this process were busy for {self.acquire_timeout:.0f} s; this is "
                f"retried. {self.advice}"
            )
        with self._lock:
            self.in_use += 1
            self.max_in_use = max(self.max_in_use, self.in_use)
        try:
            yield
        finally:
            with self._lock:
                self.in_use -= 1
            self._slots.release()


class HeldSlot(Protocol):
    """One slot of a budget shared across processes; :meth:`release` gives it back (idempotent)."""

    def release(self) -> None: ...


#: Blocking: one slot of the mailbox's shared budget, held until released; raises
#: :class:`MailServerUnavailable` when none came free in time (retried like a refused login).
SharedSlot = Callable[[], HeldSlot]


@contextlib.contextmanager
def two_level_slot(budget: ConnectionBudget, shared: SharedSlot | None) -> Iterator[None]:
    """A slot of this process's ``budget``, then one of the ``shared`` budget (if any); both held inside."""
    with budget.slot():
        if shared is None:
            yield
            return
        held = shared()
        try:
            yield
        finally:
            held.release()


_BUDGETS: dict[Hashable, ConnectionBudget] = {}
_LOCK = threading.Lock()


def connection_budget(key: Hashable, limit: int, *, what: str, option: str, advice: str = "") -> ConnectionBudget:
    """The process-wide budget of ``key`` (kind, connection, mailbox); a changed ``limit`` starts a new one."""
    with _LOCK:
        budget = _BUDGETS.get(key)
        if budget is None or budget.limit != limit:
            budget = _BUDGETS[key] = ConnectionBudget(limit, what=what, option=option, advice=advice)
        return budget


def _after_fork_in_child() -> None:
    # A forked task process starts with no session open, whatever the parent's threads held.
    global _LOCK
    _LOCK = threading.Lock()
    _BUDGETS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
