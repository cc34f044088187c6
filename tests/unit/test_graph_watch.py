"""graph/watch.py and the delta watermark, against a scripted Graph (which requests, what is reported)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from graph_fakes import graph_refusal

from airflow_provider_o365mail.core.watch_spec import WatchSpec
from airflow_provider_o365mail.core.watermark import (
    DeltaWatermark,
    FolderWatermark,
    VariableWatermarkStore,
    WatchState,
)
from airflow_provider_o365mail.graph import folders as graph_folders
from airflow_provider_o365mail.graph import watch
from airflow_provider_o365mail.hooks.o365mail import advanced

NOW = 1_800_000_000.0


def message(n: int, subject: str = "s", received: str | None = None) -> dict[str, Any]:
    return {
        "id": f"id{n}",
        "internetMessageId": f"<{n}@x>",
        "subject": f"{subject} {n}",
        "from": {"emailAddress": {"address": "a@b.test"}},
        "receivedDateTime": received or f"2027-01-01T00:00:{n:02d}Z",
        "attachments": [],
    }


@dataclass
class Answer:
    body: dict

    def json(self) -> dict:
        return self.body


@dataclass
class ScriptedGraph:
    """Folder ``F`` with id ``fid``; the folder's messages; delta rounds answer what ``created`` says."""

    listed: list[dict] = field(default_factory=list)
    created: list[dict] = field(default_factory=list)
    expired: set[str] = field(default_factory=set)
    calls: list[tuple[str, str, dict]] = field(default_factory=list)
    links: int = 0

    def request(self, method: str, path: str, *, doing: str, params=None, headers=None, json=None, **kw) -> Answer:
        self.calls.append((method, path, dict(params or {})))
        if path.endswith("/mailFolders") or "childFolders" in path:
            return Answer({"value": [{"id": "fid", "displayName": "F"}]})
        if "/messages/delta" in path or "deltatoken" in path:
            if path in self.expired:
                raise graph_refusal(410, "syncStateNotFound")
            self.links += 1
            return Answer({"value": self.created, "@odata.deltaLink": f"https://g/delta?$deltatoken=t{self.links}"})
        if path.endswith("/messages"):
            return Answer({"value": self.listed})
        raise AssertionError(path)

    def delta_filters(self) -> list[str]:
        return [p.get("$filter", "") for _, path, p in self.calls if path.endswith("/messages/delta")]


@pytest.fixture(autouse=True)
def no_folder_cache():
    graph_folders._CACHE.clear()
    yield
    graph_folders._CACHE.clear()


def mailbox(graph: ScriptedGraph) -> watch.GraphMailbox:
    return watch.GraphMailbox(graph, "me", ("test",))


def spec(**kw) -> WatchSpec:
    return WatchSpec.build("F", new_only=True, **kw)


def test_first_check_lists_existing_mail_and_starts_a_round_near_now():
    graph = ScriptedGraph(listed=[message(1), message(2)], created=[message(2), message(3)])
    result = watch.check(mailbox(graph), spec(), None, now=NOW)
    assert [m["subject"] for m in result.messages] == ["s 1", "s 2", "s 3"], "listed and created, each once"
    assert result.scanned["F"]["delta_link"].endswith("t1")
    [bound] = graph.delta_filters()
    assert bound == "receivedDateTime ge 2027-01-15T07:50:00Z"  # NOW - FIRST_ROUND_MARGIN
    assert all(m["graph_id"] and m["uid"] is None for m in result.messages)


def test_a_capped_check_does_not_move_the_link_past_what_was_not_reported():
    graph = ScriptedGraph(created=[message(1), message(2), message(3)])
    marks = {"F": DeltaWatermark("fid", "https://g/delta?$deltatoken=old", obtained_at=NOW - 60, updated_at=NOW - 60)}
    result = watch.check(mailbox(graph), spec(max_messages=2), marks, now=NOW)
    assert [m["graph_id"] for m in result.messages] == ["id1", "id2"]
    after = watch.advanced(marks, result, now=NOW)["F"]
    assert after.delta_link.endswith("old"), "the old link is read again next time"
    assert after.seen_ids == ["id1", "id2"]
    again = watch.check(mailbox(graph), spec(max_messages=2), {"F": after}, now=NOW)
    assert [m["graph_id"] for m in again.messages] == ["id3"]
    assert watch.advanced({"F": after}, again, now=NOW)["F"].delta_link.endswith("t2")


