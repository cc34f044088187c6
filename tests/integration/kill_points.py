"""What the SIGKILL kill-point tests share (SMTP: ``test_smtp_kill_points.py``, Graph:
``test_graph_kill_points.py``): choosing kill points, killing the task process of a real Airflow
try at each, and counting what arrived.

A kill point is a message position and a phase. ``sending``: the message's ledger entry says its
send started (the kill lands inside the transaction or request, or before the acceptance was
recorded). ``accepted``: its acceptance was recorded (the kill lands before the next message or,
for the last one, after the batch and before Airflow marked the task successful). A test may add
phases of its own that come before these two within a message (:attr:`KillPlan.phases`) and wait
for them itself (:meth:`Killer.wait_for`). Each DAG run takes up to ``kills_per_run`` points in
ascending order, one per try; the scheduler runs the next try (``retries``, ``retry_delay=0``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_example_dags_scheduler import Api, running

from airflow_provider_o365mail.core.message_ids import TaskIdentity
from airflow_provider_o365mail.core.send_ledger import ledger_key
from airflow_provider_o365mail.runtime import MetadataDbVariables
from airflow_provider_o365mail.testing.airflow_services import wait_until
from airflow_provider_o365mail.testing.mailbox import imap_session, parse

FULL = os.environ.get("O365MAIL_FULL_FAULTS") == "1"
Point = tuple[int, str]  # (message position 1..batch, phase)
LEDGER_PHASES = ("sending", "accepted")


def fault_seed() -> int:
    return int(os.environ.get("O365MAIL_FAULT_SEED", str(random.randrange(1 << 30))))


@dataclass(frozen=True)
class KillPlan:
    """Which kill points a test takes: every 5th position (and 1 and the last) in both ledger phases,
    plus ``extra`` points; ``sampled`` of them (``must`` always among them), or all with
    ``O365MAIL_FULL_FAULTS=1``."""

    batch: int
    sampled: int
    must: tuple[Point, ...]
    phases: tuple[str, ...] = LEDGER_PHASES  # the order within one message
    extra: tuple[Point, ...] = ()
    kills_per_run: int = 30

    def in_order(self, point: Point) -> tuple[int, int]:
        return point[0], self.phases.index(point[1])

    def universe(self) -> list[Point]:
        positions = sorted({1, self.batch, *range(5, self.batch + 1, 5)})
        grid = [(p, phase) for p in positions for phase in LEDGER_PHASES]
        return sorted({*grid, *self.extra}, key=self.in_order)

    def planned(self, seed: int, full: bool = FULL) -> list[Point]:
        points = self.universe()
        if full:
            return points
        rest = [p for p in points if p not in self.must]
        chosen = random.Random(seed).sample(rest, self.sampled - len(self.must))
        return sorted([*self.must, *chosen], key=self.in_order)

    def runs(self, points: list[Point]) -> list[list[Point]]:
        """Deal the points to DAG runs; within a run they ascend (each try gets further than the last)."""
        n_runs = -(-len(points) // self.kills_per_run)
        return [points[i::n_runs] for i in range(n_runs)]


def reached(entries: dict[str, dict], point: Point) -> bool:
    """The ledger shows the try got to ``point`` (a ``sending`` or ``accepted`` one)."""
    position, phase = point
    if len(entries) < position:
        return False
    if phase == "sending":
        return True
    accepted = sum(1 for e in entries.values() if e.get("state") == "accepted")
    return accepted >= position


def task_instance(dag_id: str, task_id: str, run_id: str):
    """``(state, try_number, pid)`` of the task instance, or None before it exists."""
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        ti = (
            session.query(TaskInstance)
            .filter(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id, TaskInstance.task_id == task_id)
            .one_or_none()
        )
        return None if ti is None else (str(ti.state), ti.try_number, ti.pid)


@dataclass
class Killer:
    """SIGKILLs the task process of one DAG run's tries, one per kill point."""

    variables: MetadataDbVariables
    dag_id: str
    task_id: str
    run_id: str
    seed: int
    landed: list[tuple[Point, int, int]] = field(default_factory=list)  # (point, ledger entries, try number)

    @property
    def key(self) -> str:
        return ledger_key(TaskIdentity(self.dag_id, self.run_id, self.task_id, -1))

    def ti(self):
        return task_instance(self.dag_id, self.task_id, self.run_id)

    def entries(self) -> dict[str, dict]:
        raw = self.variables.get(self.key)
        return json.loads(raw)["messages"] if raw else {}

    def running_try(self, try_number: int) -> int:
        def running_now():
            ti = self.ti()
            if ti is not None and ti[0] == "running" and ti[1] == try_number and ti[2]:
                return ti[2]
            assert ti is None or ti[0] not in ("success", "failed"), f"try {try_number} never ran: {ti}"
            return None

        return wait_until(running_now, 120, f"try {try_number} of {self.run_id} to run", interval=0.05)

    def poll_until(self, done: Callable[[], bool], point: Point, try_number: int, interval: float = 0.04) -> None:
        """Poll ``done`` until it holds, failing when the try ended first or after 180 s."""
        deadline = time.monotonic() + 180
        checked = time.monotonic()
        # Every read of the SQLite metadata DB holds off the api-server's writes: poll often (a message
        # takes longer) and the task instance once a second.
        while not done():
            if time.monotonic() - checked > 1:
                ti = self.ti()
                assert ti is not None and ti[0] == "running", (
                    f"seed {self.seed}: {self.run_id} try {try_number} ended: {ti}"
                )
                checked = time.monotonic()
            assert time.monotonic() < deadline, (
                f"seed {self.seed}: {point} not reached in {self.run_id}: {len(self.entries())} entries"
            )
            time.sleep(interval)

    def prepare(self, point: Point) -> None:
        """Called before the try that ``point`` kills is waited for (e.g. to arm a server-side fault)."""

    def wait_for(self, point: Point, try_number: int) -> None:
        """Return once the running try has got to ``point`` (the ledger phases; override for others)."""
        self.poll_until(lambda: reached(self.entries(), point), point, try_number)

    def after_kill(self, point: Point) -> None:
        """Called right after the SIGKILL (e.g. to let a held request go on)."""

    def kill_at(self, point: Point, try_number: int) -> None:
        self.prepare(point)
        pid = self.running_try(try_number)
        self.wait_for(point, try_number)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pytest.fail(f"seed {self.seed}: try {try_number} of {self.run_id} ended before the kill at {point}")
        finally:
            self.after_kill(point)
        self.landed.append((point, len(self.entries()), try_number))

        def ended():
            ti = self.ti()
            return ti is not None and (ti[1] > try_number or ti[0] in ("up_for_retry", "failed", "success")) and ti

        state = wait_until(ended, 60, f"Airflow to record the killed try {try_number}", interval=0.05)
        assert state[0] != "success", f"seed {self.seed}: the try killed at {point} was recorded as success: {state}"


