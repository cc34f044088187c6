"""1,000 deferred Graph sensors of one mailbox on one triggerer event loop, with IMAP off (#23).

The triggers run as the triggerer runs them: ``O365ImapTrigger(transport="graph").run()`` coroutines,
all on one event loop in one process (as bench/imap_scale.py does for IMAP), each with its own spec
(a different ``max_messages``: no two checks coalesce, the worst case). IMAP is disabled for the
mailbox at the stand-in, so any IMAP wait fails. Once every trigger has checked and waits, ONE
message matching all of them is delivered, and:

- all 1,000 fire (each yields its success event with the message);
- the Graph requests, counted AT THE STAND-IN, stay within Outlook's limits for the mailbox: the
  stand-in enforces Microsoft's (4 concurrent, 10,000 per 10 minutes per app and mailbox) and
  answers any excess with 429, so zero 429s, a peak of at most 4 in flight, and (the
  whole run needs less than one window's allowance) at most 10,000 requests in all;
- while the 1,000 wait, the folder costs one delta poll per interval, not one per sensor;
- the event loop is never blocked for long (a generous bound: no blocking Graph request on the loop).
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from airflow_provider_o365mail.core.gate import check_gate
from airflow_provider_o365mail.graph.hub import graph_hub
from airflow_provider_o365mail.hooks import fallback
from airflow_provider_o365mail.testing.hostile_mail import deliver, good_message
from airflow_provider_o365mail.testing.mailbox import recreate_folder
from airflow_provider_o365mail.triggers.imap import O365ImapTrigger

SENSORS = 1000
CONCURRENCY = 4  # Outlook, per app and mailbox; also [o365mail] max_graph_requests_per_mailbox
REQUESTS_PER_10_MINUTES = 10_000  # Outlook, per app and mailbox
READY_TIMEOUT = 1200.0
FIRE_TIMEOUT = 1200.0  # 1,000 checks after the delivery, 4 at a time, on a loaded 2-core machine
#: The loop may be busy (1,000 coroutines waking on a 2-core machine), never blocked by a request.
MAX_LOOP_LAG_SECONDS = 5.0
TICK = 0.01


@pytest.mark.timeout(3600)
def test_a_thousand_deferred_graph_sensors_fire_on_one_delivery_within_outlooks_limits(
    graph_conn, o365_sandbox, o365_admin
):
    sbx = o365_sandbox
    conn_id = graph_conn()
    limits = o365_admin.graph_state()["limits"]
    assert (limits["concurrency"], limits["requests_per_window"], limits["request_window"]) == (
        CONCURRENCY,
        REQUESTS_PER_10_MINUTES,
        600.0,
    ), "the stand-in throttles at Microsoft's limits"
    folder = f"GraphScale-{uuid.uuid4().hex[:8]}"
    recreate_folder(sbx, sbx.user, folder)
    subject = f"graph scale {uuid.uuid4().hex[:10]}"
    o365_admin.graph_reset_counters()
    o365_admin.update_user(sbx.user, imap_enabled=False)
    fallback.forget_disabled()
    try:
        metrics = asyncio.run(_run(sbx, o365_admin, conn_id, folder, subject))
    finally:
        o365_admin.update_user(sbx.user, imap_enabled=True)
    counters = o365_admin.graph_counters(sbx.user)
    print(f"\n{SENSORS} Graph sensors: {metrics}; stand-in counters: {counters}")

    assert metrics["errors"] == [], f"{len(metrics['errors'])} trigger(s) failed, e.g. {metrics['errors'][:1]}"
    assert metrics["fired"] == SENSORS, f"{SENSORS - metrics['fired']} sensor(s) did not fire"
    # Counted at the stand-in, which throttles at Microsoft's limits: nothing over them was sent.
    assert counters["throttled"] == 0, f"{counters['throttled']} request(s) answered 429"
    assert counters["peak_concurrency"] <= CONCURRENCY, f"{counters['peak_concurrency']} requests at once"
    # The whole run (1,000 first checks, the waiting, 1,000 checks after the delivery) fits in one window's
    # allowance, however long the loaded machine takes for it.
    assert counters["requests"] <= REQUESTS_PER_10_MINUTES, f"{counters['requests']} requests"
    # While all 1,000 waited: the shared loop's polls only (one request each), not one poll per sensor.
    assert metrics["requests_while_waiting"] <= metrics["waiting_seconds"] / 3.0 + 2, metrics
    assert metrics["lag_max"] < MAX_LOOP_LAG_SECONDS, f"the event loop stalled for {metrics['lag_max']:.2f} s"


async def _run(sbx, admin, conn_id: str, folder: str, subject: str) -> dict:
    loop = asyncio.get_running_loop()
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        expected = loop.time() + TICK
        while not stop.is_set():
            await asyncio.sleep(max(0.0, expected - loop.time()))
            now = loop.time()
            lags.append(max(0.0, now - expected))
            expected = now + TICK

    started = time.monotonic()
    tick = asyncio.ensure_future(ticker())
    triggers = [
        O365ImapTrigger(
            conn_id=conn_id,
            spec={"folders": [folder], "subject": subject, "max_messages": i + 1},
            transport="graph",
            poll_interval=60,
        )
        for i in range(SENSORS)
    ]
    generators = [t.run() for t in triggers]
    tasks = [asyncio.ensure_future(gen.__anext__()) for gen in generators]
    try:
        gate = check_gate(("graph", "o365mail", conn_id, ""), CONCURRENCY)
        deadline = time.monotonic() + READY_TIMEOUT
        while not (gate.ran >= SENSORS and gate.running == 0 and not gate._queued):
            assert time.monotonic() < deadline, f"only {gate.ran} of {SENSORS} triggers checked"
            assert not any(t.done() for t in tasks), "a trigger ended before any mail: " + repr(
                next(t for t in tasks if t.done()).result()
            )
            await asyncio.sleep(0.1)
        (state,) = graph_hub().watched()
        assert state.synced and len(state.waiters) == SENSORS
        # All wait: count what the folder costs for a while.
        before = await asyncio.to_thread(admin.graph_counters, sbx.user)
        waiting_started = time.monotonic()
        await asyncio.sleep(15)
        after = await asyncio.to_thread(admin.graph_counters, sbx.user)
        waiting_seconds = time.monotonic() - waiting_started
        assert not any(t.done() for t in tasks), "nothing matched yet"
        # The test kit appends over IMAP: let it in for the delivery alone (the triggers never use IMAP).
        await asyncio.to_thread(admin.update_user, sbx.user, imap_enabled=True)
        try:
            await asyncio.to_thread(deliver, sbx, sbx.user, good_message(sbx.user, subject=subject), folder)
        finally:
            await asyncio.to_thread(admin.update_user, sbx.user, imap_enabled=False)
        await asyncio.wait(tasks, timeout=FIRE_TIMEOUT)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for gen in generators:
            await gen.aclose()
        stop.set()
        await tick
    events = [t.result().payload for t in tasks if not t.cancelled() and t.exception() is None]
    fired = [e for e in events if e["status"] == "success" and e["result"]["messages"][0]["subject"] == subject]
    errors = [e for e in events if e["status"] != "success"] + [
        repr(t.exception()) for t in tasks if not t.cancelled() and t.exception() is not None
    ]
    return {
        "fired": len(fired),
        "errors": errors,
        "elapsed": time.monotonic() - started,
        "requests_while_waiting": after["requests"] - before["requests"],
        "waiting_seconds": waiting_seconds,
        "lag_max": max(lags),
        "polls": state.polls,
    }
