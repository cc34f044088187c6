"""At-least-once delivery of O365ImapSensor: reserve, return the same messages on a retry, confirm later.

A fake hook and an in-memory Variable: what is tested is the order of effects, not IMAP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from airflow_provider_o365mail.core.watermark import VariableWatermarkStore
from airflow_provider_o365mail.imap.watch import CheckResult
from airflow_provider_o365mail.sensors import imap as sensor_module
from airflow_provider_o365mail.sensors.imap import O365ImapSensor


class MemoryVariables:
    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def get(self, key):
        return self.values.get(key)

    def set(self, key, value, description=""):
        self.values[key] = value

    def delete(self, key):
        self.values.pop(key, None)


@dataclass
class FakeHook:
    """The mailbox: ``inbox`` UIDs above the watermark are new; post-actions are recorded."""

    inbox: list[int] = field(default_factory=list)
    post_actions: list[list[int]] = field(default_factory=list)
    settings: Any = field(default_factory=lambda: SimpleNamespace(transport="smtp"))

    def check_mail(self, spec, watermarks, *, mailbox=None, transport="imap"):
        assert transport == "imap"
        last = watermarks["INBOX"].last_uid if watermarks and "INBOX" in watermarks else 0
        new = [u for u in self.inbox if u > last]
        messages = [
            {"folder": "INBOX", "uid": u, "uidvalidity": 1, "message_id": f"<{u}>", "size": 1, "subject": "s"}
            | {"from": "a@b", "attachments": []}
            for u in new
        ]
        high = max(self.inbox, default=0)
        return CheckResult(
            messages=messages, scanned={"INBOX": {"uidvalidity": 1, "high_uid": high, "uidnext": high + 1}}
        )

    def apply_post_action(self, spec, result, *, mailbox=None):
        self.post_actions.append([m["uid"] for m in result.messages])

    def commit_mail(self, *args, **kwargs):
        raise AssertionError("a task instance must never commit at once")


@dataclass
class FakeTI:
    dag_id: str
    run_id: str
    task_id: str = "wait"
    map_index: int = -1
    states: dict[str, dict[str, str]] = field(default_factory=dict)

    def get_task_states(self, dag_id, task_ids, run_ids):
        return {run: self.states.get(run, {}) for run in run_ids}


@pytest.fixture
def world(monkeypatch):
    variables = MemoryVariables()
    hook = FakeHook()
    monkeypatch.setattr(sensor_module, "O365MailHook", lambda conn_id: hook)
    monkeypatch.setattr(
        sensor_module, "VariableWatermarkStore", lambda key: VariableWatermarkStore(key, backend=variables)
    )
    return hook, variables


def poke(run_id: str, states: dict[str, dict[str, str]] | None = None) -> Any:
    sensor = O365ImapSensor(task_id="wait", new_only=True, post_action="seen", watermark_id="w")
    result = sensor.poke({"ti": FakeTI("d", run_id, states=states or {})})
    return [m["uid"] for m in result.xcom_value] if result else result


def test_a_retry_of_the_same_task_instance_returns_the_same_messages(world):
    hook, _ = world
    hook.inbox = [1, 2]
    assert poke("run1") == [1, 2]
    hook.inbox = [1, 2, 3]  # more mail arrived before the retry
    assert poke("run1") == [1, 2], "same identities on every try"
    assert hook.post_actions == [], "nothing applied before Airflow recorded the success"


def test_the_next_run_confirms_a_successful_one_then_reports_only_new_mail(world):
    hook, _ = world
    hook.inbox = [1, 2]
    assert poke("run1") == [1, 2]
    hook.inbox = [1, 2, 3]
    assert poke("run2", {"run1": {"wait": "success"}}) == [3]
    assert hook.post_actions == [[1, 2]], "post-action applied once the first run was durable"


def test_a_run_that_failed_for_good_gives_its_messages_back(world):
    hook, _ = world
    hook.inbox = [1, 2]
    assert poke("run1") == [1, 2]
    assert poke("run2", {"run1": {"wait": "failed"}}) == [1, 2], "lost by run1, so delivered by run2"
    assert hook.post_actions == []


def test_a_run_still_retrying_keeps_its_reservation(world):
    hook, variables = world
    hook.inbox = [1]
    assert poke("run1") == [1]
    assert poke("run2", {"run1": {"wait": "up_for_retry"}}) == [1], "at least once: run2 reports it too"
    assert poke("run3", {"run1": {"wait": "success"}, "run2": {"wait": "success"}}) is False
    assert sorted(hook.post_actions) == [[1], [1]]


def test_without_a_task_instance_the_sensor_commits_at_once(world, monkeypatch):
    hook, _ = world
    committed: list[Any] = []
    monkeypatch.setattr(hook, "commit_mail", lambda spec, result, store, mailbox=None: committed.append(result))
    hook.inbox = [7]
    sensor = O365ImapSensor(task_id="wait", new_only=True, post_action="seen", watermark_id="w")
    assert sensor.poke({}).xcom_value[0]["uid"] == 7
    assert len(committed) == 1
