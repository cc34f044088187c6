"""SIGKILL a real Airflow task at many points of a 200-message batch: every message is delivered
exactly once (counted by Message-ID in the recipient's INBOX, and once in the sender's Sent Items,
one copy per accepted submission), none is lost.

The DAG runs as users run it: parsed by the dag-processor, triggered over the REST API, scheduled
by the real scheduler and run by a LocalExecutor worker (the Task SDK supervisor and its task
process). The test SIGKILLs the *task process* (the pid Airflow records for the running try);
the supervisor reports the try failed, Airflow marks it ``up_for_retry`` and the scheduler starts
the next try (``retries``, ``retry_delay=0``), which reads the send ledger and Sent Items.

A kill point is a message position and a phase: ``sending`` (its ledger entry says its transaction
started, so the kill lands inside MAIL/RCPT/DATA or before the ``250`` was recorded) or ``accepted``
(the ``250`` was recorded; the kill lands before the next message, or, for the last one, after the
batch and before Airflow marked the task successful). Each DAG run takes up to 30 kill points in
ascending order, one per try. The universe is every 5th position (and 1 and 200) in both phases,
82 points; CI (and any run) takes 30 of them, always including the first message's transaction and
the end of the batch; ``O365MAIL_FULL_FAULTS=1`` runs all 82.
"""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from test_example_dags_scheduler import Api, running

from airflow_provider_o365mail.core.message_ids import TaskIdentity
from airflow_provider_o365mail.core.send_ledger import ledger_key
from airflow_provider_o365mail.runtime import MetadataDbVariables
from airflow_provider_o365mail.testing.airflow_services import wait_until
from airflow_provider_o365mail.testing.mailbox import fetch_raw_messages, parse

BATCH = 200
FULL = os.environ.get("O365MAIL_FULL_FAULTS") == "1"
SAMPLED = 30
KILLS_PER_RUN = 30
DAG_ID = "o365mail_kill_points"
TASK_ID = "send"
SEED = int(os.environ.get("O365MAIL_FAULT_SEED", str(random.randrange(1 << 30))))

DAG_SOURCE = """
import time
from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_provider_o365mail.operators.smtp import O365SmtpOperator

with DAG("{dag_id}", schedule=None, start_date=datetime(2026, 1, 1), catchup=False, max_active_runs=1):
    O365SmtpOperator(
        task_id="{task_id}",
        conn_id="{conn_id}",
        messages=[{{"subject": "kill {{{{ run_id }}}} #" + str(i), "text_content": "x"}} for i in range({batch})],
        to="{to}",
        retries={retries},
        retry_delay=timedelta(seconds=0),
        # The sandbox stores the Sent Items copy before it answers 250; Exchange's copy can lag.
        sent_items_wait=2,
        # Holds the try for 3 s after the batch, before Airflow records success: the kill point
        # "after the last message" lands there, not in a race with the task's last few milliseconds.
        post_execute=lambda context, result: time.sleep(3),
    )
"""

Point = tuple[int, str]  # (message position 1..BATCH, "sending" | "accepted")
PHASES = ("sending", "accepted")  # the order within one message


def in_order(point: Point) -> tuple[int, int]:
    return point[0], PHASES.index(point[1])


def universe() -> list[Point]:
    positions = sorted({1, BATCH, *range(5, BATCH + 1, 5)})
    return [(p, phase) for p in positions for phase in PHASES]


def planned_points(seed: int) -> list[Point]:
    points = universe()
    if FULL:
        return points
    must = [(1, "sending"), (BATCH, "accepted")]
    rest = [p for p in points if p not in must]
    return sorted([*must, *random.Random(seed).sample(rest, SAMPLED - len(must))], key=in_order)


