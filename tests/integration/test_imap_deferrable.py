"""The deferrable sensor in a real ``airflow triggerer`` (LocalExecutor, Task SDK over HTTP)."""

from __future__ import annotations

import threading
import time
import uuid

from airflow_provider_o365mail.hooks.o365mail import O365MailHook

# Upper bound between sending a sensor's mail and its task ending (see the test for why it is loose).
WAKE_BOUND_SECONDS = 90.0


def wait_for_deferred(dag_id: str, count: int, timeout: float = 90.0) -> None:
    """Until ``count`` tasks of ``dag_id`` are deferred (their triggers exist), ignoring other DAGs' leftovers."""
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with create_session() as session:
            deferred = (
                session.query(TaskInstance)
                .filter(TaskInstance.dag_id == dag_id, TaskInstance.state == "deferred")
                .count()
            )
        if deferred >= count:
            return
        time.sleep(0.5)
    raise AssertionError(f"{count} task(s) of {dag_id} did not defer")


def end_dates(dag_id: str) -> dict[str, float]:
    """``{task_id: end_date}`` (epoch seconds) of the latest run's task instances."""
    from airflow.models import DagRun, TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        run = session.query(DagRun).filter(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).first()
        tis = session.query(TaskInstance).filter(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run.run_id)
        return {ti.task_id: ti.end_date.timestamp() for ti in tis if ti.end_date is not None}


def xcom(dag_id: str, task_id: str):
    from airflow.models import DagRun
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        run = session.query(DagRun).filter(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).first()
        row = (
            session.query(XComModel)
            .filter(XComModel.dag_id == dag_id, XComModel.run_id == run.run_id, XComModel.task_id == task_id)
            .first()
        )
        return row.value if row else None


def test_three_deferred_sensors_wake_on_idle_push_in_the_triggerer(
    airflow_services, db_connection, o365_sandbox, o365mail_conn
):
    sbx = o365_sandbox
    conn_id = db_connection(
        f"o365mail_deferred_{uuid.uuid4().hex[:6]}", sbx.connection_json(refresh_token=sbx.new_refresh_token())
    )
    tag = uuid.uuid4().hex[:8]
    dag_id = f"o365_deferred_{tag}"
    sent_at: dict[str, float] = {}

    def send_when_deferred():
        wait_for_deferred(dag_id, 3)
        hook = O365MailHook(o365mail_conn)
        for name in ("alpha", "beta", "gamma"):
            sent_at[name] = time.time()
            hook.send_email(to=sbx.user, subject=f"{tag} {name}", text_content=name)

    sender = threading.Thread(target=send_when_deferred, daemon=True)
    sender.start()
    result = airflow_services.dags_test_with_executor(
        dag_id,
        f"""
        from airflow.sdk import dag
        from airflow_provider_o365mail.sensors.imap import O365ImapSensor

        @dag(schedule=None)
        def {dag_id}():
            for name in ("alpha", "beta", "gamma"):
                O365ImapSensor(
                    task_id=f"wait_{{name}}", conn_id={conn_id!r}, subject=f"{tag} {{name}}",
                    deferrable=True, timeout=180, poke_interval=60,
                )

        {dag_id}()
        """,
    )
    sender.join(timeout=5)
    assert result.returncode == 0, result.output[-4000:]
    # The sender records a time only after all three sensors deferred: the mail did not exist when
    # they poked, so each could only have found it through its trigger.
    assert set(sent_at) == {"alpha", "beta", "gamma"}, "the mail was sent once all three sensors deferred"
    states = result.task_states()
    assert states == {f"wait_{name}": ("success", 1) for name in sent_at}, "resumed from the trigger, no retry"
    ended = end_dates(dag_id)
    for name in ("alpha", "beta", "gamma"):
        (summary,) = xcom(dag_id, f"wait_{name}")
        assert summary["subject"] == f"{tag} {name}"
        # Woken by the IDLE push: without it the trigger would only look again when IDLE is
        # re-issued (25 min) and the sensor would time out (180 s). The bound is generous on purpose
        # (a push takes about a second; the rest is the worker resuming on a busy machine).
        waited = ended[f"wait_{name}"] - sent_at[name]
        assert 0 < waited < WAKE_BOUND_SECONDS, f"wait_{name} ended {waited:.1f} s after its mail was sent"


def test_revoked_consent_ends_the_trigger_with_the_fix(airflow_services, db_connection, o365_sandbox, o365_admin):
    sbx = o365_sandbox
    conn_id = db_connection(
        f"o365mail_revoked_{uuid.uuid4().hex[:6]}", sbx.connection_json(refresh_token=sbx.new_refresh_token())
    )
    dag_id = f"o365_deferred_revoked_{uuid.uuid4().hex[:6]}"

    def revoke_when_deferred():
        wait_for_deferred(dag_id, 1)
        o365_admin.reset_counters()
        o365_admin.revoke_consent(sbx.user, sbx.client_id)
        o365_admin.update_settings(clock_offset=4000)  # the stored access token is now expired at Exchange

    threading.Thread(target=revoke_when_deferred, daemon=True).start()
    result = airflow_services.dags_test_with_executor(
        dag_id,
        f"""
        from datetime import timedelta
        from airflow.sdk import dag
        from airflow_provider_o365mail.sensors.imap import O365ImapSensor

        @dag(schedule=None)
        def {dag_id}():
            O365ImapSensor(
                task_id="wait", conn_id={conn_id!r}, subject="never arrives", deferrable=True, timeout=300,
                idle_timeout=3, retries=2, retry_delay=timedelta(seconds=1),
            )

        {dag_id}()
        """,
    )
    assert result.task_states()["wait"] == ("failed", 1), result.output[-4000:]
    logs = airflow_services.trigger_logs(dag_id)
    # The message naming the fix is the contract users see: it is asserted on the log itself.
    assert "AADSTS65001" in logs and f"airflow o365mail authorize --conn-id {conn_id}" in logs
    # Every reconnect would redeem the refresh token again (and be refused): the identity provider's
    # own count shows the trigger stopped at the first refusal instead of looping until the timeout.
    refreshes = o365_admin.counters().get("token:refresh_token", 0)
    assert 1 <= refreshes <= 2, f"{refreshes} refresh attempts after the consent was revoked"
