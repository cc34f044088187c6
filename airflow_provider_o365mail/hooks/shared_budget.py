"""A mailbox's connection budget across every process and host: N slots, each a lease in a Variable.

Exchange Online counts connections per *mailbox* (about 20 IMAP, 3 SMTP AUTH sessions), whichever
host, process or connection id opens them. The per-process budget (``core/budget.py``) cannot see
the other workers and triggerers; this one can: slot ``i`` of a mailbox's IMAP budget is the
Variable ``o365mail_slot__imap__<mailbox digest>__<i>``, claimed, renewed and released with the
cross-host lease of ``auth/lease.py`` (claim, settle, read back; renewed every ``ttl / 4`` while
held). A connection holds one slot from before its login until it is closed, so at most N
connections of the kind are open to the mailbox at once, whatever the connection id: the key is the
mailbox's address (lower-cased), so two connection ids of one mailbox share its budget.

Waiting is cheap for the shared store: a new connection reads the slots once; while all are taken
it reads one small Variable, the release hint (which slot was given back last), twice a second and
tries the slot it names, and reads every slot again every 10 s (holders that died, hints
overwritten). It is not a queue: a waiter may be overtaken by a later one; after
``acquire_timeout`` it raises :class:`MailServerUnavailable`, which is retried.

What this guarantees is what the lease guarantees (its docstring): at most one holder per slot
*if* every Variable write becomes visible within ``settle`` seconds, clocks agree to better than
``ttl / 4``, and no holder is frozen for longer than ``ttl``. A process killed while holding slots
leaves them to expire after ``ttl`` (its connections died with it: the budget errs on the side of
fewer connections), unless the next claimant runs on the same host and sees that the holder's
process is gone (:func:`holder_died_on_this_host`): then the slot is free at once. A process that stops normally gives its slots back: a task process in the
lifecycle listener's ``before_stopping`` (``plugins/slot_listener.py``; a task reaches Variables only
until the task runner closes its supervisor socket, before ``atexit``), other processes also in an
``atexit`` handler.

The per-process budget stays the first level: a process asks the shared store only for a connection
its own budget allows, so the store sees at most one waiter per connection a process may open.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable

from airflow_provider_o365mail.auth.lease import LeaseTimeout, LeaseTiming, RefreshLease
from airflow_provider_o365mail.exceptions import ConnectionConfigError, MailServerUnavailable
from airflow_provider_o365mail.runtime import VariableBackend, process_running

log = logging.getLogger(__name__)

#: ``[o365mail]`` options: the budgets shared by every process and host, per mailbox; 0 turns one off.
SHARED_IMAP_OPTION = "shared_imap_connections_per_mailbox"
SHARED_SMTP_OPTION = "shared_smtp_sessions_per_mailbox"
#: Well under Exchange's ~20: room for Outlook, mobile clients and other tools on the same mailbox.
DEFAULT_SHARED_IMAP = 10
#: Exchange's limit of concurrent SMTP AUTH sessions per mailbox.
DEFAULT_SHARED_SMTP = 3
#: A connection that finds every slot taken this long gives up (and is retried by its caller).
ACQUIRE_TIMEOUT_SECONDS = 300.0
SLOT_DESCRIPTION = "airflow-provider-o365mail: connection slot (one of a mailbox's connections, held now)"

KINDS = {"imap": "IMAP connections", "smtp": "SMTP sessions"}
#: A waiter reads the release hint this often (jittered +-50 %) ...
POLL_SECONDS = 0.5
#: ... and reads every slot this often (jittered), for holders that died or hints overwritten.
RESCAN_SECONDS = 10.0
HINT_DESCRIPTION = "airflow-provider-o365mail: the connection slot given back last (a hint for waiters)"


def configured_shared_budget(option: str, default: int) -> int:
    """``[o365mail] <option>`` as an int >= 0 (0: no shared budget); a wrong value names the option."""
    from airflow_provider_o365mail.version_compat import conf

    value = conf.get("o365mail", option, fallback=str(default))
    try:
        limit = int(str(value).strip() or default)
    except ValueError:
        limit = -1
    if limit < 0:
        raise ConnectionConfigError(
            f"[o365mail] {option} must be a whole number >= 0 (0 turns the budget shared by all hosts off), not "
            f"{value!r}. Exchange Online allows about 20 IMAP connections and 3 SMTP sessions per mailbox; see "
            "docs/deployment.md."
        )
    return limit


def _digest(mailbox: str) -> str:
    return hashlib.sha256(mailbox.strip().lower().encode()).hexdigest()[:16]


def slot_key(kind: str, mailbox: str, index: int) -> str:
    return f"o365mail_slot__{kind}__{_digest(mailbox)}__{index}"


def hint_key(kind: str, mailbox: str) -> str:
    """The Variable naming the slot given back last (written on each release, read by waiters)."""
    return f"o365mail_slotfree__{kind}__{_digest(mailbox)}"


def _hinted_index(raw: str | None, limit: int) -> int | None:
    try:
        index = json.loads(raw)["index"] if raw else None
    except (ValueError, TypeError, KeyError):
        return None
    return index if isinstance(index, int) and 0 <= index < limit else None


def holder_died_on_this_host(lease: dict) -> bool:
    """True when the slot's holder was a process of this host (same hostname) that no longer runs.

    A process killed with SIGKILL (an OOM kill, a killed task) cannot give its slots back, but the
    kernel closed its connections: its slots are free now, not when their lease expires. Only this
    host's processes can be checked; another host's dead holder still frees its slot after ``ttl``.
    Hostnames must be unique per host (they are for Kubernetes pods and Docker containers).
    """
    node, _, rest = str(lease.get("owner", "")).partition(":")
    pid_text = rest.partition(":")[0]
    if node != os.uname().nodename or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # this process: alive (its own slots are released by their holder)
    return not process_running(pid)


class _Held:
    """One slot, held (its lease renews itself) until :meth:`release`."""

    def __init__(self, lease: RefreshLease, owner: SharedBudget, index: int) -> None:
        self._lease = lease
        self._owner = owner
        self._index = index
        self._released = threading.Event()

    def release(self) -> None:
        if self._released.is_set():
            return
        self._released.set()
        self._owner._forget(self)
        self._lease.release()
        self._owner._hint_released(self._index)

    def __repr__(self) -> str:
        return f"<slot {self._lease.key}>"


class SharedBudget:
    """At most ``limit`` connections of ``kind`` to ``mailbox`` across processes; :meth:`acquire` takes a slot.

    :param variables: where the slots live (``runtime.default_variables()``: the Task SDK in tasks and
        the triggerer, the metadata DB elsewhere); every process of the deployment must see the same.
    """

    def __init__(
        self,
        variables: VariableBackend,
        kind: str,
        mailbox: str,
        limit: int,
        timing: LeaseTiming,
        *,
        option: str,
        acquire_timeout: float = ACQUIRE_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        poll: float = POLL_SECONDS,
        rescan: float = RESCAN_SECONDS,
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, not {limit}")
        self.variables = variables
        self.kind = kind
        self.mailbox = mailbox.strip().lower()
        self.limit = limit
        self.timing = timing
        self.option = option
        self.acquire_timeout = acquire_timeout
        self._clock = clock
        self._sleep = sleep
        self.poll = poll
        self.rescan = rescan

    def __repr__(self) -> str:
        return f"SharedBudget({self.kind}, {self.mailbox!r}, limit={self.limit})"

    def _lease(self, index: int) -> RefreshLease:
        return RefreshLease(
            self.variables,
            f"{self.kind} slot {index} of {self.mailbox}",
            self.timing,
            clock=self._clock,
            sleep=self._sleep,
            key=slot_key(self.kind, self.mailbox, index),
            doing="holding",
            holder_gone=holder_died_on_this_host,
        )

    def acquire(self) -> _Held:
        """A slot (blocking); raises :class:`MailServerUnavailable` after ``acquire_timeout``.

        One scan of every slot first. A waiter then reads only the budget's release hint (one small
        Variable, every ``poll`` seconds) and tries the slot it names when it changes, plus a full scan
        every ``rescan`` seconds for slots whose holder died (its lease expires after the ttl) or
        whose hint was overwritten. So W waiters cost about W reads a second, not W x N.
        """
        deadline = time.monotonic() + self.acquire_timeout
        hint = self._read_hint()
        held = self._scan()
        next_scan = time.monotonic() + self.rescan * (0.5 + random.random())  # noqa: S311 - jitter
        while held is None:
            if time.monotonic() > deadline:
                what = KINDS.get(self.kind, self.kind)
                raise MailServerUnavailable(
                    f"All {self.limit} {what} of {self.mailbox} (shared by every host) were in use for "
                    f"{self.acquire_timeout:.0f} s; this is retried. Run fewer at once, or raise [o365mail] "
                    f"{self.option} if the mailbox has connections to spare."
                )
            self._sleep(self.poll * (0.5 + random.random()))  # noqa: S311 - jitter, not cryptography
            latest = self._read_hint()
            if latest != hint:
                hint = latest
                index = _hinted_index(latest, self.limit)
                if index is not None:
                    held = self._try(index)
            if held is None and time.monotonic() >= next_scan:
                held = self._scan()
                next_scan = time.monotonic() + self.rescan * (0.5 + random.random())  # noqa: S311
        return self._remember(held)

    def _try(self, index: int) -> _Held | None:
        lease = self._lease(index)
        try:
            if lease.acquire(0.0):  # one try: a past deadline makes a busy slot raise at once
                return _Held(lease, self, index)
        except LeaseTimeout:
            pass
        return None

    def _scan(self) -> _Held | None:
        order = list(range(self.limit))
        random.shuffle(order)  # waiters spread over the slots instead of all claiming slot 0
        for index in order:
            held = self._try(index)
            if held is not None:
                return held
        return None

    def _read_hint(self) -> str | None:
        try:
            return self.variables.get(hint_key(self.kind, self.mailbox))
        except Exception as err:  # the full scan still finds free slots
            log.debug("Could not read the release hint of %r: %s", self, type(err).__name__)
            return None

    def _hint_released(self, index: int) -> None:
        """Tell the waiters (on every host) which slot just came free; they try it at their next poll."""
        try:
            value = json.dumps({"index": index, "nonce": uuid.uuid4().hex[:12]})
            self.variables.set(hint_key(self.kind, self.mailbox), value, description=HINT_DESCRIPTION)
        except Exception as err:  # waiters find the slot at their next full scan
            log.debug("Could not write the release hint of %r: %s", self, type(err).__name__)

    __call__ = acquire

    # ------------------------------------------------------------------ this process's held slots
    def _remember(self, held: _Held) -> _Held:
        _register(held)
        return held

    def _forget(self, held: _Held) -> None:
        _unregister(held)


_HELD: set[_Held] = set()
_HELD_LOCK = threading.Lock()
_EXIT_HOOKED_PID: int | None = None


def _register(held: _Held) -> None:
    global _EXIT_HOOKED_PID
    with _HELD_LOCK:
        _HELD.add(held)
        if os.getpid() != _EXIT_HOOKED_PID:  # once per process: a forked task process registers its own
            _EXIT_HOOKED_PID = os.getpid()
            atexit.register(release_all)


def _unregister(held: _Held) -> None:
    with _HELD_LOCK:
        _HELD.discard(held)


def held_count() -> int:
    """How many slots this process holds now (idle pooled sessions included)."""
    with _HELD_LOCK:
        return len(_HELD)


def release_all() -> int:
    """Close this process's idle IMAP sessions and give back every slot it still holds; how many slots."""
    from airflow_provider_o365mail.imap.pool import close_idle_pools

    try:
        close_idle_pools()
    except Exception as err:  # an exit path: give the slots back anyway
        log.debug("Closing idle IMAP sessions failed: %s", type(err).__name__)
    with _HELD_LOCK:
        held = list(_HELD)
    for slot in held:
        try:
            slot.release()
        except Exception as err:  # it expires by itself after the lease's ttl
            log.debug("Could not give back %r: %s", slot, type(err).__name__)
    return len(held)


def _after_fork_in_child() -> None:
    # The parent's slots are the parent's: a forked child neither renews nor releases them.
    global _HELD_LOCK
    _HELD_LOCK = threading.Lock()
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
