"""The mailbox's connection budget shared by every process and host (hooks/shared_budget.py), and its
two users: the IMAP pool (a slot per open session, idle ones included) and the IDLE hub (a slot per
IDLE session). Several "processes" are several SharedBudget instances over one in-memory Variable
store that behaves like the real one: last writer wins, no compare-and-swap."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest

from airflow_provider_o365mail.auth.lease import LeaseTiming
from airflow_provider_o365mail.core.budget import ConnectionBudget, two_level_slot
from airflow_provider_o365mail.exceptions import MailServerUnavailable
from airflow_provider_o365mail.hooks import shared_budget
from airflow_provider_o365mail.hooks.shared_budget import SharedBudget, slot_key
from airflow_provider_o365mail.imap.pool import ImapPool

FAST = LeaseTiming(ttl=5.0, settle=0.02)


class Variables:
    """Airflow Variables as the Task SDK gives them: get/set/delete, each atomic, with a little latency."""

    def __init__(self, latency: float = 0.002) -> None:
        self.data: dict[str, str] = {}
        self.lock = threading.Lock()
        self.latency = latency
        self.writes = 0
        self.reads: dict[str, int] = {}

    def _wait(self) -> None:
        time.sleep(random.random() * self.latency)

    def get(self, key: str) -> str | None:
        self._wait()
        with self.lock:
            self.reads[key] = self.reads.get(key, 0) + 1
            return self.data.get(key)

    def set(self, key: str, value: str, description: str = "") -> None:
        self._wait()
        with self.lock:
            self.data[key] = value
            self.writes += 1

    def delete(self, key: str) -> None:
        self._wait()
        with self.lock:
            self.data.pop(key, None)


class Holders:
    """Counts connections open at once (what the server would see)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.done = 0

    def __enter__(self) -> Holders:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        return self

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.now -= 1
            self.done += 1


def budget(
    store: Variables, mailbox: str = "Shared@Contoso.test", limit: int = 3, timing: LeaseTiming = FAST, **kw
) -> SharedBudget:
    return SharedBudget(store, "imap", mailbox, limit, timing, option="shared_imap_connections_per_mailbox", **kw)


def test_many_processes_never_hold_more_than_the_limit_and_all_get_their_turn():
    store = Variables()
    processes = [budget(store) for _ in range(4)]  # four hosts, one SharedBudget each
    open_now = Holders()
    errors: list[BaseException] = []

    def connection(proc: SharedBudget) -> None:
        try:
            held = proc.acquire()
            try:
                with open_now:
                    time.sleep(0.05)
            finally:
                held.release()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=connection, args=(processes[n % 4],)) for n in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert open_now.done == 24, "every connection got a slot in the end"
    assert open_now.peak <= 3, f"{open_now.peak} connections of the mailbox were open at once (limit 3)"
    assert open_now.peak >= 2, "the budget allowed concurrency, not one at a time"
    assert not any(k.startswith("o365mail_slot__") for k in store.data), "every slot was given back"


def test_two_connection_ids_of_one_mailbox_share_its_slots_and_the_address_is_case_insensitive():
    store = Variables()
    a, b = budget(store, "shared@contoso.test", limit=2), budget(store, " SHARED@Contoso.TEST", limit=2)
    assert slot_key("imap", a.mailbox, 0) == slot_key("imap", b.mailbox, 0)
    held = [a.acquire(), b.acquire()]
    late = budget(store, "shared@contoso.test", limit=2, acquire_timeout=0.3)
    with pytest.raises(MailServerUnavailable, match="shared by every host"):
        late.acquire()
    other_mailbox = budget(store, "other@contoso.test", limit=2)
    other_mailbox.acquire().release()  # another mailbox has a budget of its own
    held[0].release()
    late.acquire().release()
    held[1].release()


