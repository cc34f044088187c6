"""The event trigger over Microsoft Graph without a sandbox: the delta stream's position, restarts, expired
tokens, the producer's advance after persistence, the Graph form of ``emitted_id``."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from airflow_provider_o365mail.core.watermark import DeltaWatermark
from airflow_provider_o365mail.event_state import emitted_id
from airflow_provider_o365mail.graph import folders as graph_folders
from airflow_provider_o365mail.graph.watch import FIRST_ROUND_MARGIN, GraphMailbox
from airflow_provider_o365mail.triggers.graph_stream import GraphFolderStream, PollPace
from airflow_provider_o365mail.version_compat import AIRFLOW_V_3_3_PLUS
from tests.unit.graph_fakes import Answer, graph_refusal

T0 = 1_800_000_000.0


def iso(epoch: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class DeltaFolder:
    """One folder's messages with Graph's delta rules: a round from a ``receivedDateTime`` bound returns the
    messages received since; a delta link returns the messages created after it was handed out."""

    def __init__(self, folder_id: str = "AQMkAGfolder") -> None:
        self.folder_id = folder_id
        self.messages: list[dict[str, Any]] = []
        self.expired: set[int] = set()
        self.requests: list[str] = []

    def deliver(self, subject: str, received: float) -> dict[str, Any]:
        message = {
            "id": f"AAMkAG{uuid.uuid4().hex[:12]}",
            "internetMessageId": f"<{uuid.uuid4().hex[:8]}@x.test>",
            "subject": subject,
            "receivedDateTime": iso(received),
            "from": {"emailAddress": {"address": "a@x.test"}},
            "toRecipients": [],
            "isRead": False,
        }
        self.messages.append(message)
        return message

    def close(self) -> None:
        pass

    def request(self, method: str, url: str, *, doing: str, params=None, **_: Any) -> Answer:
        self.requests.append(url)
        if url.endswith("mailFolders/inbox"):
            return Answer(200, {"id": self.folder_id})
        if url.startswith("delta:"):
            token = int(url.split(":")[1])
            if token in self.expired:
                raise graph_refusal(410, "syncStateNotFound")
            found = self.messages[token:]
        elif url.endswith(f"mailFolders/{self.folder_id}/messages/delta"):
            bound = str((params or {})["$filter"]).removeprefix("receivedDateTime ge ")
            found = [m for m in self.messages if m["receivedDateTime"] >= bound]
        else:
            raise graph_refusal(404, "ErrorItemNotFound")
        return Answer(200, {"value": list(found), "@odata.deltaLink": f"delta:{len(self.messages)}"})


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def folder():
    graph_folders._CACHE.clear()
    yield DeltaFolder()
    graph_folders._CACHE.clear()


def stream_of(folder: DeltaFolder, clock: Clock) -> GraphFolderStream:
    return GraphFolderStream(lambda: GraphMailbox(folder, "me", ("test", id(folder))), "INBOX", clock=clock)


def subjects(events) -> list[str]:
    return [raw["summary"]["subject"] for raw, _payload in events]


def test_the_first_start_reports_nothing_already_there_then_only_new_mail(folder):
    clock = Clock()
    folder.deliver("old, a minute ago", T0 - 60)
    folder.deliver("old, a day ago", T0 - 86400)
    stream = stream_of(folder, clock)
    assert stream.read_new() == []
    assert stream.skipped_at_start == 1, "the first round reads back FIRST_ROUND_MARGIN only"
    first = stream.read_position
    assert first is not None and first.folder_id == folder.folder_id and first.since == T0 - FIRST_ROUND_MARGIN
    clock.now += 30
    folder.deliver("new 1", T0 + 20)
    folder.deliver("new 2", T0 + 25)
    events = stream.read_new()
    assert subjects(events) == ["new 1", "new 2"]
    assert [p["delta_link"] for _, p in events] == [None, "delta:4"], "only the round's last message carries its link"
    assert stream.read_new() == [], "read once"


def test_a_restart_from_a_link_not_yet_advanced_skips_the_ids_handled(folder):
    clock = Clock()
    stream = stream_of(folder, clock)
    stream.read_new()
    start = stream.read_position
    for i in range(3):
        folder.deliver(f"m{i}", T0 + i)
    handled = stream.read_new()[0][1]["graph_id"]
    # The triggerer died after m0 was handled (its id stored) but before the round's link advanced.
    restarted = stream_of(folder, clock)
    restarted.read_position = DeltaWatermark(start.folder_id, start.delta_link, [*start.seen_ids, handled], start.since)
    assert subjects(restarted.read_new()) == ["m1", "m2"]


def test_an_expired_token_resyncs_from_a_time_bound_without_repeats_or_losses(folder):
    clock = Clock()
    stream = stream_of(folder, clock)
    folder.deliver("before the start", T0 - 30)
    folder.deliver("before the first round's bound", T0 - 1200)
    stream.read_new()
    clock.now += 60
    folder.deliver("reported", T0 + 50)
    assert subjects(stream.read_new()) == ["reported"]
    link = stream.read_position.delta_link
    folder.expired.add(int(link.split(":")[1]))
    clock.now += 600
    folder.deliver("while the token expired", T0 + 300)
    events = stream.read_new()
    assert subjects(events) == ["while the token expired"], "neither the reported one nor the old one again"
    assert any("messages/delta" in r for r in folder.requests[-1:]), "a fresh round, not the expired link"
    assert stream.read_position.since == T0 - FIRST_ROUND_MARGIN, "never before the stream's first start"


def test_the_poll_is_fast_after_mail_and_slows_down_to_the_interval():
    pace = PollPace(fastest=2, slowest=60)
    waits = [pace.after(found) for found in (False, False, False, False, False, False, True, False)]
    assert waits == [2, 4, 8, 16, 32, 60, 2, 4]


def test_the_stream_yields_forever_and_stores_the_first_position_before_any_event(folder):
    clock = Clock()
    stored: list[DeltaWatermark] = []
    waits: list[bool] = []
    stream = stream_of(folder, clock)

    async def wait(found: bool) -> None:
        waits.append(found)
        if len(waits) == 1:
            folder.deliver("after the start", T0 + 1)

    stream._wait = wait

    async def first(position: DeltaWatermark) -> None:
        stored.append(position)

    async def take() -> list:
        out = []
        async for event in stream.events(None, on_first_position=first):
            out.append(event)
            if len(out) == 1:
                break
        return out

    out = asyncio.run(take())
    assert subjects(out) == ["after the start"]
    assert len(stored) == 1 and stored[0].delta_link == "delta:0"


# ---------------------------------------------------------------------- the producer's advance
@dataclass(frozen=True)
class Outcome:
    is_clean: bool


@dataclass(frozen=True)
class Item:
    broker_payload: dict
    outcome: Outcome


class Accessor:
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    async def aget(self, key):
        return self.values.get(key)

    async def aset(self, key, value):
        self.values[key] = value


def payload(graph_id: str, link: str | None, at: float = T0) -> dict:
    return {
        "graph_id": graph_id,
        "message_id": f"<{graph_id}>",
        "folder_id": "F",
        "delta_link": link,
        "obtained_at": at,
        "since": T0 - 600,
    }


@pytest.mark.parametrize("clean", [3, 2, 0])
def test_the_producer_advances_over_stored_events_only_and_the_link_with_the_rounds_last(monkeypatch, clean):
    from airflow_provider_o365mail.exceptions import O365MailError
    from airflow_provider_o365mail.triggers import graph_events, mail_stream

    producer = graph_events.GraphStreamProducer({"conn_id": "c", "folder": "INBOX", "post_action": "seen"})
    producer.position = DeltaWatermark("F", "delta:old", ["x"], T0 - 600, T0 - 100, T0 - 100)
    applied: list[list[str]] = []
    monkeypatch.setattr(
        producer.hook,
        "apply_post_action",
        lambda spec, result, mailbox=None: applied.append([m["graph_id"] for m in result.messages]),
    )
    accessor = Accessor()
    group = mail_stream.group(producer.key)
    group.stores[1] = accessor
    group.matched.update({("graph", "a"), ("graph", "c")})  # b matched no watcher's criteria
    batch = [
        Item(payload(g, link), Outcome(i < clean))
        for i, (g, link) in enumerate([("a", None), ("b", None), ("c", "delta:new")])
    ]
    try:
        if clean == 3:
            asyncio.run(producer.advance(batch))
        else:
            with pytest.raises(O365MailError, match="restarting the stream"):
                asyncio.run(producer.advance(batch))
    finally:
        mail_stream.GROUPS.clear()
    expected_applied = [g for g in ("a", "c")[: 1 if clean == 2 else (2 if clean == 3 else 0)]]
    assert applied == ([expected_applied] if expected_applied else [])
    if clean == 0:
        assert graph_events.GRAPH_POSITION_KEY not in accessor.values
        return
    position = DeltaWatermark.from_dict(accessor.values[graph_events.GRAPH_POSITION_KEY])
    assert position.seen_ids == ["x", *"abc"[:clean]]
    assert position.delta_link == ("delta:new" if clean == 3 else "delta:old"), "the link waits for its round"


def test_restart_resumes_from_the_least_advanced_watcher():
    from airflow_provider_o365mail.triggers.graph_events import least_advanced

    old = DeltaWatermark("F", "delta:1", ["a"], T0 - 600, T0, T0)
    new = DeltaWatermark("F", "delta:2", ["a", "b"], T0 - 600, T0 + 10, T0 + 10)
    resumed = least_advanced([new, old])
    assert (resumed.delta_link, resumed.seen_ids) == ("delta:1", ["a", "b"])
    assert least_advanced([]) is None


# ---------------------------------------------------------------------- identity in asset events
def test_emitted_id_has_a_graph_form_per_folder_and_keeps_the_imap_one():
    graph = {"folder": "INBOX", "graph_id": "AAMkAGx", "uid": None, "uidvalidity": None, "message_id": "<m>"}
    assert emitted_id(graph) == "INBOX|graph|AAMkAGx"
    assert emitted_id({**graph, "folder": "Archive"}) != emitted_id(graph)
    assert emitted_id({**graph, "graph_id": "AAMkAGy"}) != emitted_id(graph), "same Message-ID, another message"
    assert emitted_id({"folder": "INBOX", "uidvalidity": 3, "uid": 7}) == "INBOX|3|7"
    assert emitted_id({"folder": "INBOX", "graph_id": None, "uid": None}) is None


# ---------------------------------------------------------------------- the trigger's transport
@pytest.mark.skipif(not AIRFLOW_V_3_3_PLUS, reason="the event trigger needs Airflow >= 3.3 (shared streams)")
def test_the_transport_picks_the_producer_and_old_watchers_keep_their_serialized_form():
    from airflow_provider_o365mail.exceptions import ConnectionConfigError
    from airflow_provider_o365mail.triggers.graph_events import GraphStreamProducer
    from airflow_provider_o365mail.triggers.imap_events import (
        ImapStreamProducer,
        MailStreamProducer,
        O365ImapEventTrigger,
    )

    _, legacy = O365ImapEventTrigger(conn_id="c", subject="x").serialize()
    assert "transport" not in legacy, "a watcher written before `transport` serializes as before"
    _, graph = O365ImapEventTrigger(conn_id="c", subject="x", transport="Graph").serialize()
    assert graph["transport"] == "graph"
    make = O365ImapEventTrigger.create_shared_stream_producer
    assert isinstance(make(graph), GraphStreamProducer)
    assert isinstance(make({**graph, "transport": "imap"}), ImapStreamProducer)
    assert isinstance(make(legacy), MailStreamProducer), "the connection's transport, read when the stream opens"
    assert O365ImapEventTrigger(**graph).shared_stream_key() != O365ImapEventTrigger(**legacy).shared_stream_key()
    with pytest.raises(ConnectionConfigError, match="transport must be one of imap, graph, auto"):
        O365ImapEventTrigger(conn_id="c", transport="pop3")
