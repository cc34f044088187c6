"""Blocking IMAP checks from async code: at most the budget at once, identical ones run once.

A triggerer wakes every waiter of a folder on one push. Each wants a check, and a check is
blocking (IMAPClient) so it runs in a worker thread. Letting all of them into ``asyncio.to_thread``
would fill the loop's default executor with checks that then wait for a pool connection, and
token refreshes or Variable reads queued behind them would wait too. The gate admits at most
``limit`` checks of a mailbox to the executor (an asyncio semaphore, FIFO) and lets the others wait
on the loop.

Checks with the same key (spec and watermark) that are waiting for the gate at the same time run
once and share the result. A check that has already *started* is never joined: it may have read
the folder before the change its new caller was woken for.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


class CheckGate:
    """Runs blocking checks in threads, ``limit`` at once, coalescing queued identical ones."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, not {limit}")
        self.limit = limit
        self._slots = asyncio.Semaphore(limit)
        self._queued: dict[Hashable, asyncio.Task[Any]] = {}
        # Counters (tests and the benchmark).
        self.requested = 0
        self.ran = 0
        self.running = 0
        self.max_running = 0

    async def run(self, key: Hashable, check: Callable[[], T]) -> T:
        """``check()``'s result; it runs in a thread, or another caller's identical queued run is shared."""
        self.requested += 1
        task = self._queued.get(key)
        if task is None:
            task = asyncio.ensure_future(self._run(key, check))
            task.add_done_callback(_retrieve)
            self._queued[key] = task
        # shield: a caller that is cancelled does not cancel the run others share.
        return await asyncio.shield(task)

    async def _run(self, key: Hashable, check: Callable[[], T]) -> T:
        try:
            await self._slots.acquire()
        finally:
            if self._queued.get(key) is asyncio.current_task():
                del self._queued[key]  # from here on a new caller gets a run of its own
        try:
            self.ran += 1
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            return await asyncio.to_thread(check)
        finally:
            self.running -= 1
            self._slots.release()


def _retrieve(task: asyncio.Task[Any]) -> None:
    # Every caller may have been cancelled: read the exception so asyncio does not log it as lost.
    if not task.cancelled():
        task.exception()


_GATES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Hashable, CheckGate]] = weakref.WeakKeyDictionary()


def check_gate(key: Hashable, limit: int) -> CheckGate:
    """The gate of ``key`` (connection and mailbox) on the running loop."""
    gates = _GATES.setdefault(asyncio.get_running_loop(), {})
    gate = gates.get(key)
    if gate is None or gate.limit != limit:
        gate = gates[key] = CheckGate(limit)
    return gate