def runs_of(points: list[Point]) -> list[list[Point]]:
    """Deal the points to DAG runs; within a run they ascend (each try gets further than the last)."""
    n_runs = -(-len(points) // KILLS_PER_RUN)
    return [points[i::n_runs] for i in range(n_runs)]


def reached(entries: dict[str, dict], point: Point) -> bool:
    position, phase = point
    if len(entries) < position:
        return False
    if phase == "sending":
        return True
    accepted = sum(1 for e in entries.values() if e.get("state") == "accepted")
    return accepted >= position


def task_instance(run_id: str):
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        ti = (
            session.query(TaskInstance)
            .filter(TaskInstance.dag_id == DAG_ID, TaskInstance.run_id == run_id, TaskInstance.task_id == TASK_ID)
            .one_or_none()
        )
        return None if ti is None else (str(ti.state), ti.try_number, ti.pid)


class Killer:
    def __init__(self, variables: MetadataDbVariables, run_id: str) -> None:
        self.variables = variables
        self.run_id = run_id
        self.key = ledger_key(TaskIdentity(DAG_ID, run_id, TASK_ID, -1))
        self.landed: list[tuple[Point, int, int]] = []  # (point, ledger entries at the kill, try number)

    def entries(self) -> dict[str, dict]:
        import json

        raw = self.variables.get(self.key)
        return json.loads(raw)["messages"] if raw else {}

    def running_try(self, try_number: int) -> int:
        def running_now():
            ti = task_instance(self.run_id)
            if ti is not None and ti[0] == "running" and ti[1] == try_number and ti[2]:
                return ti[2]
            assert ti is None or ti[0] not in ("success", "failed"), f"try {try_number} never ran: {ti}"
            return None

        return wait_until(running_now, 120, f"try {try_number} of {self.run_id} to run", interval=0.05)

    def kill_at(self, point: Point, try_number: int) -> None:
        pid = self.running_try(try_number)
        deadline = time.monotonic() + 180
        checked = time.monotonic()
        # Every read of the SQLite metadata DB holds off the api-server's writes: poll the ledger
        # every 40 ms (a message takes longer) and the task instance once a second.
        while not reached(entries := self.entries(), point):
            if time.monotonic() - checked > 1:
                ti = task_instance(self.run_id)
                assert ti is not None and ti[0] == "running", f"seed {SEED}: {self.run_id} try {try_number} ended: {ti}"
                checked = time.monotonic()
            assert time.monotonic() < deadline, (
                f"seed {SEED}: {point} not reached in {self.run_id}: {len(entries)} entries"
            )
            time.sleep(0.04)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pytest.fail(f"seed {SEED}: try {try_number} of {self.run_id} ended before the kill at {point}")
        self.landed.append((point, len(self.entries()), try_number))

        def ended():
            ti = task_instance(self.run_id)
            return ti is not None and (ti[1] > try_number or ti[0] in ("up_for_retry", "failed", "success")) and ti

        state = wait_until(ended, 60, f"Airflow to record the killed try {try_number}", interval=0.05)
        assert state[0] != "success", f"seed {SEED}: the try killed at {point} was recorded as success: {state}"


@pytest.fixture(scope="module")
def scheduled(airflow_services):
    started = [name for name in ("scheduler", "dag-processor") if not running(airflow_services, name)]
    airflow_services.start("scheduler")
    airflow_services.start("dag-processor")
    airflow_services.wait_healthy("scheduler")
    yield Api(airflow_services)
    for name in started:
        airflow_services.kill(name, signal.SIGTERM)


@pytest.mark.timeout(1800)
def test_sigkilled_airflow_task_delivers_each_of_200_messages_exactly_once(
    scheduled, db_connection, o365_sandbox, o365mail_conn, record_property
):
    sbx = o365_sandbox
    api = scheduled
    started = time.monotonic()
    conn_id = db_connection(f"kill_{uuid.uuid4().hex[:8]}", os.environ[f"AIRFLOW_CONN_{o365mail_conn.upper()}"])
    runs = runs_of(planned_points(SEED))
    print(f"seed {SEED} (O365MAIL_FAULT_SEED repeats this sample): {sum(map(len, runs))} kill points", flush=True)
    dag_file = Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"]) / f"{DAG_ID}.py"
    dag_file.parent.mkdir(parents=True, exist_ok=True)
    dag_file.write_text(
        DAG_SOURCE.format(
            dag_id=DAG_ID,
            task_id=TASK_ID,
            conn_id=conn_id,
            batch=BATCH,
            to=sbx.second_user,
            retries=max(len(r) for r in runs) + 1,
        )
    )
    try:
        wait_until(lambda: api.client.get(f"/dags/{DAG_ID}").status_code == 200, 180, "the DAG to be parsed", 1)
        api.client.patch(f"/dags/{DAG_ID}", json={"is_paused": False}).raise_for_status()
        variables = MetadataDbVariables()
        landed: list[tuple[Point, int, int]] = []
        for points in runs:
            run_id = api.trigger(DAG_ID)["dag_run_id"]
            killer = Killer(variables, run_id)
            for try_number, point in enumerate(points, start=1):
                killer.kill_at(point, try_number)
            run = api.wait_final(DAG_ID, run_id, timeout=300)
            final = task_instance(run_id)
            assert final is not None and final[1] == len(points) + 1, f"tries of {run_id}: {final}"
            landed.extend(killer.landed)
            counts = delivered(sbx, run_id)
            twice = {mid: n for mid, n in counts.items() if n > 1}
            assert not twice, f"seed {SEED}, {run_id} killed at {killer.landed}: delivered twice {twice}"
            assert len(counts) == BATCH, f"seed {SEED}, {run_id} killed at {killer.landed}: {len(counts)} of {BATCH}"
            submitted = delivered(sbx, run_id, sbx.user, "Sent Items")  # one copy per accepted submission
            assert submitted == Counter(dict.fromkeys(counts, 1)), f"seed {SEED}, {run_id}: submitted {submitted}"
            ids = api.xcom(DAG_ID, run_id, TASK_ID)
            assert sorted(ids) == sorted(counts), "the XCom names the delivered messages"
            print(f"{run['dag_run_id']}: killed at {killer.landed}; {BATCH} delivered once each", flush=True)
        assert len(landed) == sum(map(len, runs)) >= 30
    finally:
        dag_file.unlink()
    duration = time.monotonic() - started
    record_property("kill_points", len(landed))
    record_property("duration_s", round(duration, 1))
    print(f"seed {SEED}: {len(landed)} kill points in {len(runs)} DAG runs, {duration:.0f} s, 0 lost, 0 twice")


def delivered(sbx, run_id: str, upn: str | None = None, folder: str = "INBOX") -> Counter:
    """Message-IDs of this run's messages in ``folder`` of ``upn`` (default the recipient's INBOX),
    once no more arrive."""
    marker = f"kill {run_id} #"

    def counted() -> Counter:
        return Counter(
            m["Message-ID"]
            for m in map(parse, fetch_raw_messages(sbx, upn or sbx.second_user, folder))
            if str(m["Subject"]).startswith(marker)
        )

    seen = wait_until(lambda: (c := counted()) and sum(c.values()) >= BATCH and c, 120, f"{BATCH} messages of {run_id}")
    # Postfix delivers asynchronously: a duplicate could still be queued. Wait until the count has
    # held still for 2 s (there is no queue to ask).
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 2:
        time.sleep(0.5)
        latest = counted()
        if latest != seen:
            seen, quiet_since = latest, time.monotonic()
    return seen
