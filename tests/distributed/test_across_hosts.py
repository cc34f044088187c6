"""The provider's guarantees on a CeleryExecutor deployment of several hosts (issue #24).

Each test counts at the servers: refreshes at the Entra stand-in, Message-IDs in the mailbox over
IMAP, concurrent connections at the counting proxies in front of Dovecot and Postfix.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter

import pytest
from conftest import SHARED_IMAP_BUDGET, SHARED_SMTP_BUDGET, in_deployment, sql, task_rows, trigger, wait_run, write_dag

from airflow_provider_o365mail.testing.mailbox import imap_session, parse

pytestmark = pytest.mark.skipif(
    not os.environ.get("O365MAIL_DIST_STATE"), reason="the multi-host deployment: run scripts/distributed-test.sh"
)
SENSORS = int(os.environ.get("O365MAIL_DIST_SENSORS", "1000"))


def hosts_of(rows: list[dict]) -> Counter:
    return Counter(r["hostname"] for r in rows)


@pytest.mark.timeout(1800)
def test_twenty_tasks_on_two_hosts_refresh_once_under_strict_rotation(deployment, add_connection, o365_sandbox):
    sbx, admin = o365_sandbox, o365_sandbox.admin()
    conn_id = add_connection(
        f"dist_refresh_{uuid.uuid4().hex[:6]}", sbx.connection_json(refresh_token=sbx.new_refresh_token())
    )
    admin.update_settings(strict_rotation=True)
    admin.reset_counters()
    dag_id = f"dist_refresh_{uuid.uuid4().hex[:6]}"
    write_dag(
        deployment,
        dag_id,
        f"""
        from datetime import datetime
        from airflow.sdk import dag, task

        @dag(schedule=None, start_date=datetime(2026, 1, 1), catchup=False, max_active_tasks=20)
        def {dag_id}():
            @task(retries=0)
            def token(n):
                import socket, time
                from airflow_provider_o365mail.hooks.o365mail import O365MailHook
                time.sleep(max(0.0, 20 - time.time() % 20))  # start together (the next 20-second mark)
                return [socket.gethostname(), O365MailHook({conn_id!r}).access_token().source]
            token.expand(n=list(range(20)))

        {dag_id}()
    """,
    )
    try:
        run_id = trigger(deployment, dag_id)
        state = wait_run(deployment, dag_id, run_id, timeout=1200)
        rows = task_rows(deployment, dag_id, run_id)
        refreshes = admin.counters().get("token:refresh_token", 0)
        print(
            f"refresh test: {len(rows)} tasks on {dict(hosts_of(rows))}, {refreshes} refresh(es) at the Entra stand-in"
        )
        assert state == "success", rows
        assert len(rows) == 20 and {r["state"] for r in rows} == {"success"}
        assert {"w1", "w2"} <= set(hosts_of(rows)), f"the tasks ran on both worker hosts: {hosts_of(rows)}"
        assert refreshes == 1, f"one refresh for 20 tasks on two hosts, not {refreshes}"
        # The grant is intact: strict rotation saw no second redemption of one refresh token (a revoked
        # grant fails this refresh with invalid_grant).
        source = in_deployment(
            deployment,
            f"""
            from airflow_provider_o365mail.hooks.o365mail import O365MailHook
            print(O365MailHook({conn_id!r}).access_token(force_refresh=True).source)
        """,
        )
        assert source == "identity_provider"
    finally:
        admin.update_settings(strict_rotation=False)


@pytest.mark.timeout(3600)
def test_deferred_and_poking_sensors_of_one_mailbox_on_every_host_stay_within_its_shared_budget(
    deployment, add_connection, o365_sandbox, proxies
):
    sbx = o365_sandbox
    imap, smtp = proxies["imap"], proxies["smtp"]
    conn_json = sbx.connection_json(refresh_token=sbx.new_refresh_token(), imap_port=imap.port, smtp_port=smtp.port)
    tag = uuid.uuid4().hex[:8]
    # Two connection ids of the same mailbox: one budget.
    conn_a = add_connection(f"dist_budget_a_{tag}", conn_json)
    conn_b = add_connection(f"dist_budget_b_{tag}", conn_json)
    dag_id = f"dist_budget_{tag}"
    # Poking sensors keep their pooled session (and its slot) between pokes, and each triggerer holds
    # one IDLE session per connection id and folder: 2 x 2 + 2 persistent connections, under the budget.
    pokers = 2
    senders = 6
    write_dag(
        deployment,
        dag_id,
        f"""
        from datetime import datetime
        from airflow.sdk import dag
        from airflow_provider_o365mail.operators.smtp import O365SmtpOperator
        from airflow_provider_o365mail.sensors.imap import O365ImapSensor

        @dag(schedule=None, start_date=datetime(2026, 1, 1), catchup=False, max_active_tasks=64)
        def {dag_id}():
            conns = [{conn_a!r}, {conn_b!r}]
            for n in range({SENSORS}):
                # A different max_messages per sensor: no two checks are identical (no coalescing).
                O365ImapSensor(task_id=f"deferred_{{n:04d}}", conn_id=conns[n % 2], subject="{tag} report",
                               max_messages=n + 1, deferrable=True, timeout=3000, poke_interval=60,
                               # a first poke that waited 5 min for a slot fails with a retried error
                               retries=3)
            for n in range({pokers}):
                O365ImapSensor(task_id=f"poking_{{n}}", conn_id=conns[n % 2], subject="{tag} report",
                               max_messages=5000 + n, mode="poke", poke_interval=2, timeout=3000)
            for n in range({senders}):
                O365SmtpOperator(task_id=f"send_{{n}}", conn_id=conns[n % 2], to="{sbx.second_user}",
                                 messages=[{{"subject": f"{tag} batch {{n}} #{{i}}", "text_content": "x"}}
                                           for i in range(40)])

        {dag_id}()
    """,
    )
    imap.reset_peak()
    smtp.reset_peak()
    peaks: list[tuple[int, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peaks.append((imap.stats().active, smtp.stats().active))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run_id = trigger(deployment, dag_id)
        deadline = time.monotonic() + 3000
        while True:
            deferred = int(sql(deployment, f"select count(*) from task_instance where dag_id = '{dag_id}' "
                                           "and state = 'deferred'")[0][0])  # fmt: skip
            if deferred >= SENSORS or time.monotonic() > deadline:
                break
            time.sleep(5)
        triggerers = sql(deployment, "select t.triggerer_id, count(*) from trigger t join task_instance ti on "
                                     f"ti.trigger_id = t.id where ti.dag_id = '{dag_id}' group by 1")  # fmt: skip
        print(f"budget test: {deferred} deferred sensors, per triggerer job id: {triggerers}")
        assert deferred == SENSORS
        assert len(triggerers) >= 2, f"the triggers are spread over both triggerers: {triggerers}"
        time.sleep(10)
        in_deployment(
            deployment,
            f"""
            from airflow_provider_o365mail.hooks.o365mail import O365MailHook
            O365MailHook({conn_a!r}).send_email(to={sbx.user!r}, subject="{tag} report", text_content="x")
        """,
        )
        state = wait_run(deployment, dag_id, run_id, timeout=3000)
    finally:
        stop.set()
        sampler.join(timeout=10)
        print(f"budget test: peak IMAP {imap.stats().max_concurrent}, SMTP {smtp.stats().max_concurrent} so far")
    rows = task_rows(deployment, dag_id, run_id)
    imap_peak, smtp_peak = imap.stats().max_concurrent, smtp.stats().max_concurrent
    print(
        f"budget test: {len(rows)} tasks, {dict(Counter(r['state'] for r in rows))}, task hosts "
        f"{dict(hosts_of(rows))}; peak IMAP connections of {sbx.user} at the server {imap_peak} "
        f"(shared budget {SHARED_IMAP_BUDGET}), peak SMTP sessions {smtp_peak} (budget {SHARED_SMTP_BUDGET})"
    )
    assert state == "success", [r for r in rows if r["state"] != "success"][:20]
    assert {"w1", "w2"} <= set(hosts_of(rows))
    assert imap_peak <= SHARED_IMAP_BUDGET, f"{imap_peak} IMAP connections of one mailbox at once across hosts"
    assert smtp_peak <= SHARED_SMTP_BUDGET, f"{smtp_peak} SMTP sessions of one mailbox at once across hosts"
    logs = "\n".join(
        deployment.log(n) for n in ("t1-triggerer", "t2-triggerer", "w1-celery-worker", "w2-celery-worker")
    )
    assert "Maximum number of connections" not in logs


@pytest.mark.timeout(1800)
def test_a_batch_whose_worker_host_is_killed_is_finished_on_the_other_host_each_message_once(
    deployment, add_connection, o365_sandbox
):
    sbx = o365_sandbox
    tag = uuid.uuid4().hex[:6]
    conn_id = add_connection(f"dist_kill_{tag}", sbx.connection_json(refresh_token=sbx.new_refresh_token()))
    dag_id = f"dist_kill_{tag}"
    batch = 200
    write_dag(
        deployment,
        dag_id,
        f"""
        from datetime import datetime, timedelta
        from airflow.sdk import DAG
        from airflow_provider_o365mail.operators.smtp import O365SmtpOperator

        with DAG("{dag_id}", schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
            O365SmtpOperator(
                task_id="send", conn_id="{conn_id}", to="{sbx.second_user}", retries=2,
                retry_delay=timedelta(seconds=0), sent_items_wait=2,
                messages=[{{"subject": "kill {{{{ run_id }}}} #" + str(i), "text_content": "x"}} for i in range({batch})],
            )
    """,
    )
    deployment.kill("w2-celery-worker", 15)  # the first try can only run on w1
    run_id = trigger(deployment, dag_id)
    marker = f"kill {run_id} #"

    def message_ids() -> Counter:
        with imap_session(sbx, sbx.second_user) as client:
            client.select_folder("INBOX", readonly=True)
            uids = client.search(["SUBJECT", marker])
            fetched = client.fetch(uids, ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID SUBJECT)]"]) if uids else {}
        headers = [parse(next(v for k, v in d.items() if k.startswith(b"BODY"))) for d in fetched.values()]
        return Counter(h["Message-ID"] for h in headers if str(h["Subject"]).startswith(marker))

    deadline = time.monotonic() + 900
    while sum(message_ids().values()) < 20:
        assert time.monotonic() < deadline, "the batch did not start on w1"
        time.sleep(0.3)
    deployment.start("w2", ["celery", "worker"])
    deployment.kill("w1-celery-worker")  # SIGKILL: the worker host dies with its task mid-batch
    at_kill = sum(message_ids().values())
    try:
        state = wait_run(deployment, dag_id, run_id, timeout=1500)
    finally:
        deployment.start("w1", ["celery", "worker"])
    seen = message_ids()
    quiet = time.monotonic()
    while time.monotonic() - quiet < 5:  # Postfix delivers asynchronously: wait until the count holds still
        time.sleep(1)
        latest = message_ids()
        if latest != seen:
            seen, quiet = latest, time.monotonic()
    rows = task_rows(deployment, dag_id, run_id)
    twice = {mid: n for mid, n in seen.items() if n > 1}
    print(
        f"kill test: {at_kill} of {batch} delivered when w1 was killed; then {rows}; {len(seen)} distinct "
        f"Message-IDs, {sum(seen.values())} messages, {len(twice)} duplicate(s)"
    )
    assert at_kill < batch, "the worker was killed mid-batch"
    assert state == "success", rows
    (row,) = rows
    assert row["hostname"] == "w2" and int(row["try_number"]) >= 2, row
    assert not twice, f"delivered more than once: {twice}"
    assert len(seen) == batch, f"{batch - len(seen)} message(s) lost"
