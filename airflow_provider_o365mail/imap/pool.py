"""A per-mailbox budget of logged-in IMAP connections, reused across checks in one process.

Exchange Online allows about 20 concurrent IMAP connections per mailbox; logging in for every
check also costs a TLS handshake and an AUTHENTICATE. A pool hands out at most ``max_connections``
sessions at once (its :class:`..core.budget.ConnectionBudget`: idle + leased never exceeds it, as a
new connection is opened only when no idle one is left), keeps returned ones for ``idle_ttl`` seconds, and

- logs in again when a session's token has less than ``token_margin`` seconds left (Exchange ends
  such sessions with ``BYE ... AccessTokenExpired``),
- sends ``NOOP`` to a session idle longer than ``probe_after`` before handing it out (a server or a
  middlebox may have closed it meanwhile, or stopped answering); the answer must come within
  ``probe_answer`` seconds (10 s, at most the connection's timeout), else the session is dropped
  without LOGOUT and a new one logged in, and
- drops a session whose lease ended in an error (its state is unknown): a broken connection (a
  socket error or timeout) at once, any other after a LOGOUT answered within 5 s.

A session whose peer went silent therefore never holds a check longer than one probe answer
(``probe_answer``) or, when it was used within ``probe_after`` seconds, one command's timeout (the
connection's ``timeout``; a silent drop much sooner: TCP keepalive and TCP_USER_TIMEOUT end such a
connection within 14 s of silence, see :mod:`.liveness`).

``login`` comes with each lease (``imap/`` never sees the hook): it returns a logged-in client and
the token it used (an object with ``expires_on``).

``shared_slot`` (optional, :data:`..core.budget.SharedSlot`) is the mailbox's budget across processes
and hosts: every session holds one of its slots from before its login until it is closed or dropped,
idle sessions included (the server counts them too); the pool's own budget is the first level.
An idle session then gives its slot back after ``shared_idle_ttl`` (5 s), not ``idle_ttl``: other
processes may be waiting for it (measured on the distributed deployment: with 60 s, the triggerers'
idle sessions kept worker tasks waiting for a slot until they gave up).
"""

from __future__ import annotations

import contextlib
import imaplib
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any

from airflow_provider_o365mail.core.budget import ConnectionBudget, HeldSlot, SharedSlot
from airflow_provider_o365mail.core.credentials import ExpiringToken
from airflow_provider_o365mail.imap.liveness import PROBE_ANSWER_SECONDS
from airflow_provider_o365mail.imap.scan import ConnectionBroken

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 4
#: A returned session stays logged in this long for the next check, then is logged out.
IDLE_TTL_SECONDS = 60.0
#: With a shared budget, a returned session is logged out after this long unused (others may wait for its slot).
SHARED_IDLE_TTL_SECONDS = 5.0
#: A session idle longer than this is probed with NOOP before use.
PROBE_AFTER_SECONDS = 20.0
#: A session being closed gets this long to answer LOGOUT (then its socket is simply closed).
LOGOUT_SECONDS = 5.0
#: Log in again when the session's token has less than this left.
TOKEN_MARGIN_SECONDS = 120.0
#: A lease that finds every connection of the budget busy this long gives up (and is retried by its caller).
ACQUIRE_TIMEOUT_SECONDS = 300.0

#: ``login()`` -> (a logged-in IMAPClient, the token it logged in with).
PoolLogin = Callable[[], "tuple[Any, ExpiringToken]"]


@dataclass
class _Pooled:
    client: Any
    expires_on: float
    returned_at: float
    held: HeldSlot | None = None


@contextlib.contextmanager
def read_deadline(client: Any, seconds: float) -> Iterator[None]:
    """Inside the block, each read on the client's socket waits at most ``seconds`` (or its own timeout,
    if shorter); a client without a socket (a test's fake) is left alone."""
    sock = None
    with contextlib.suppress(Exception):
        sock = client.socket()
    if sock is None:
        yield
        return
    before = sock.gettimeout()
    sock.settimeout(seconds if before is None else min(before, seconds))
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(before)