@pytest.fixture(scope="module", name="scheduled")
def scheduled_fixture(airflow_services):
    """The scheduler and the dag-processor, for this module (stopped after it unless already running)."""
    started = [name for name in ("scheduler", "dag-processor") if not running(airflow_services, name)]
    airflow_services.start("scheduler")
    airflow_services.start("dag-processor")
    airflow_services.wait_healthy("scheduler")
    yield Api(airflow_services)
    for name in started:
        airflow_services.kill(name, signal.SIGTERM)


def subject_marker(run_id: str) -> str:
    """The subject prefix of a run's messages (``DAG_SOURCE`` of each test sends ``kill {run_id} #i``)."""
    return f"kill {run_id} #"


def delivered(sbx, run_id: str, batch: int, upn: str | None = None, folder: str = "INBOX") -> Counter:
    """Message-IDs of this run's messages in ``folder`` of ``upn`` (default the recipient's INBOX),
    once no more arrive."""
    marker = subject_marker(run_id)

    def counted() -> Counter:
        with imap_session(sbx, upn or sbx.second_user) as client:
            client.select_folder(folder, readonly=True)
            uids = client.search(["SUBJECT", marker])
            fetched = client.fetch(uids, ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID SUBJECT)]"]) if uids else {}
        headers = [parse(next(v for k, v in data.items() if k.startswith(b"BODY"))) for data in fetched.values()]
        return Counter(h["Message-ID"] for h in headers if str(h["Subject"]).startswith(marker))

    seen = wait_until(lambda: (c := counted()) and sum(c.values()) >= batch and c, 120, f"{batch} messages of {run_id}")
    # SMTP: Postfix delivers asynchronously, a duplicate could still be queued. Wait until the count
    # has held still for 2 s (there is no queue to ask).
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 2:
        time.sleep(0.5)
        latest = counted()
        if latest != seen:
            seen, quiet_since = latest, time.monotonic()
    return seen