def test_waiters_read_the_release_hint_not_every_slot_and_take_a_given_back_slot_at_once():
    """Before: each waiter read all N slots every 0.5-1.5 s; 20 waiters on 10 slots kept an API server
    busy with ~150 reads/s and slots freed by exiting tasks were found late (pokes waited 65-120 s)."""
    store = Variables()
    limit, waiters = 10, 8
    # The holders' leases outlive the test: their renewals (a read each, every ttl/4) are not the waiters' reads.
    held = [budget(store, limit=limit, timing=LeaseTiming(ttl=3600.0, settle=0.02)).acquire() for _ in range(limit)]
    store.reads.clear()
    got: list[float] = []
    lock = threading.Lock()

    def wait() -> None:
        slot = budget(store, limit=limit, poll=0.02, rescan=3600.0).acquire()
        with lock:
            got.append(time.monotonic())
        time.sleep(0.2)
        slot.release()

    threads = [threading.Thread(target=wait) for _ in range(waiters)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # every waiter did its one scan and now polls the hint
    slot_reads = sum(n for k, n in store.reads.items() if k.startswith("o365mail_slot__"))
    hint_reads = sum(n for k, n in store.reads.items() if k.startswith("o365mail_slotfree__"))
    assert slot_reads <= waiters * limit, f"{slot_reads} slot reads while waiting: more than one scan each"
    assert hint_reads >= waiters * 10, "waiters poll the hint"
    assert not got
    released_at = time.monotonic()
    held.pop().release()
    for t in threads:
        t.join(timeout=30)  # one slot passed on from waiter to waiter, through the hint only
    assert len(got) == waiters
    assert got[0] - released_at < 0.5, "the given-back slot was taken within a few polls"
    for slot in held:
        slot.release()


def test_a_slot_of_a_killed_holder_comes_free_after_the_lease_ttl_and_not_before():
    store = Variables()
    now = [1000.0]
    dead = budget(store, limit=1, clock=lambda: now[0])
    # The holder on another host is SIGKILLed: nothing renews nor releases its slot (this process's own
    # pid is never taken for dead, so it stands for a holder whose process cannot be checked).
    dead.acquire()._lease._stop.set()
    waiting = budget(store, limit=1, clock=lambda: now[0], acquire_timeout=0.2)
    with pytest.raises(MailServerUnavailable):
        waiting.acquire()
    now[0] += FAST.ttl + 1
    budget(store, limit=1, clock=lambda: now[0]).acquire().release()


def _lease_of(pid: int, node: str | None = None) -> str:
    node = node or os.uname().nodename
    return json.dumps({"owner": f"{node}:{pid}:0123abcd", "fence": 3, "until": time.time() + 3600})


def test_a_slot_whose_holder_on_this_host_was_killed_is_free_at_once_not_after_the_ttl():
    """Before: every SIGKILLed holder (an OOM-killed task) blocked its slot for the lease ttl (a minute
    or more); ten kills in the kill tests stalled every later poke for that long."""
    store = Variables()
    key = slot_key("imap", "shared@contoso.test", 0)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    zombie = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    reaped = subprocess.Popen([sys.executable, "-c", "pass"])
    reaped.wait()
    zombie.kill()
    deadline = time.monotonic() + 10
    while shared_budget.process_running(zombie.pid):  # killed, not reaped: a zombie
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        for holder, free in [
            (_lease_of(alive.pid), False),
            (_lease_of(reaped.pid, node="another-host"), False),  # cannot be checked from here
            (_lease_of(reaped.pid), True),
            (_lease_of(zombie.pid), True),
        ]:
            store.data[key] = holder
            late = budget(store, "shared@contoso.test", limit=1, acquire_timeout=0.1, poll=0.02)
            if free:
                late.acquire().release()
            else:
                with pytest.raises(MailServerUnavailable):
                    late.acquire()
    finally:
        alive.kill()
        alive.wait()
        zombie.wait()


def test_a_held_slot_is_renewed_and_outlives_its_ttl():
    store = Variables()
    timing = LeaseTiming(ttl=0.4, settle=0.01)
    holder = SharedBudget(store, "smtp", "m@x.test", 1, timing, option="o")
    held = holder.acquire()
    time.sleep(1.0)  # 2.5 ttls: only renewals keep it
    other = SharedBudget(store, "smtp", "m@x.test", 1, timing, option="o", acquire_timeout=0.3)
    with pytest.raises(MailServerUnavailable):
        other.acquire()
    held.release()
    other.acquire().release()


def test_the_process_budget_comes_first_so_the_shared_store_sees_at_most_its_waiters():
    store = Variables()
    shared = budget(store, limit=5)
    local = ConnectionBudget(2, what="IMAP connections", option="max_imap_connections_per_mailbox")
    asking = Holders()
    open_now = Holders()

    def take():
        with asking:
            return shared.acquire()

    def connection() -> None:
        with two_level_slot(local, take), open_now:
            time.sleep(0.03)

    threads = [threading.Thread(target=connection) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert open_now.done == 10
    assert asking.peak <= 2, "no more than the process's own budget ever waits on the shared store"
    assert open_now.peak <= 2


def test_release_all_gives_back_what_this_process_still_holds():
    store = Variables()
    held = [budget(store).acquire(), budget(store).acquire()]
    assert sum(k.startswith("o365mail_slot__") for k in store.data) == 2
    assert shared_budget.release_all() >= 2
    assert not any(k.startswith("o365mail_slot__") for k in store.data)
    held[0].release()  # idempotent


# ---------------------------------------------------------------------------------------------- the pool
@dataclass(frozen=True)
class Token:
    token: str = "t"
    expires_on: float = 4_000_000_000.0


class Client:
    def __init__(self) -> None:
        self.closed = False

    def noop(self) -> None:
        pass

    def logout(self) -> None:
        self.closed = True

    def shutdown(self) -> None:
        self.closed = True


def test_pool_sessions_hold_a_shared_slot_while_open_idle_included_and_give_it_back_when_closed():
    store = Variables()
    shared = budget(store, limit=2)
    pools = [ImapPool(4, idle_ttl=0, shared_slot=shared.acquire) for _ in range(2)]  # two processes, 4 each
    clients: list[Client] = []

    def login():
        clients.append(Client())
        return clients[-1], Token()

    with pools[0].lease(login):
        pass  # returned to the pool: idle, but open at the server
    with pools[1].lease(login):
        # 2 sessions open (one idle in process 0): process 1 may not open another
        shared.acquire_timeout = 0.3
        with pytest.raises(MailServerUnavailable), pools[1].lease(login):
            pass
    assert len(clients) == 2
    assert pools[0].close_idle() == 1
    with pools[1].lease(login), pools[0].lease(login):  # reuses its idle session; a new one in process 0 fits
        assert sum(not c.closed for c in clients) == 2
    for pool in pools:
        pool.close_idle()
    assert not any(k.startswith("o365mail_slot__") for k in store.data), "every closed session gave its slot back"


def test_a_failed_login_or_a_broken_session_gives_its_shared_slot_back():
    store = Variables()
    shared = budget(store, limit=1)
    pool = ImapPool(2, idle_ttl=0, shared_slot=shared.acquire)

    def refused():
        raise MailServerUnavailable("refused")

    with pytest.raises(MailServerUnavailable), pool.lease(refused):
        pass
    with pytest.raises(OSError), pool.lease(lambda: (Client(), Token())):
        raise OSError("connection reset")
    assert not any(k.startswith("o365mail_slot__") for k in store.data)


# ---------------------------------------------------------------------------------------------- the IDLE hub
def test_each_idle_session_holds_a_shared_slot_and_a_cancelled_wait_leaves_none_behind():
    from airflow_provider_o365mail.imap.hub import IdleHub
    from airflow_provider_o365mail.retry import Backoff

    store = Variables()
    shared = budget(store, limit=1)
    during_session: list[int] = []

    def slots() -> int:
        return sum(k.startswith("o365mail_slot__") for k in store.data)

    async def idle(endpoint, folder, token, max_idle, on_selected):
        during_session.append(slots())
        on_selected(1)
        await asyncio.sleep(3600)

    async def scenario():
        hub = IdleHub(idle=idle, retry=Backoff(first=0.0, maximum=0.0), linger=0.0)
        sub = hub.subscribe("k", "INBOX", lambda: None, lambda **_: Token(), slot=shared.acquire)
        while not during_session:
            await asyncio.sleep(0.01)
        assert during_session == [1], "the IDLE session held one slot of the mailbox"
        sub.close()
        await asyncio.sleep(0.1)
        for _ in range(100):  # given back in a thread of its own
            if slots() == 0:
                break
            await asyncio.sleep(0.02)
        assert slots() == 0, "the ended IDLE session gave its slot back"

        # A slot that is still being waited for when the watch is cancelled is given back when it arrives.
        other = budget(store, limit=1)
        blocker = other.acquire()
        sub = hub.subscribe("k2", "INBOX", lambda: None, lambda **_: Token(), slot=shared.acquire)
        await asyncio.sleep(0.2)  # the loop waits in a thread for the only slot
        sub.close()
        await asyncio.sleep(0.1)
        blocker.release()
        for _ in range(300):
            if slots() == 0 and not hub.watched():
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(2.0)  # the waiting thread's retry round takes the slot, then gives it back
        assert slots() == 0, "a slot that arrived after the cancel was given back"

    asyncio.run(scenario())


def test_an_idle_pooled_session_gives_its_shared_slot_back_soon_not_after_the_pools_idle_ttl():
    store = Variables()
    shared = budget(store, limit=1)
    pool = ImapPool(2, idle_ttl=60, shared_idle_ttl=0.2, shared_slot=shared.acquire)
    with pool.lease(lambda: (Client(), Token())):
        pass
    assert pool.idle_ttl == 0.2
    deadline = time.monotonic() + 10
    while any(k.startswith("o365mail_slot__") for k in store.data):
        assert time.monotonic() < deadline, "the idle session still holds the mailbox's only slot"
        time.sleep(0.05)
    assert ImapPool(2, idle_ttl=60).idle_ttl == 60, "without a shared budget idle sessions stay 60 s"


def test_the_lifecycle_listener_gives_a_tasks_slots_back_before_its_supervisor_socket_closes():
    """A task reaches Variables only until the task runner closes its socket, before ``atexit``; the
    listener's ``before_stopping`` (called from the task runner's ``finalize``) is the last chance."""
    from airflow_provider_o365mail.plugins import slot_listener

    store = Variables()
    held = budget(store, limit=2).acquire()
    assert shared_budget.held_count() == 1
    slot_listener.before_stopping(component=object())
    assert shared_budget.held_count() == 0
    assert not any(k.startswith("o365mail_slot__") for k in store.data), "the slot was given back"
    held.release()  # idempotent: already given back
    slot_listener.before_stopping(component=object())  # nothing held: nothing to do
