"""O365ImapTrigger over Graph without I/O: it waits on the Graph hub (never IMAP), keeps the advanced
delta links in memory between checks, follows ``auto``'s transport, and ends on permanent errors."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from airflow_provider_o365mail.core.watch_spec import CheckResult
from airflow_provider_o365mail.core.watermark import DeltaWatermark, VariableWatermarkStore
from airflow_provider_o365mail.exceptions import GraphRequestRefused
from airflow_provider_o365mail.triggers import imap as trigger_module
from airflow_provider_o365mail.triggers.imap import O365ImapTrigger


class FakeWatch:
    def __init__(self, kind: str, log: list) -> None:
        self.kind, self.log = kind, log
        self.generation = 0
        self.changed = asyncio.Event()
        self.closed = False

    async def ready(self) -> None:
        self.log.append(("ready", self.kind))

    def mark(self) -> dict[str, int]:
        return {"INBOX": self.generation}

    async def wait(self, mark, _uidnext=None) -> str:
        self.log.append(("wait", self.kind))
        while self.generation <= mark["INBOX"]:
            self.changed.clear()
            await self.changed.wait()
        return "created"

    def close(self) -> None:
        self.closed = True


def graph_scan(link: str) -> dict[str, Any]:
    return {"transport": "graph", "folder_id": "inbox-id", "delta_link": link, "obtained_at": 1.0, "since": 0.0}


def imap_scan() -> dict[str, Any]:
    return {"uidvalidity": 1, "high_uid": 5, "uidnext": 6}


class FakeHook:
    """Answers checks from a script; records the watermarks each check was given and the watches joined."""

    def __init__(self, script: list) -> None:
        self.script = list(script)
        self.checks: list[Any] = []
        self.log: list = []
        self.watches: list[FakeWatch] = []

    def __call__(self, conn_id: str) -> FakeHook:
        return self

    def folder_watch(self, folders, *, mailbox=None, poll_interval=60.0, max_idle=1500.0, transport="imap"):
        watch = FakeWatch(transport, self.log)
        self.watches.append(watch)
        return watch

    async def acheck_mail(self, spec, marks, *, mailbox=None, transport="imap") -> CheckResult:
        self.checks.append(({k: v.to_dict() for k, v in (marks or {}).items()}, transport))
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        result = step
        if self.script:  # the next check comes after a change: move the current watch's generation
            asyncio.get_running_loop().call_later(0.01, self._change)
        return result

    def _change(self) -> None:
        for watch in self.watches:
            if not watch.closed:
                watch.generation += 1
                watch.changed.set()


def run_trigger(trigger: O365ImapTrigger) -> list[dict]:
    async def collect():
        return [event.payload async for event in trigger.run()]

    return asyncio.run(asyncio.wait_for(collect(), timeout=10))


@pytest.fixture
def stored_marks(monkeypatch):
    loads = []
    stored = {"INBOX": DeltaWatermark(folder_id="inbox-id", delta_link="link-0")}

    def load(self):
        loads.append(self)
        return dict(stored)

    monkeypatch.setattr(VariableWatermarkStore, "load", load)
    return loads


def test_graph_waits_on_the_graph_hub_and_keeps_the_advanced_delta_link_in_memory(monkeypatch, stored_marks):
    found = {"graph_id": "g1", "folder": "INBOX", "subject": "report"}
    hook = FakeHook(
        [
            CheckResult(scanned={"INBOX": graph_scan("link-1")}),
            CheckResult(scanned={"INBOX": graph_scan("link-2")}),
            CheckResult(messages=[found], scanned={"INBOX": graph_scan("link-3")}),
        ]
    )
    monkeypatch.setattr(trigger_module, "O365MailHook", hook)
    trigger = O365ImapTrigger(
        conn_id="c", spec={"folders": ["INBOX"], "new_only": True}, watermark_key="wm", transport="graph"
    )
    events = run_trigger(trigger)
    assert events == [
        {"status": "success", "result": {"messages": [found], "scanned": {"INBOX": graph_scan("link-3")}}}
    ]
    assert [w.kind for w in hook.watches] == ["graph"], "never the IMAP hub"
    assert [links["INBOX"]["delta_link"] for links, _ in hook.checks] == ["link-0", "link-1", "link-2"]
    assert [transport for _, transport in hook.checks] == ["graph"] * 3
    assert len(stored_marks) == 1, "the Variable is read once; later checks start from the in-memory link"
    assert hook.watches[0].closed
    assert hook.log[0] == ("ready", "graph"), "the first check waits for the loop's first round"


def test_auto_follows_the_transport_that_answered(monkeypatch, stored_marks):
    found = {"graph_id": "g1", "folder": "INBOX", "subject": "report"}
    hook = FakeHook(
        [
            CheckResult(scanned={"INBOX": graph_scan("link-1")}),  # IMAP was refused: Graph answered
            CheckResult(scanned={"INBOX": graph_scan("link-2")}),  # the check again, now with the watch marked
            CheckResult(messages=[found], scanned={"INBOX": graph_scan("link-3")}),
        ]
    )
    monkeypatch.setattr(trigger_module, "O365MailHook", hook)
    events = run_trigger(O365ImapTrigger(conn_id="c", spec={"folders": ["INBOX"]}, transport="auto"))
    assert events[0]["status"] == "success"
    assert [w.kind for w in hook.watches] == ["graph"], "no IMAP watch where IMAP is refused"
    assert [t for _, t in hook.checks] == ["auto"] * 3


def test_auto_over_imap_waits_on_the_imap_hub(monkeypatch, stored_marks):
    found = {"uid": 6, "folder": "INBOX", "subject": "report"}
    hook = FakeHook(
        [
            CheckResult(scanned={"INBOX": imap_scan()}),
            CheckResult(scanned={"INBOX": imap_scan()}),
            CheckResult(messages=[found], scanned={"INBOX": imap_scan()}),
        ]
    )
    monkeypatch.setattr(trigger_module, "O365MailHook", hook)
    events = run_trigger(O365ImapTrigger(conn_id="c", spec={"folders": ["INBOX"]}, transport="auto"))
    assert events[0]["status"] == "success"
    assert [w.kind for w in hook.watches] == ["imap"]


def test_a_permanent_graph_refusal_ends_the_trigger_with_an_error_event(monkeypatch, stored_marks):
    refusal = GraphRequestRefused("ErrorAccessDenied: grant Mail.Read", status=403, code="ErrorAccessDenied")
    hook = FakeHook([refusal])
    monkeypatch.setattr(trigger_module, "O365MailHook", hook)
    (event,) = run_trigger(O365ImapTrigger(conn_id="c", spec={"folders": ["INBOX"]}, transport="graph"))
    assert event["status"] == "error" and event["error_class"] == "GraphRequestRefused"
    assert "Mail.Read" in event["message"]
