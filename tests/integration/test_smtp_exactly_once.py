"""Exactly once against the sandbox (Postfix + milter + Dovecot): lost replies checked in Sent Items,
a task retry after 451s skips what was sent, concurrent tasks of one mailbox within a recipient budget.

Every assertion counts messages by Message-ID in the recipient's mailbox."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections import Counter
from types import SimpleNamespace

import pytest

from airflow_provider_o365mail.core.message_ids import TaskIdentity
from airflow_provider_o365mail.core.recipient_budget import RecipientBudget, budget_key
from airflow_provider_o365mail.core.send_ledger import SendLedger, ledger_key
from airflow_provider_o365mail.exceptions import MailServerError, RecipientBudgetExceeded
from airflow_provider_o365mail.hooks.o365mail import O365MailHook
from airflow_provider_o365mail.operators.smtp import O365SmtpOperator
from airflow_provider_o365mail.retry import Backoff
from airflow_provider_o365mail.runtime import MetadataDbVariables
from airflow_provider_o365mail.testing.airflow_services import wait_until
from airflow_provider_o365mail.testing.mailbox import fetch_raw_messages, parse, wait_for_messages

QUICK = Backoff(first=0.2, maximum=0.5, attempts=2, jitter=(1.0, 1.0))


def identity(tag: str) -> TaskIdentity:
    return TaskIdentity("exactly_once", f"manual__{tag}", "send", -1)


def ids_in(sbx, upn: str, tag: str, folder: str = "INBOX") -> Counter:
    return Counter(
        m["Message-ID"] for m in map(parse, fetch_raw_messages(sbx, upn, folder)) if tag in str(m["Subject"])
    )


@pytest.mark.parametrize("lag", [0.0, 3.0])
def test_a_lost_reply_after_the_dot_is_found_in_sent_items_and_delivered_once(
    o365mail_conn, o365_sandbox, o365_admin, lag
):
    sbx = o365_sandbox
    tag = uuid.uuid4().hex[:8]
    if lag:
        o365_admin.set_limits(sent_items_lag=lag)  # Exchange's copy can lag: the sender waits for it
    o365_admin.lose_smtp_reply(count=1, mailbox=sbx.user)
    hook = O365MailHook(o365mail_conn)
    ti = identity(tag)
    planned = hook.plan([{"to": sbx.user, "subject": f"{tag} #{i}", "text_content": "x"} for i in range(3)], ti)
    results = hook.send_messages(planned, identity=ti, retry=QUICK, sent_items_wait=15)
    ids = [p.message_id for p in planned]
    assert [r.message_id for r in results] == ids
    assert o365_admin.smtp_state()["lost_replies"].get(sbx.user, 0) >= 1  # the fault did happen
    wait_for_messages(sbx, sbx.user, lambda m: tag in str(m["Subject"]), count=3)
    assert ids_in(sbx, sbx.user, tag) == Counter(ids)  # each exactly once
    wait_for_messages(sbx, sbx.user, lambda m: tag in str(m["Subject"]), count=3, folder="Sent Items")
    assert ids_in(sbx, sbx.user, tag, "Sent Items") == Counter(ids)
    kept = json.loads(MetadataDbVariables().get(ledger_key(ti)) or "{}")  # kept after the batch, marked complete
    assert kept.get("complete") and {e["state"] for e in kept["messages"].values()} == {"accepted"}


def test_a_task_retry_after_451s_sends_the_rest_once_with_the_same_message_ids(
    o365mail_conn, o365_sandbox, o365_admin, monkeypatch
):
    """5 messages; message 3 gets 451 twice (max_send_attempts=2): the try fails, the retry completes."""
    sbx = o365_sandbox
    tag = uuid.uuid4().hex[:8]
    ti = SimpleNamespace(dag_id="exactly_once", run_id=f"manual__{tag}", task_id="send", map_index=-1)
    record = SendLedger.record
    faulted: list[bool] = []

    def record_then_fault(self, message_id, state, recipients, **kwargs):
        record(self, message_id, state, recipients, **kwargs)
        accepted = [e for e in self.entries().values() if e["state"] == "accepted"]
        if len(accepted) == 2 and not faulted:  # once for the whole test (the retry has its own ledger object)
            faulted.append(True)
            o365_admin.inject_smtp_reply("451 4.7.0 Temporary server error. Please try again later", count=2)

    monkeypatch.setattr(SendLedger, "record", record_then_fault)
    operator = O365SmtpOperator(
        task_id="send",
        conn_id=o365mail_conn,
        to=sbx.user,
        text_content="x",
        messages=[{"subject": f"{tag} #{i}"} for i in range(5)],
        max_send_attempts=2,
    )
    with pytest.raises(MailServerError, match="failed 2 times"):
        operator.execute(context={"ti": ti})
    wait_for_messages(sbx, sbx.user, lambda m: tag in str(m["Subject"]), count=2)
    first_try = ids_in(sbx, sbx.user, tag)
    ledger = json.loads(MetadataDbVariables().get(ledger_key(TaskIdentity.of(ti))) or "{}")["messages"]
    assert sorted(e["state"] for e in ledger.values()) == ["accepted", "accepted", "partial"]  # 451: not delivered
    ids = operator.execute(context={"ti": ti})  # Airflow's retry: same task instance
    wait_for_messages(sbx, sbx.user, lambda m: tag in str(m["Subject"]), count=5)
    assert ids_in(sbx, sbx.user, tag) == Counter(ids) and len(set(ids)) == 5
    assert set(first_try) == set(ids[:2])  # the retry returned the first try's Message-IDs


def test_concurrent_tasks_of_one_mailbox_hold_the_recipient_budget_exactly(
    o365mail_conn, o365_sandbox, o365_admin, monkeypatch
):
    sbx = o365_sandbox
    tag = uuid.uuid4().hex[:8]
    variables = MetadataDbVariables()
    variables.delete(budget_key(sbx.user))
    monkeypatch.setenv("AIRFLOW__O365MAIL__DAILY_RECIPIENT_BUDGET", "7")
    outcomes: dict[int, str] = {}

    def task(n: int) -> None:
        hook = O365MailHook(o365mail_conn)
        ti = identity(f"{tag}-{n}")
        specs = [{"to": sbx.user, "subject": f"{tag} task{n} #{i}", "text_content": "x"} for i in range(3)]
        try:
            hook.send_messages(hook.plan(specs, ti), identity=ti)
            outcomes[n] = "sent"
        except RecipientBudgetExceeded as err:
            outcomes[n] = str(err)

    try:
        threads = [threading.Thread(target=task, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert sorted(outcomes) == [0, 1, 2, 3]
        sent = [n for n, outcome in outcomes.items() if outcome == "sent"]
        assert len(sent) == 2  # 3 + 3 <= 7 < 3 + 3 + 3
        for n, outcome in outcomes.items():
            if n not in sent:
                assert "needs 3 more" in outcome and "Nothing of this batch was sent" in outcome
        wait_for_messages(sbx, sbx.user, lambda m: tag in str(m["Subject"]), count=6)
        delivered = [m for m in map(parse, fetch_raw_messages(sbx, sbx.user)) if tag in str(m["Subject"])]
        assert len(delivered) == 6
        assert {str(m["Subject"]).split()[1] for m in delivered} == {f"task{n}" for n in sent}
    finally:
        variables.delete(budget_key(sbx.user))


HOST = """
import sys
import time
from pathlib import Path