def test_an_expired_token_restarts_an_hour_before_the_link_and_skips_what_was_reported():
    old = "https://g/delta?$deltatoken=old"
    graph = ScriptedGraph(created=[message(1), message(2)], expired={old})
    mark = DeltaWatermark("fid", old, seen_ids=["id1"], obtained_at=NOW - 7200, updated_at=NOW - 7200)
    result = watch.check(mailbox(graph), spec(), {"F": mark}, now=NOW)
    assert [m["graph_id"] for m in result.messages] == ["id2"]
    assert graph.delta_filters() == ["receivedDateTime ge 2027-01-15T05:00:00Z"]  # obtained_at - RESYNC_MARGIN


def test_a_link_never_replaces_a_newer_one():
    mark = DeltaWatermark("fid", "new", obtained_at=200.0, since=1.0)
    older = mark.advanced("fid", "older", obtained_at=100.0, since=0.0, reported=["x"])
    assert (older.delta_link, older.obtained_at, older.seen_ids) == ("new", 200.0, ["x"])
    newer = mark.advanced("fid", "newer", obtained_at=300.0, since=0.0, reported=[])
    assert newer.delta_link == "newer"
    other_folder = mark.advanced("other", "o", obtained_at=50.0, since=0.0, reported=["y"])
    assert (other_folder.delta_link, other_folder.seen_ids) == ("o", ["y"])


def test_one_variable_holds_both_kinds_and_each_transport_advances_its_own():
    store_values: dict[str, str] = {}

    class Vars:
        def get(self, key, default=None):
            return store_values.get(key, default)

        def set(self, key, value, description=None):
            store_values[key] = value

    store = VariableWatermarkStore("k", Vars())
    imap_mark = FolderWatermark(uidvalidity=7, last_uid=10, seen_keys=["<a>|5"], updated_at=1.0)
    store.save_state(WatchState(watermarks={"INBOX": imap_mark, "F": DeltaWatermark("fid", "L", obtained_at=2.0)}))
    loaded = store.load_state().watermarks
    assert loaded["INBOX"] == imap_mark and isinstance(loaded["F"], DeltaWatermark)
    assert json.loads(store_values["k"])["folders"]["F"]["kind"] == "graph-delta"
    from airflow_provider_o365mail.core.watch_spec import CheckResult

    result = CheckResult(
        messages=[{"folder": "F", "graph_id": "g1", "message_id": "<g1>"}],
        scanned={"F": {"transport": "graph", "folder_id": "fid", "delta_link": "L2", "obtained_at": 3.0, "since": 0}},
    )
    marks = advanced(loaded, result)
    assert marks["INBOX"] == imap_mark, "an IMAP watermark is left alone by a Graph scan"
    assert (marks["F"].delta_link, marks["F"].seen_ids, marks["F"].seen_message_ids) == ("L2", ["g1"], ["<g1>"])


def test_a_watermark_from_imap_starts_a_day_before_and_skips_its_message_ids():
    graph = ScriptedGraph(created=[message(1), message(2)])
    mark = FolderWatermark(uidvalidity=7, last_uid=10, seen_keys=["<1@x>|123"], updated_at=NOW)
    result = watch.check(mailbox(graph), spec(), {"F": mark}, now=NOW)
    assert [m["message_id"] for m in result.messages] == ["<2@x>"]
    assert graph.delta_filters() == ["receivedDateTime ge 2027-01-14T08:00:00Z"]


def test_criteria_graph_cannot_decide_are_matched_on_each_message():
    graph = ScriptedGraph(listed=[message(1, "invoice"), message(2, "other")])
    result = watch.check(mailbox(graph), WatchSpec.build("F", subject="INVOICE"), None, now=NOW)
    assert [m["subject"] for m in result.messages] == ["invoice 1"]
    [(_, _, params)] = [c for c in graph.calls if c[1].endswith("/messages")]
    assert "subject" not in params["$filter"] and params["$orderby"] == "receivedDateTime asc"
