"""O365ImapEventTrigger behind AssetWatchers in a real Airflow (scheduler, dag-processor, triggerer).

DAGs are scheduled on assets whose watchers turn new mail into asset events; the sandbox's
Dovecot counts the IMAP connections the shared stream holds.
"""

from __future__ import annotations

import collections
import time
import uuid
from pathlib import Path

import pytest

from airflow_provider_o365mail.hooks.o365mail import O365MailHook
from airflow_provider_o365mail.imap.pool import SHARED_IDLE_TTL_SECONDS
from airflow_provider_o365mail.testing.airflow_services import wait_until
from airflow_provider_o365mail.testing.sandbox import Sandbox


@pytest.fixture
def event_airflow(airflow_services):
    """The session's api-server and triggerer plus a scheduler and a dag-processor."""
    airflow_services.start("scheduler")
    airflow_services.start("dag-processor")
    airflow_services.wait_healthy("scheduler")
    return airflow_services


def write_dag(name: str, source: str) -> None:
    import os
    import textwrap

    dags = Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    dags.mkdir(parents=True, exist_ok=True)
    (dags / f"{name}.py").write_text(textwrap.dedent(source))


def asset_events(asset_name: str) -> list[dict]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = (
            session.query(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .filter(AssetModel.name == asset_name)
            .order_by(AssetEvent.id)
            .all()
        )
        return [dict(row.extra or {}) for row in rows]


def dag_runs(dag_id: str) -> list[tuple[str, str]]:
    from airflow.models import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        return [(str(r.state), r.run_type) for r in session.query(DagRun).filter(DagRun.dag_id == dag_id)]


def task_xcoms(dag_id: str, task_id: str) -> list:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(XComModel).filter(XComModel.dag_id == dag_id, XComModel.task_id == task_id).all()
        return [row.value for row in rows]


def running_watchers(conn_id: str) -> int:
    """Asset-watcher triggers on ``conn_id`` that a triggerer has picked up."""
    from airflow.models.trigger import Trigger
    from airflow.utils.session import create_session

    with create_session() as session:
        triggers = session.query(Trigger).filter(
            Trigger.triggerer_id.isnot(None), Trigger.classpath.like("%O365ImapEventTrigger")
        )
        return sum(1 for t in triggers if t.kwargs.get("conn_id") == conn_id)


def triggerer_heartbeat() -> float:
    """The live triggerer's last heartbeat (epoch seconds); it beats once per few run-loop cycles."""
    from airflow.jobs.job import Job
    from airflow.utils.session import create_session

    with create_session() as session:
        job = (
            session.query(Job)
            .filter(Job.job_type == "TriggererJob", Job.state == "running")
            .order_by(Job.latest_heartbeat.desc())
            .first()
        )
        return job.latest_heartbeat.timestamp() if job and job.latest_heartbeat else 0.0


def stream_started(services, conn_id: str, count: int = 1) -> bool:
    return services.log_text("triggerer").count(f"IMAP stream {conn_id}/INBOX starts") >= count


def test_a_dag_runs_once_per_matching_message_with_its_summary(event_airflow, db_connection, o365_sandbox):
    sbx = o365_sandbox
    tag = uuid.uuid4().hex[:8]
    conn_id = db_connection(f"o365mail_events_{tag}", sbx.connection_json(refresh_token=sbx.new_refresh_token()))
    write_dag(
        f"o365_invoices_{tag}",
        f"""
        from airflow.sdk import Asset, AssetWatcher, dag, task
        from airflow_provider_o365mail.triggers.imap_events import O365ImapEventTrigger

        invoices = Asset("invoices_{tag}", watchers=[AssetWatcher(
            name="invoice_mail_{tag}",
            trigger=O365ImapEventTrigger(conn_id={conn_id!r}, subject="Invoice {tag}", post_action="seen"),
        )])

        @dag(schedule=[invoices])
        def o365_invoices_{tag}():
            @task
            def handle(triggering_asset_events=None):
                return [e.extra["payload"] for events in triggering_asset_events.values() for e in events]

            handle()

        o365_invoices_{tag}()
        """,
    )
    wait_until(lambda: stream_started(event_airflow, conn_id), 120, "the watcher's IMAP stream")
    hook = O365MailHook(conn_id)
    dag_id = f"o365_invoices_{tag}"
    for number in (1, 2):
        message_id = hook.send_email(to=sbx.user, subject=f"Invoice {tag} #{number}", text_content="x")
        hook.send_email(to=sbx.user, subject=f"Newsletter {tag} #{number}", text_content="not an invoice")
        wait_until(lambda n=number: len([r for r in dag_runs(dag_id) if r[0] == "success"]) >= n, 120, "the DAG run")
        payload = asset_events(f"invoices_{tag}")[-1]["payload"]
        assert payload["message_id"] == message_id and payload["subject"] == f"Invoice {tag} #{number}"
    assert len(asset_events(f"invoices_{tag}")) == 2, "one asset event per matching message"
    assert {run_type for _, run_type in dag_runs(dag_id)} == {"asset_triggered"}
    summaries = [s for value in task_xcoms(dag_id, "handle") for s in value]
    assert sorted(s["subject"] for s in summaries) == [f"Invoice {tag} #1", f"Invoice {tag} #2"]
    assert {"folder", "uid", "uidvalidity", "message_id", "from", "to", "date", "size", "attachments"} <= set(
        summaries[0]
    )
    # post_action="seen" ran after the events were stored: the invoices are read, the newsletters not
    from airflow_provider_o365mail.sensors.imap import O365ImapSensor

    unread = O365ImapSensor(task_id="check", conn_id=conn_id, subject=tag, unseen=True).poke({})
    assert sorted(m["subject"] for m in unread.xcom_value) == [f"Newsletter {tag} #1", f"Newsletter {tag} #2"]


def settled_imap_sessions(sandbox: Sandbox, user: str, readings: int = 4, timeout: float = 30) -> int:
    """The user's IMAP connection count once ``readings`` readings half a second apart agree."""
    deadline = time.monotonic() + timeout
    seen: list[int] = []
    while time.monotonic() < deadline:
        seen = [*seen[-(readings - 1) :], sandbox.imap_sessions(user)]
        if len(seen) == readings and len(set(seen)) == 1:
            return seen[0]
        time.sleep(0.5)
    raise AssertionError(f"{user}'s IMAP connection count never held still: {seen}")


def test_three_watchers_share_one_imap_connection(event_airflow, db_connection, o365_sandbox):
    sbx = o365_sandbox
    tag = uuid.uuid4().hex[:8]
    conn_id = db_connection(f"o365mail_shared_{tag}", sbx.connection_json(refresh_token=sbx.new_refresh_token()))
    sandbox = Sandbox(sbx.state_dir)
    # Earlier tests' watchers of the same mailbox still run in this triggerer and open short-lived
    # read connections when mail arrives: the baseline is their count once it holds still for longer
    # than a returned read connection stays logged in (the pool's shared-budget idle ttl).
    steady = int(2 * SHARED_IDLE_TTL_SECONDS / 0.5) + 1
    before = settled_imap_sessions(sandbox, sbx.user, readings=steady, timeout=60)

    def new_connections() -> int:
        return sandbox.imap_sessions(sbx.user) - before

    watchers = {"invoices": 'subject="Invoice"', "alerts": 'subject="Alert"', "partner": 'sender="partner.test"'}
    assets = "\n".join(
        f'        {name} = Asset("{name}_{tag}", watchers=[AssetWatcher(name="{name}_{tag}", '
        f"trigger=O365ImapEventTrigger(conn_id={conn_id!r}, {criteria}))])"
        for name, criteria in watchers.items()
    )
    write_dag(
        f"o365_shared_{tag}",
        f"""
        from airflow.sdk import Asset, AssetWatcher, dag, task
        from airflow_provider_o365mail.triggers.imap_events import O365ImapEventTrigger

{assets}

        @dag(schedule=(invoices | alerts | partner))
        def o365_shared_{tag}():
            @task
            def noop():
                pass

            noop()

        o365_shared_{tag}()
        """,
    )
    wait_until(lambda: stream_started(event_airflow, conn_id), 120, "the shared IMAP stream")
    wait_until(lambda: running_watchers(conn_id) == 3, 60, "all three watchers running in the triggerer")
    # The stream reads on a short-lived connection and then waits in IDLE on another, so the count
    # settles at 1 once it is in IDLE; one connection per watcher would stay at 3 and time out.
    wait_until(lambda: new_connections() == 1, 30, "three watchers in IDLE on one IMAP connection")
    hook = O365MailHook(conn_id)
    hook.send_email(to=sbx.user, subject=f"Invoice {tag}", text_content="x")
    hook.send_email(to=sbx.user, subject=f"Alert {tag}", text_content="x")
    hook.send_email(to=sbx.user, subject=f"Other {tag}", text_content="x")
    for name, expected in (("invoices", f"Invoice {tag}"), ("alerts", f"Alert {tag}")):
        events = wait_until(lambda n=name: asset_events(f"{n}_{tag}"), 60, f"the {name} event")
        assert [e["payload"]["subject"] for e in events] == [expected]
    assert asset_events(f"partner_{tag}") == [], "mail from the sandbox domain is not from partner.test"
    # Both watchers have handled mail by now, so separate streams would each be back in IDLE on
    # their own connection: still one connection means one stream served all three.
    wait_until(lambda: new_connections() == 1, 30, "the shared stream back in IDLE on one IMAP connection")


def running_triggers(conn_id: str, classname: str) -> int:
    """Triggers of ``classname`` on ``conn_id`` that a triggerer has picked up."""
    from airflow.models.trigger import Trigger
    from airflow.utils.session import create_session

    with create_session() as session:
        triggers = session.query(Trigger).filter(
            Trigger.triggerer_id.isnot(None), Trigger.classpath.like(f"%.{classname}")
        )
        return sum(1 for t in triggers if t.kwargs.get("conn_id") == conn_id)


def task_instance(dag_id: str, task_id: str) -> tuple[str | None, list]:
    """The latest run's ``(state, xcom value)`` of a task."""
    from airflow.models import DagRun, TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        run = session.query(DagRun).filter(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).first()
        if run is None:
            return None, []
        ti = session.query(TaskInstance).filter_by(dag_id=dag_id, run_id=run.run_id, task_id=task_id).first()
        xcoms = session.query(XComModel).filter_by(dag_id=dag_id, run_id=run.run_id, task_id=task_id).all()
        return (str(ti.state) if ti is not None else None), [x.value for x in xcoms]


def settled_idle_sessions(sandbox: Sandbox, user: str, folder: str, readings: int = 10, timeout: float = 60) -> int:
    """The IDLE connections on ``folder`` once ``readings`` readings half a second apart agree (and are not 0:
    IDLE is briefly ended at each renewal)."""
    deadline = time.monotonic() + timeout
    seen: list[int] = []
    while time.monotonic() < deadline:
        seen = [*seen[-(readings - 1) :], sandbox.imap_idle_sessions(user, folder)]
        if len(seen) == readings and len(set(seen)) == 1 and seen[0] > 0:
            return seen[0]
        time.sleep(0.5)
    raise AssertionError(f"the IDLE connections on {folder} never held still: {seen}")


def test_a_deferred_sensor_and_an_asset_watcher_of_one_folder_share_one_idle_connection(
    event_airflow, db_connection, o365_sandbox
):
    """Both wait in this one triggerer process; the server counts the connections in IDLE on the folder."""
    from email.message import EmailMessage
    from email.utils import make_msgid

    sbx = o365_sandbox
    tag = uuid.uuid4().hex[:8]
    conn_id = db_connection(f"o365mail_oneidle_{tag}", sbx.connection_json(refresh_token=sbx.new_refresh_token()))
    folder = f"OneIdle{tag}"  # a folder of its own: earlier tests' watchers IDLE on the INBOX
    hook = O365MailHook(conn_id)
    with hook.imap_client() as client:
        client.create_folder(folder)
    sandbox = Sandbox(sbx.state_dir)
    sensor_dag, watch_dag = f"o365_oneidle_sensor_{tag}", f"o365_oneidle_watch_{tag}"
    write_dag(
        f"o365_oneidle_{tag}",
        f"""
        from datetime import datetime
        from airflow.sdk import Asset, AssetWatcher, dag, task
        from airflow_provider_o365mail.sensors.imap import O365ImapSensor
        from airflow_provider_o365mail.triggers.imap_events import O365ImapEventTrigger

        mail = Asset("oneidle_{tag}", watchers=[AssetWatcher(name="oneidle_{tag}", trigger=O365ImapEventTrigger(
            conn_id={conn_id!r}, folder={folder!r}, subject="Both {tag}"))])

        @dag(schedule=[mail])
        def {watch_dag}():
            @task
            def noop():
                pass

            noop()

        @dag(schedule="@once", start_date=datetime(2025, 1, 1), catchup=False)
        def {sensor_dag}():
            O365ImapSensor(
                task_id="wait", conn_id={conn_id!r}, folders={folder!r}, subject="Both {tag}",
                deferrable=True, timeout=900, poke_interval=60,
            )

        {watch_dag}()
        {sensor_dag}()
        """,
    )
    wait_until(
        lambda: f"IMAP stream {conn_id}/{folder} starts" in event_airflow.log_text("triggerer"),
        180,
        "the watcher's IMAP stream",
    )
    wait_until(lambda: task_instance(sensor_dag, "wait")[0] == "deferred", 180, "the sensor to defer")
    wait_until(lambda: running_triggers(conn_id, "O365ImapTrigger") == 1, 60, "the sensor's trigger in the triggerer")
    assert running_triggers(conn_id, "O365ImapEventTrigger") == 1
    # Both wait in the one triggerer: the sensor's trigger and the watcher's stream on the same folder.
    idle = settled_idle_sessions(sandbox, sbx.user, folder)
    print(f"one sensor and one watcher waiting on {folder}: {idle} IDLE connection(s) at the server")
    assert idle == 1, f"{idle} IDLE connections on {folder} for one sensor and one watcher in one triggerer"

    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = sbx.user, sbx.user, f"Both {tag}"
    message["Message-ID"] = message_id = make_msgid(domain="o365.sandbox.test")
    message.set_content("one delivery, two waiters")
    with hook.imap_client() as client:
        client.append(folder, message.as_bytes())

    state, xcoms = wait_until(
        lambda: (found := task_instance(sensor_dag, "wait"))[0] in ("success", "failed") and found, 120, "the sensor"
    )
    assert state == "success", f"the sensor task ended {state}"
    assert [[m["message_id"] for m in value] for value in xcoms] == [[message_id]], "the sensor returned the message"
    events = wait_until(lambda: asset_events(f"oneidle_{tag}"), 120, "the watcher's asset event")
    assert [e["payload"]["message_id"] for e in events] == [message_id], "one asset event for the one message"
    wait_until(lambda: ("success", "asset_triggered") in dag_runs(watch_dag), 120, "the watcher's DAG run")
    assert len(asset_events(f"oneidle_{tag}")) == 1, "still one asset event once its run is done"


def test_triggerer_killed_mid_burst_loses_nothing(event_airflow, db_connection, o365_sandbox):
    sbx = o365_sandbox
    tag = uuid.uuid4().hex[:8]
    conn_id = db_connection(f"o365mail_burst_{tag}", sbx.connection_json(refresh_token=sbx.new_refresh_token()))
    write_dag(
        f"o365_burst_{tag}",
        f"""
        from airflow.sdk import Asset, AssetWatcher, dag, task
        from airflow_provider_o365mail.triggers.imap_events import O365ImapEventTrigger

        burst = Asset("burst_{tag}", watchers=[AssetWatcher(
            name="burst_{tag}", trigger=O365ImapEventTrigger(conn_id={conn_id!r}, subject="Burst {tag}"))])

        @dag(schedule=[burst])
        def o365_burst_{tag}():
            @task
            def noop():
                pass

            noop()

        o365_burst_{tag}()
        """,
    )
    wait_until(lambda: stream_started(event_airflow, conn_id), 120, "the watcher's IMAP stream")
    hook = O365MailHook(conn_id)
    total = 300
    hook.send_messages([hook.compose(to=sbx.user, subject=f"Burst {tag} {i}", text_content="x") for i in range(total)])
    wait_until(lambda: len(asset_events(f"burst_{tag}")) >= 20, 60, "the first events")
    event_airflow.kill("triggerer")  # SIGKILL, mid-burst
    persisted_at_kill = len(asset_events(f"burst_{tag}"))
    event_airflow.start("triggerer")
    wait_until(
        lambda: len({e["payload"]["message_id"] for e in asset_events(f"burst_{tag}")}) >= total,
        180,
        "every message after the restart",
        interval=2,
    )
    counts = collections.Counter(e["payload"]["subject"] for e in asset_events(f"burst_{tag}"))
    assert set(counts) == {f"Burst {tag} {i}" for i in range(total)}, "no message lost"
    duplicates = sum(n - 1 for n in counts.values())
    print(f"burst of {total}: {persisted_at_kill} persisted at the kill, {duplicates} duplicates after the restart")
    assert duplicates == 0, "messages stored before the kill were not reported again"


def test_revoked_consent_fails_the_watcher_once_with_the_fix(event_airflow, db_connection, o365_sandbox, o365_admin):
    sbx = o365_sandbox
    tag = uuid.uuid4().hex[:8]
    conn_id = db_connection(f"o365mail_revoked_{tag}", sbx.connection_json(refresh_token=sbx.new_refresh_token()))
    write_dag(
        f"o365_revoked_watch_{tag}",
        f"""
        from airflow.sdk import Asset, AssetWatcher, dag, task
        from airflow_provider_o365mail.triggers.imap_events import O365ImapEventTrigger

        watched = Asset("revoked_{tag}", watchers=[AssetWatcher(
            name="revoked_{tag}", trigger=O365ImapEventTrigger(conn_id={conn_id!r}, subject="x", idle_timeout=3))])

        @dag(schedule=[watched])
        def o365_revoked_watch_{tag}():
            @task
            def noop():
                pass

            noop()

        o365_revoked_watch_{tag}()
        """,
    )
    wait_until(lambda: stream_started(event_airflow, conn_id), 120, "the watcher's IMAP stream")
    o365_admin.reset_counters()
    o365_admin.revoke_consent(sbx.user, sbx.client_id)
    o365_admin.update_settings(clock_offset=4000)  # the access token in use has expired at Exchange
    # The message naming the fix is what the user sees: asserted on the log itself.
    fix = f"airflow o365mail authorize --conn-id {conn_id}"
    wait_until(lambda: fix in event_airflow.log_text("triggerer"), 60, "the consent error and its fix in the log")
    assert "AADSTS65001" in event_airflow.log_text("triggerer")
    refused = o365_admin.counters().get("token:refresh_token", 0)
    assert refused >= 1, "the watcher tried its refresh token once the access token was refused"
    # A watcher that failed would be restarted by the triggerer within a cycle or two, and each
    # restart redeems the refresh token again. Wait for a few heartbeats, i.e. well over a
    # restart's worth of triggerer cycles, but less than the parked stream's 60 s re-check.
    beat = triggerer_heartbeat()
    wait_until(lambda: triggerer_heartbeat() >= beat + 15, 50, "three more triggerer heartbeats", interval=1)
    later = o365_admin.counters().get("token:refresh_token", 0)
    assert later == refused, f"the watcher did not park: {refused} then {later} refresh attempts"