from airflow_provider_o365mail.exceptions import RecipientBudgetExceeded
from airflow_provider_o365mail.hooks.o365mail import O365MailHook
from airflow_provider_o365mail.core.message_ids import TaskIdentity
from airflow_provider_o365mail.runtime import MetadataDbVariables

conn_id, tag, name, to, go = sys.argv[1:6]


class SlowReads(MetadataDbVariables):
    # A slow API server: each read answers 0.3 s after it looked, which widens any race.
    def get(self, key):
        value = super().get(key)
        time.sleep(0.3)
        return value


hook = O365MailHook(conn_id)
ti = TaskIdentity("two_hosts", "manual__" + tag, name, -1)
planned = hook.plan([{"to": to, "subject": f"{tag} {name} #{i}", "text_content": "x"} for i in range(3)], ti)
Path(go + "." + name).touch()
while not Path(go).exists():
    time.sleep(0.002)
try:
    hook.send_messages(planned, identity=ti, variables=SlowReads())
    print("@@sent")
except RecipientBudgetExceeded as err:
    print("@@refused " + str(err))
"""


@pytest.mark.parametrize("round_", range(2))
def test_two_hosts_hold_the_recipient_budget_exactly(o365mail_conn, o365_sandbox, tmp_path, round_):
    """Two tasks on two "hosts" (processes with separate lock directories, so no shared flock) reserve
    3 recipients each against a budget of 5 at the same instant: exactly one sends."""
    sbx = o365_sandbox
    tag = uuid.uuid4().hex[:8]
    variables = MetadataDbVariables()
    variables.delete(budget_key(sbx.user))
    go = tmp_path / "go"
    children = {}
    for name in ("hostA", "hostB"):
        lock_dir = tmp_path / name
        lock_dir.mkdir()
        env = {**os.environ, "O365MAIL_LOCK_DIR": str(lock_dir), "AIRFLOW__O365MAIL__DAILY_RECIPIENT_BUDGET": "5"}
        command = [sys.executable, "-c", HOST, o365mail_conn, tag, name, sbx.user, str(go)]
        children[name] = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: all((tmp_path / f"go.{n}").exists() for n in children), 120, "both hosts ready", 0.05)
        go.touch()
        outcomes = {}
        for name, child in children.items():
            out, err = child.communicate(timeout=180)
            assert child.returncode == 0, err[-2000:]
            outcomes[name] = next(line for line in out.splitlines() if line.startswith("@@"))
        assert sorted(o.split()[0] for o in outcomes.values()) == ["@@refused", "@@sent"], outcomes
        refused = next(o for o in outcomes.values() if o.startswith("@@refused"))
        assert "sent to 3 recipient(s)" in refused and "needs 3 more" in refused, refused
        winner = next(n for n, o in outcomes.items() if o == "@@sent")
        wait_for_messages(sbx, sbx.user, lambda m: tag in str(m["Subject"]), count=3)
        assert {str(m["Subject"]).split()[1] for m in map(parse, fetch_raw_messages(sbx, sbx.user))
                if tag in str(m["Subject"])} == {winner}  # fmt: skip
        assert RecipientBudget(variables, sbx.user, 5).used() == 3
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
        variables.delete(budget_key(sbx.user))
