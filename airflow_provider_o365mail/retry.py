"""The one retry policy: bounded, jittered exponential backoff (no I/O, no sleeping of its own).

Every loop that retries a transient failure (token requests, SMTP replies, IMAP reconnects, the
event stream) takes a :class:`Backoff` with its own bounds and asks it how long to wait, so the
jitter and the caps are the same everywhere and tests can inject a clock and a sleep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Wait ``first * 2**(failures-1)`` seconds, capped at ``maximum``, times a random factor in ``jitter``.

    :param first: the wait after the first failure, before jitter.
    :param maximum: no computed wait is longer than this.
    :param max_retry_after: a server's ``Retry-After`` is honoured up to this (default ``maximum``): the one
        place that caps it, for every transport.
    :param attempts: how many tries in all before giving up (``None``: the caller never gives up).
    :param jitter: the wait is multiplied by a uniform random factor in this range, so that many
        clients that failed together do not come back together.
    """

    first: float = 1.0
    maximum: float = 60.0
    attempts: int | None = None
    jitter: tuple[float, float] = (0.5, 1.0)
    max_retry_after: float | None = None

    def __post_init__(self) -> None:
        if self.first < 0 or self.maximum < 0 or (self.max_retry_after is not None and self.max_retry_after < 0):
            raise ValueError("backoff waits must be >= 0")
        if self.attempts is not None and self.attempts < 1:
            raise ValueError("attempts must be >= 1")
        low, high = self.jitter
        if not 0 <= low <= high:
            raise ValueError("jitter must be (low, high) with 0 <= low <= high")

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the ``failures``-th consecutive failure (1-based).

        A server's ``retry_after`` is honoured as it is (no jitter: the server chose the moment),
        up to ``max_retry_after`` (or ``maximum``).
        """
        if retry_after is not None and retry_after >= 0:
            return min(self.maximum if self.max_retry_after is None else self.max_retry_after, retry_after)
        base = min(self.maximum, self.first * 2 ** max(0, failures - 1))
        return base * random.uniform(*self.jitter)  # noqa: S311 - jitter, not cryptography

    def gives_up_after(self, attempt: int) -> bool:
        """True when ``attempt`` (1-based) was the last one allowed."""
        return self.attempts is not None and attempt >= self.attempts
