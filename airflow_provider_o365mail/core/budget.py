"""A per-process budget of concurrent sessions per mailbox (SMTP: Exchange allows 3 per mailbox).

Exchange Online answers a fourth concurrent SMTP AUTH session of a mailbox with ``432 4.3.2
Concurrent connections limit exceeded.``; the sender retries that, but tasks of one process that
each open a session would mostly be retrying each other. A budget makes them queue instead: a
session holds a slot from its login until it is closed. Across processes use an Airflow pool
(docs/sending.md); the 432 retry stays for what no budget sees (other clients of the mailbox).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Hashable, Iterator

from airflow_provider_o365mail.exceptions import MailServerUnavailable

ACQUIRE_TIMEOUT_SECONDS = 300.0


class SessionBudget:
    """At most ``limit`` sessions at once (thread-safe); :meth:`slot` holds one."""

    def __init__(self, limit: int, *, what: str, option: str, acquire_timeout: float = ACQUIRE_TIMEOUT_SECONDS) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, not {limit}")
        self.limit = limit
        self.what = what
        self.option = option
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
                f"retried. Send fewer batches at once, or raise [o365mail] {self.option} if the mailbox allows more."
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


_BUDGETS: dict[Hashable, SessionBudget] = {}
_LOCK = threading.Lock()


def session_budget(key: Hashable, limit: int, *, what: str, option: str) -> SessionBudget:
    """The process-wide budget of ``key`` (kind, connection, mailbox); a changed ``limit`` starts a new one."""
    with _LOCK:
        budget = _BUDGETS.get(key)
        if budget is None or budget.limit != limit:
            budget = _BUDGETS[key] = SessionBudget(limit, what=what, option=option)
        return budget


def _after_fork_in_child() -> None:
    # A forked task process starts with no session open, whatever the parent's threads held.
    global _LOCK
    _LOCK = threading.Lock()
    _BUDGETS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
