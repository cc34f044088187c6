"""The cross-host refresh lease of one connection: a Variable, renewed while held, with a fencing token.

Only one process may redeem a connection's refresh token at a time: under strict rotation a
second redemption of the same refresh token revokes the grant, and even with Microsoft's lenient
rotation the second process would store an older refresh token over a newer one.

What this guarantees, given that the Variable API has no compare-and-swap (a write is
last-writer-wins, a read returns the last write that landed):

- **Claim.** A process claims a free (absent or expired) lease by writing ``{owner, fence, until}``,
  waits ``settle`` seconds (or twice its own write's latency, if longer) after its write returned,
  and holds the lease only if it reads its own claim back. Two claimants that both saw the lease free cannot both read themselves back *if
  every Variable write becomes visible within ``settle`` seconds of the read that preceded it*
  (the later write wins, and the earlier writer reads the later claim). Writes slower than that
  (an overloaded API server or database) can break the claim: that is the limit of a
  read/write-only register.
- **Renewal.** The holder rewrites ``until`` every ``ttl / 4`` seconds from a background thread
  while it works (retries and ``Retry-After`` waits included), so a live holder's lease does not
  expire. Others treat a lease as free only once ``until`` has passed on *their* clock: clocks
  must agree to better than ``ttl / 4``.
- **Fencing.** Every claim carries ``fence`` = one more than any fence seen in the lease or the
  token store, and the store records the fence of the refresh that wrote it. The holder checks,
  immediately before each token request, that its lease is valid for longer than the request can
  take (:meth:`RefreshLease.still_held`) and reads it once more to see that it is still its own
  (:meth:`RefreshLease.confirm`); it never sends a request on a lost or nearly expired lease, and
  it does not overwrite a store written under a higher fence.
- **Not guaranteed.** A holder that dies (or is frozen for longer than ``ttl``) during a token
  request whose response is lost: the identity provider may have rotated the refresh token, and
  the next holder can only redeem the previous one. Under Microsoft's rotation that still works;
  under strict rotation the grant is revoked and a person must authorize again.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from airflow_provider_o365mail.exceptions import TokenStoreError
from airflow_provider_o365mail.runtime import VariableBackend

log = logging.getLogger(__name__)

DEFAULT_TTL = 60.0
DEFAULT_SETTLE = 1.0
LEASE_DESCRIPTION = "airflow-provider-o365mail: refresh lease (who refreshes the token now)"


def lease_key(conn_id: str) -> str:
    return f"o365mail_refresh_lease__{conn_id}"


@dataclass(frozen=True)
class LeaseTiming:
    """``ttl``: how long a claim or renewal is valid; ``settle``: the wait before reading a claim back."""

    ttl: float = DEFAULT_TTL
    settle: float = DEFAULT_SETTLE

    def __post_init__(self) -> None:
        if self.ttl <= 0 or self.settle < 0:
            raise ValueError("lease ttl must be > 0 and settle >= 0")

    @classmethod
    def configured(cls, request_timeout: float) -> LeaseTiming:
        """From ``[o365mail] refresh_lease_seconds`` / ``refresh_lease_settle_seconds``.

        The ttl is raised to at least twice the request timeout plus four settles, so that a
        renewed lease always outlives one token request.
        """
        from airflow_provider_o365mail.version_compat import conf

        ttl = conf.getfloat("o365mail", "refresh_lease_seconds", fallback=DEFAULT_TTL)
        settle = conf.getfloat("o365mail", "refresh_lease_settle_seconds", fallback=DEFAULT_SETTLE)
        return cls(ttl=max(ttl, 2 * request_timeout + 4 * settle), settle=settle)


class LeaseTimeout(TokenStoreError):
    """Another process kept the refresh lease for longer than this one may wait."""


class RefreshLease:
    """The lease of one connection; use :meth:`acquire`, then :meth:`still_held`, then :meth:`release`.

    :param key: the lease's Variable (default :func:`lease_key` of ``conn_id``); another key makes the
        same cross-host lease guard something else (``conn_id`` then names that thing in messages).
    :param doing: what a holder does, for the timeout message.
    :param holder_gone: True when the holder named in a lease is known to be dead (its lease is then
        free before it expires); None trusts only ``until``.
    """

    def __init__(
        self,
        backend: VariableBackend,
        conn_id: str,
        timing: LeaseTiming,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        key: str | None = None,
        doing: str = "refreshing the token of",
        holder_gone: Callable[[dict], bool] | None = None,
    ) -> None:
        self.backend = backend
        self.holder_gone = holder_gone
        self.conn_id = conn_id
        self.key = key or lease_key(conn_id)
        self.doing = doing
        self.timing = timing
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.fence: int | None = None
        self._clock = clock
        self._sleep = sleep
        self._valid_until = 0.0  # monotonic
        self._lost = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._state_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RefreshLease(conn_id={self.conn_id!r}, fence={self.fence})"

    # ------------------------------------------------------------------ reading and writing
    def read(self) -> dict | None:
        try:
            raw = self.backend.get(self.key)
            data = json.loads(raw) if raw else None
        except (ValueError, TypeError):
            return None
        return data if isinstance(data, dict) else None

    def _write(self, fence: int) -> float:
        """Write our claim; returns the monotonic time the write started (validity counts from it)."""
        started = time.monotonic()
        payload = json.dumps({"owner": self.owner, "fence": fence, "until": self._clock() + self.timing.ttl})
        self.backend.set(self.key, payload, description=LEASE_DESCRIPTION)
        return started

    def _mine(self, current: dict | None) -> bool:
        return current is not None and current.get("owner") == self.owner and current.get("fence") == self.fence

    # ------------------------------------------------------------------ acquire / renew / release
    def acquire(self, deadline: float, *, min_fence: int = 0, done: Callable[[], bool] | None = None) -> bool:
        """Claim the lease before ``deadline`` (monotonic).

        :param min_fence: the highest fence seen elsewhere (the token store's); ours is above it.
        :param done: polled while waiting; True means the lease is no longer needed (another
            process stored a fresh token).
        :return: True when held, False when ``done()`` said so.
        :raises LeaseTimeout: still held by someone else at ``deadline``.
        """
        current: dict | None = None
        while True:
            current = self.read()
            if (
                current is None
                or float(current.get("until", 0)) < self._clock()
                or (self.holder_gone is not None and self.holder_gone(current))
            ):
                fence = max(int((current or {}).get("fence", 0) or 0), min_fence) + 1
                self.fence = fence
                started = self._write(fence)
                # Our own write's latency is the best guess of everyone's now: wait for twice that if
                # it is longer than the configured settle (a loaded API server or database).
                self._sleep(max(self.timing.settle, 2 * (time.monotonic() - started)))
                current = self.read()
                if self._mine(current):
                    with self._state_lock:
                        self._valid_until = started + self.timing.ttl
                        self._lost = False
                    self._start_renewer()
                    return True
                self.fence = None
            if done is not None and done():
                return False
            if time.monotonic() > deadline:
                raise LeaseTimeout(
                    f"Another process ({(current or {}).get('owner', 'unknown')}) has been {self.doing} "
                    f"{self.conn_id!r} for longer than this one may wait"
                    + ("; it may be stuck on the identity provider" if self.key == lease_key(self.conn_id) else "")
                    + ". The task can be retried."
                )
            self._sleep(0.1 + random.random() * 0.3)  # noqa: S311 - jitter, not cryptography

    def confirm(self) -> bool:
        """Read the lease now: True if it is still ours (called right before each token request)."""
        try:
            mine = self._mine(self.read())
        except Exception:  # cannot tell: do not risk a second redemption
            mine = False
        if not mine:
            with self._state_lock:
                self._lost = True
        return mine

    def still_held(self, need: float = 0.0) -> bool:
        """True if the lease is ours and stays valid for ``need`` more seconds (a request's duration)."""
        with self._state_lock:
            if self._lost or self.fence is None:
                return False
            return self._valid_until - time.monotonic() > need

    def _start_renewer(self) -> None:
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew_loop, name=f"o365mail-lease-{self.conn_id}", daemon=True)
        self._renewer.start()

    def _renew_loop(self) -> None:
        interval = self.timing.ttl / 4
        while not self._stop.wait(interval):
            try:
                current = self.read()
                if not self._mine(current):
                    with self._state_lock:
                        self._lost = True
                    log.warning(
                        "The refresh lease of %s was taken over by %s.", self.conn_id, (current or {}).get("owner")
                    )
                    return
                started = self._write(self.fence or 0)
                with self._state_lock:
                    self._valid_until = started + self.timing.ttl
            except Exception as err:  # a failed renewal shortens the validity; still_held() notices
                log.warning("Could not renew the refresh lease of %s: %s", self.conn_id, type(err).__name__)

    def release(self) -> None:
        """Stop renewing and drop the lease if it is still ours."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
            self._renewer = None
        if self.fence is None:
            return
        try:
            if self._mine(self.read()):
                self.backend.delete(self.key)
        except Exception as err:  # it expires by itself
            log.debug("Could not drop the refresh lease of %s: %s", self.conn_id, type(err).__name__)
        finally:
            with self._state_lock:
                self.fence = None
