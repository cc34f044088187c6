"""100 deferred sensors of one mailbox in a real triggerer, under Exchange's 20-connection cap (#13).

Before the shared IDLE and the check pool, each trigger held its own IDLE connection and opened
another for every check: 100 sensors against a mailbox capped at 20 connections meant 80 refused
logins and failed tasks. Now the triggerer holds one IDLE connection for the folder and at most
``[o365mail] max_imap_connections_per_mailbox`` (4) for checks, and one delivery fires all 100.
The connections are counted by a TCP proxy in front of Dovecot (the connection points at it).
"""

from __future__ import annotations

import threading
import time
import uuid

from test_imap_deferrable import wait_for_deferred, xcom

from airflow_provider_o365mail.hooks.o365mail import O365MailHook
from airflow_provider_o365mail.testing.fault_proxy import FaultProxy

SENSORS = 100
BUDGET = 4  # the default [o365mail] max_imap_connections_per_mailbox
IDLE_CONNECTIONS = 1  # one folder


def test_a_hundred_deferred_sensors_share_a_handful_of_connections_and_all_fire_on_one_delivery(
    airflow_services, db_connection, o365_sandbox, o365_admin, o365mail_conn
):
    sbx = o365_sandbox
    assert o365_admin.mail_limits()["imap_connections"] == 20, "Exchange's cap is on"
    tag = uuid.uuid4().hex[:8]
    dag_id = f"o365_budget_{tag}"
    with FaultProxy(("127.0.0.1", sbx.imap_port)) as proxy:
        conn_id = db_connection(
            f"o365mail_budget_{tag}", sbx.connection_json(refresh_token=sbx.new_refresh_token(), imap_port=proxy.port)
        )
        waiting_peak: list[int] = []
        sent_at: list[float] = []
        stop = threading.Event()

        def deliver_when_all_deferred() -> None:
            wait_for_deferred(dag_id, SENSORS, timeout=600)
            # The tasks that deferred have exited (their poke's connection with them); what stays open is
            # the triggerer's.
            proxy.wait_for(lambda s: s.active <= IDLE_CONNECTIONS + BUDGET, timeout=60)
            time.sleep(2)
            while not stop.is_set() and not sent_at:
                waiting_peak.append(proxy.stats().active)
                if len(waiting_peak) >= 20:  # 2 s of samples while all 100 wait
                    sent_at.append(time.time())
                    O365MailHook(o365mail_conn).send_email(to=sbx.user, subject=f"{tag} report", text_content="x")
                time.sleep(0.1)
            while not stop.is_set():  # and while they fire
                waiting_peak.append(proxy.stats().active)
                time.sleep(0.05)

        sampler = threading.Thread(target=deliver_when_all_deferred, daemon=True)
        sampler.start()
        try:
            result = airflow_services.dags_test_with_executor(
                dag_id,
                f"""
                from airflow.sdk import dag
                from airflow_provider_o365mail.sensors.imap import O365ImapSensor

                # max_active_tasks: the first pokes run on the worker (one connection each) while the
                # triggerer holds its own; 10 at a time keeps both under the cap of 20.
                @dag(schedule=None, max_active_tasks=10)
                def {dag_id}():
                    for n in range({SENSORS}):
                        # A different max_messages per sensor: no two checks are identical (no coalescing).
                        O365ImapSensor(
                            task_id=f"wait_{{n:03d}}", conn_id={conn_id!r}, subject="{tag} report",
                            max_messages=n + 1, deferrable=True, timeout=900, poke_interval=60,
                        )

                {dag_id}()
                """,
                timeout=1200,
            )
        finally:
            stop.set()
            sampler.join(timeout=10)
    assert sent_at, "the mail was sent once all 100 sensors had deferred:\n" + result.output[-3000:]
    states = result.task_states()
    assert len(states) == SENSORS
    not_fired = {task: state for task, state in states.items() if state != ("success", 1)}
    assert not not_fired, f"{len(not_fired)} sensor(s) did not fire from their trigger: {not_fired}"
    for n in (0, 57, 99):
        (summary,) = xcom(dag_id, f"wait_{n:03d}")
        assert summary["subject"] == f"{tag} report"
    # While the 100 triggers waited and fired: one IDLE connection and at most the budget for checks.
    assert max(waiting_peak) <= IDLE_CONNECTIONS + BUDGET, f"IMAP connections held: {max(waiting_peak)}"
    logs = airflow_services.trigger_logs(dag_id)
    assert "Maximum number of connections" not in logs, "no login was refused by the cap"