def run_kill_points(
    api: Api,
    sbx,
    *,
    plan: KillPlan,
    seed: int,
    dag_id: str,
    task_id: str,
    dag_source: Callable[[int], str],
    killer: Callable[[str], Killer],
    check_run: Callable[[str], None] = lambda run_id: None,
) -> tuple[list[tuple[Point, int, int]], int, float]:
    """Deploy the DAG (``dag_source(retries)``), kill each DAG run's tries at its points, then check
    that each of ``plan.batch`` messages arrived once in the recipient's INBOX and once in the
    sender's Sent Items, the XCom names them and Airflow recorded one try more than the kills.
    Returns the landed kills, the number of DAG runs and the duration in seconds."""
    started = time.monotonic()
    runs = plan.runs(plan.planned(seed))
    print(f"seed {seed} (O365MAIL_FAULT_SEED repeats this sample): {sum(map(len, runs))} kill points", flush=True)
    dag_file = Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"]) / f"{dag_id}.py"
    dag_file.parent.mkdir(parents=True, exist_ok=True)
    dag_file.write_text(dag_source(max(len(r) for r in runs) + 1))
    landed: list[tuple[Point, int, int]] = []
    try:
        wait_until(lambda: api.client.get(f"/dags/{dag_id}").status_code == 200, 180, "the DAG to be parsed", 1)
        api.client.patch(f"/dags/{dag_id}", json={"is_paused": False}).raise_for_status()
        for points in runs:
            run_id = api.trigger(dag_id)["dag_run_id"]
            kills = killer(run_id)
            for try_number, point in enumerate(points, start=1):
                kills.kill_at(point, try_number)
            api.wait_final(dag_id, run_id, timeout=300)
            final = task_instance(dag_id, task_id, run_id)
            assert final is not None and final[1] == len(points) + 1, f"tries of {run_id}: {final}"
            landed.extend(kills.landed)
            counts = delivered(sbx, run_id, plan.batch)
            twice = {mid: n for mid, n in counts.items() if n > 1}
            assert not twice, f"seed {seed}, {run_id} killed at {kills.landed}: delivered twice {twice}"
            assert len(counts) == plan.batch, (
                f"seed {seed}, {run_id} killed at {kills.landed}: {len(counts)} of {plan.batch}"
            )
            submitted = delivered(sbx, run_id, plan.batch, sbx.user, "Sent Items")  # one copy per accepted send
            assert submitted == Counter(dict.fromkeys(counts, 1)), f"seed {seed}, {run_id}: submitted {submitted}"
            ids = api.xcom(dag_id, run_id, task_id)
            assert sorted(ids) == sorted(counts), "the XCom names the delivered messages"
            check_run(run_id)
            print(f"{run_id}: killed at {kills.landed}; {plan.batch} delivered once each", flush=True)
    finally:
        dag_file.unlink()
    return landed, len(runs), time.monotonic() - started