def drop_client(client: Any) -> None:
    """Close the socket without LOGOUT: for a session whose connection is dead or broken."""
    with contextlib.suppress(Exception):
        client.shutdown()


def close_client(client: Any) -> None:
    """LOGOUT (answered within ``LOGOUT_SECONDS``), or drop the socket when the server does not answer."""
    try:
        with read_deadline(client, LOGOUT_SECONDS):
            client.logout()
    except Exception:
        drop_client(client)


def probe_client(client: Any, seconds: float) -> None:
    """``NOOP``, answered within ``seconds``; raises if it is not (the session is dead)."""
    with read_deadline(client, seconds):
        client.noop()


def _connection_broken(err: BaseException) -> bool:
    """Errors after which the connection is of no use: a LOGOUT would only wait for its timeout."""
    return isinstance(err, OSError | imaplib.IMAP4.abort | ConnectionBroken)


class ImapPool:
    """At most ``max_connections`` logged-in sessions of one mailbox, reused (thread-safe)."""

    def __init__(
        self,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        *,
        name: str = "",
        idle_ttl: float = IDLE_TTL_SECONDS,
        shared_idle_ttl: float = SHARED_IDLE_TTL_SECONDS,
        probe_after: float = PROBE_AFTER_SECONDS,
        probe_answer: float = PROBE_ANSWER_SECONDS,
        token_margin: float = TOKEN_MARGIN_SECONDS,
        acquire_timeout: float = ACQUIRE_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.time,
        close: Callable[[Any], None] = close_client,
        drop: Callable[[Any], None] = drop_client,
        probe: Callable[[Any, float], None] = probe_client,
        shared_slot: SharedSlot | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, not {max_connections}")
        self.max_connections = max_connections
        self.name = name
        self._idle_ttl = idle_ttl
        self.shared_idle_ttl = shared_idle_ttl
        self.probe_after = probe_after
        self.probe_answer = probe_answer
        self.token_margin = token_margin
        self.acquire_timeout = acquire_timeout
        self._clock = clock
        self._close = close
        self.budget = ConnectionBudget(
            max_connections,
            what=f"IMAP connections of {name or 'the mailbox'}",
            option="max_imap_connections_per_mailbox",
            advice="Raise [o365mail] max_imap_connections_per_mailbox if the mailbox has connections to spare "
            "(Exchange allows about 20).",
            acquire_timeout=acquire_timeout,
        )
        self._drop = drop
        self._probe = probe
        #: the mailbox's budget across processes (None: this process's budget only)
        self.shared_slot = shared_slot
        self._lock = threading.Lock()
        self._idle: list[_Pooled] = []
        self._reaper: threading.Timer | None = None
        #: sessions opened (tests and the benchmark); leased now and most leased at once are the budget's
        self.opened = 0

    @property
    def idle_ttl(self) -> float:
        """How long a returned session stays logged in: shorter when it holds a slot of a shared budget."""
        return self._idle_ttl if self.shared_slot is None else min(self._idle_ttl, self.shared_idle_ttl)

    @property
    def leased(self) -> int:
        return self.budget.in_use

    @property
    def max_leased(self) -> int:
        return self.budget.max_in_use

    @property
    def open_connections(self) -> int:
        with self._lock:
            return self.leased + len(self._idle)

    @contextlib.contextmanager
    def lease(self, login: PoolLogin) -> Iterator[Any]:
        """A logged-in client for the duration of the ``with``; returned on success, dropped after an error."""
        with self.budget.slot():
            pooled = self._checkout(login)
            try:
                yield pooled.client
            except BaseException as err:
                self._discard(pooled, drop=_connection_broken(err))
                raise
            pooled.returned_at = self._clock()
            with self._lock:
                self._idle.append(pooled)
        self._schedule_reaper()

    def _checkout(self, login: PoolLogin) -> _Pooled:
        while True:
            with self._lock:
                pooled = self._idle.pop() if self._idle else None  # most recently used: likeliest alive
            if pooled is None:
                return self._open(login)
            now = self._clock()
            if pooled.expires_on - now < self.token_margin:
                log.debug(
                    "IMAP session of %s: its token expires in %.0f s; logging in again.",
                    self.name,
                    pooled.expires_on - now,
                )
                self._discard(pooled)
                continue
            if now - pooled.returned_at > self.probe_after:
                try:
                    self._probe(pooled.client, self.probe_answer)
                except Exception as err:
                    log.info(
                        "IMAP session of %s idle for %.0f s did not answer NOOP (%s: %s); logging in again.",
                        self.name,
                        now - pooled.returned_at,
                        type(err).__name__,
                        err,
                    )
                    self._discard(pooled, drop=True)
                    continue
            return pooled

    def _open(self, login: PoolLogin) -> _Pooled:
        """A new session, holding a slot of the shared budget (if any) from before its login."""
        shared = self.shared_slot
        held = shared() if shared is not None else None
        try:
            client, token = login()
        except BaseException:
            if held is not None:
                held.release()
            raise
        with self._lock:
            self.opened += 1
        return _Pooled(client, float(token.expires_on), self._clock(), held)

    def _discard(self, pooled: _Pooled, *, drop: bool = False) -> None:
        """Close (LOGOUT) or drop a session, then give back its shared slot."""
        try:
            (self._drop if drop else self._close)(pooled.client)
        finally:
            if pooled.held is not None:
                pooled.held.release()

    def close_idle(self, older_than: float = 0.0) -> int:
        """Log out idle sessions returned more than ``older_than`` seconds ago; how many."""
        now = self._clock()
        with self._lock:
            stale = [p for p in self._idle if now - p.returned_at >= older_than]
            self._idle = [p for p in self._idle if now - p.returned_at < older_than]
        for pooled in stale:
            self._discard(pooled)
        return len(stale)

    def _schedule_reaper(self) -> None:
        # A timer thread, not the event loop: sync callers (poking workers) have no loop.
        with self._lock:
            if self._reaper is not None or self.idle_ttl <= 0:
                return
            self._reaper = threading.Timer(self.idle_ttl, self._reap)
            self._reaper.daemon = True
            self._reaper.start()

    def _reap(self) -> None:
        with self._lock:
            self._reaper = None
        self.close_idle(self.idle_ttl)
        with self._lock:
            remaining = bool(self._idle)
        if remaining:
            self._schedule_reaper()


_POOLS: dict[Hashable, ImapPool] = {}
_POOLS_LOCK = threading.Lock()


def imap_pool(
    key: Hashable,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    *,
    name: str = "",
    shared_slot: SharedSlot | None = None,
) -> ImapPool:
    """The process-wide pool for ``key`` (connection and mailbox), created with ``max_connections``;
    ``shared_slot`` (the mailbox's budget across processes) is the latest caller's, used by new sessions."""
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None or pool.max_connections != max_connections:
            if pool is not None:  # the budget was changed: new leases use the new one
                pool.close_idle()
            pool = _POOLS[key] = ImapPool(max_connections, name=name)
        pool.shared_slot = shared_slot
        return pool


def close_idle_pools() -> int:
    """Log out every idle session of every pool in this process; how many.

    For a long-lived process that used many connection ids of one mailbox (a test session, a
    triggerer being drained): each pool keeps its idle sessions ``idle_ttl`` seconds, and the
    mailbox's cap (about 20 on Exchange) counts them all."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
    return sum(pool.close_idle() for pool in pools)


def _after_fork_in_child() -> None:
    # Airflow forks task processes; a child must never talk on the parent's sockets.
    # Their idle sessions are simply forgotten (and locks held by the parent's threads with them).
    global _POOLS_LOCK
    _POOLS_LOCK = threading.Lock()
    _POOLS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
