"""The triggerer SIGKILLed while deferrable Graph sensors wait and a burst of mail arrives: nothing lost,
nothing repeated.

One DAG run (``airflow dags test --use-executor``: LocalExecutor, Task SDK over HTTP, the real
``airflow triggerer``) of a chain of deferrable sensors reading one folder over Microsoft Graph, all
one watch (``new_only``, one ``watermark_id``, ``post_action="seen"``): each task instance reserves
what its trigger found, and the next one confirms it (post-action, watermark) once Airflow recorded
it successful. A last, poke-mode sensor of the same watch (``soft_fail``) confirms the chain's last
reservation and takes what is left. Whenever the chain's current sensor is deferred, a burst of 8
messages is APPENDed over IMAP, 0.1 s apart (the trigger fires on the first ones; the rest is
found by the next sensor's first poke); in the middle of the burst to the first deferred sensor
after ``wait_0`` the triggerer is SIGKILLed and started again (the dead one's triggers run again in
the new one, which Airflow assigns them to once the dead one's heartbeat is stale).

Counted by Message-ID: every message APPENDed is in the XCom of exactly one successful sensor; the
``\\Seen`` flag is on exactly the messages of the confirmed sensors (all but a last one that found
mail, whose reservation a next run would confirm). The test drives the trigger only through Airflow
(the deferral, its event, ``execute_complete``), so it holds for any way the trigger waits.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

from test_imap_sensor import raw_message

from airflow_provider_o365mail.testing.mailbox import imap_session

WAITS = 3
MAX_MESSAGES = 100
BURST = 8  # messages APPENDed 0.1 s apart to each deferred sensor


def task_states(dag_id: str) -> dict[str, str]:
    """``{task_id: state}`` of the DAG's latest run."""
    from airflow.models import DagRun, TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        run = session.query(DagRun).filter(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).first()
        if run is None:
            return {}
        tis = session.query(TaskInstance).filter(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run.run_id)
        return {ti.task_id: str(ti.state) for ti in tis}


def xcoms(dag_id: str) -> dict[str, list[dict]]:
    """``{task_id: XCom return value}`` of the DAG's latest run."""
    from airflow.models import DagRun
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        run = session.query(DagRun).filter(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).first()
        rows = session.query(XComModel).filter(
            XComModel.dag_id == dag_id, XComModel.run_id == run.run_id, XComModel.key == "return_value"
        )
        return {row.task_id: row.value for row in rows}


def test_triggerer_killed_mid_burst_loses_and_repeats_nothing_over_graph(
    airflow_services, db_connection, o365_sandbox, o365_admin
):
    sbx = o365_sandbox
    tag = uuid.uuid4().hex[:8]
    folder = f"GBurst {tag}"
    with imap_session(sbx, sbx.user) as client:
        client.create_folder(folder)
    conn_id = db_connection(
        f"o365mail_gburst_{tag}",
        sbx.connection_json(refresh_token=sbx.new_refresh_token(), transport="graph", graph_url=sbx.graph_url),
    )
    dag_id = f"o365_graph_burst_{tag}"
    waits = [f"wait_{i}" for i in range(WAITS)]
    sent: list[str] = []
    killed: list[str] = []
    problems: list[BaseException] = []

    def burst() -> None:
        """A burst of mail whenever the chain's current sensor is deferred; the triggerer SIGKILLed (and
        started again) in the middle of the burst to the first deferred sensor after ``wait_0``."""
        try:
            with imap_session(sbx, sbx.user) as client:
                burst_to: set[str] = set()
                deadline = time.monotonic() + 480
                while time.monotonic() < deadline:
                    states = task_states(dag_id)
                    if all(states.get(w) == "success" for w in waits) or "failed" in states.values():
                        return
                    current = next(w for w in waits if states.get(w) != "success")
                    if states.get(current) != "deferred" or current in burst_to:
                        time.sleep(0.3)
                        continue
                    burst_to.add(current)
                    for i in range(BURST):
                        if i == BURST // 2 and not killed and current != "wait_0":
                            airflow_services.kill("triggerer")  # SIGKILL, mid-burst, a sensor waiting in it
                            killed.append(f"waiting {current}, {len(sent)} messages sent")
                            airflow_services.start("triggerer")
                        message_id = f"<{tag}.{len(sent)}@partner.test>"
                        client.append(folder, raw_message(f"gburst {tag}", message_id=message_id))
                        sent.append(message_id)
                        time.sleep(0.1)
        except BaseException as err:  # the test thread reports it
            problems.append(err)

    producer = threading.Thread(target=burst, daemon=True)
    producer.start()
    result = airflow_services.dags_test_with_executor(
        dag_id,
        f"""
        from datetime import timedelta

        from airflow.sdk import chain, dag
        from airflow_provider_o365mail.sensors.imap import O365ImapSensor

        WATCH = dict(
            conn_id={conn_id!r}, transport="graph", folders={folder!r}, new_only=True, post_action="seen",
            watermark_id="gburst-{tag}",
        )

        @dag(schedule=None)
        def {dag_id}():
            waits = [
                O365ImapSensor(
                    task_id=f"wait_{{i}}", deferrable=True, max_messages={MAX_MESSAGES}, poll_interval=1,
                    timeout=300, **WATCH,
                )
                for i in range({WAITS})
            ]
            drain = O365ImapSensor(
                task_id="drain", mode="poke", poke_interval=1, timeout=5, soft_fail=True, max_messages=500,
                **WATCH,
            )
            chain(*waits, drain)

        {dag_id}()
        """,
        timeout=600,
    )
    producer.join(timeout=30)
    assert not problems, problems
    assert result.returncode == 0, result.output[-4000:]
    assert killed, "the triggerer was not killed while a sensor waited"
    states = task_states(dag_id)
    assert all(states[w] == "success" for w in waits), states
    returned = xcoms(dag_id)
    reported = Counter(m["message_id"] for task, messages in returned.items() for m in messages or [])
    lost = set(sent) - set(reported)
    assert not lost, f"lost {sorted(lost)} (triggerer killed {killed[0]})"
    repeated = {m: n for m, n in reported.items() if n > 1}
    assert not repeated, f"reported by two task instances: {repeated}"
    assert set(reported) == set(sent), "nothing reported that was not sent"
    # Confirmed: every sensor's messages but the drain's, if it found any (a next run would confirm them).
    confirmed = {m["message_id"] for task, messages in returned.items() if task != "drain" for m in messages or []}
    with imap_session(sbx, sbx.user) as client:
        client.select_folder(folder, readonly=True)
        fetched = client.fetch(client.search(["ALL"]), ["ENVELOPE", "FLAGS"]).values()
    seen = {d[b"ENVELOPE"].message_id.decode() for d in fetched if b"\\Seen" in d[b"FLAGS"]}
    assert seen == confirmed, f"post-action on {seen - confirmed}, missing on {confirmed - seen}"
    print(
        f"graph burst: {len(sent)} messages, triggerer killed {killed[0]}; {len(returned)} sensors reported "
        f"{sum(reported.values())} (drain: {len(returned.get('drain') or [])}), 0 lost, 0 repeated"
    )
