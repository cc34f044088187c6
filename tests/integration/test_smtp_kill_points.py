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
import uuid

import pytest
from kill_points import Killer, KillPlan, fault_seed, run_kill_points, scheduled_fixture  # noqa: F401 (a fixture)

from airflow_provider_o365mail.runtime import MetadataDbVariables

BATCH = 200
SAMPLED = 30
DAG_ID = "o365mail_kill_points"
TASK_ID = "send"
SEED = fault_seed()
PLAN = KillPlan(batch=BATCH, sampled=SAMPLED, must=((1, "sending"), (BATCH, "accepted")))

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


@pytest.mark.timeout(1800)
def test_sigkilled_airflow_task_delivers_each_of_200_messages_exactly_once(
    scheduled, db_connection, o365_sandbox, o365mail_conn, record_property
):
    sbx = o365_sandbox
    conn_id = db_connection(f"kill_{uuid.uuid4().hex[:8]}", os.environ[f"AIRFLOW_CONN_{o365mail_conn.upper()}"])
    variables = MetadataDbVariables()
    landed, n_runs, duration = run_kill_points(
        scheduled,
        sbx,
        plan=PLAN,
        seed=SEED,
        dag_id=DAG_ID,
        task_id=TASK_ID,
        dag_source=lambda retries: DAG_SOURCE.format(
            dag_id=DAG_ID, task_id=TASK_ID, conn_id=conn_id, batch=BATCH, to=sbx.second_user, retries=retries
        ),
        killer=lambda run_id: Killer(variables, DAG_ID, TASK_ID, run_id, SEED),
    )
    assert len(landed) == len(PLAN.planned(SEED)) >= 30
    record_property("kill_points", len(landed))
    record_property("duration_s", round(duration, 1))
    print(f"seed {SEED}: {len(landed)} kill points in {n_runs} DAG runs, {duration:.0f} s, 0 lost, 0 twice")
