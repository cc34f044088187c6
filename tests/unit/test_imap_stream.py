"""The event stream's reads, retries and advance with fakes (no server, no sleeping)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from imap_fakes import FakeFolder, FakeImapClient

from airflow_provider_o365mail.core.watermark import FolderWatermark
from airflow_provider_o365mail.exceptions import ConsentRevoked
from airflow_provider_o365mail.imap.stream import FolderStream
from airflow_provider_o365mail.retry import Backoff


class FakeWaiter:
    """Delivers the next scripted message into the folder on each wait."""

    def __init__(self, folder: FakeFolder, arrivals: list[str]) -> None:
        self.folder = folder
        self.arrivals = list(arrivals)
        self.waits: list[dict] = []

    async def wait(self, known_uidnext):
        self.waits.append(dict(known_uidnext))
        if self.arrivals:
            self.folder.deliver(self.arrivals.pop(0))
        await asyncio.sleep(0)
        return "push"


@dataclass
class Sleeps:
    slept: list[float] = field(default_factory=list)

    async def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)


def take(stream: FolderStream, start: FolderWatermark | None, count: int, **kwargs: Any) -> list[dict]:
    async def run():
        got = []
        async for _raw, payload in stream.events(start, **kwargs):
            got.append(payload)
            if len(got) == count:
                return got
        return got

    return asyncio.run(asyncio.wait_for(run(), timeout=10))


def test_a_first_start_stores_its_position_before_anything_is_yielded_then_reads_in_uid_order():
    folder = FakeFolder()
    folder.deliver("<before-start>")
    client = FakeImapClient({"INBOX": folder})
    stored: list[FolderWatermark] = []

    async def on_first_position(position: FolderWatermark) -> None:
        assert not yielded, "the start must be durable before the first event"
        stored.append(position)

    yielded: list[dict] = []
    stream = FolderStream(client.session, FakeWaiter(folder, ["<m1>", "<m2>"]), "INBOX")
    yielded.extend(take(stream, None, 2, on_first_position=on_first_position))
    assert [p["message_id"] for p in yielded] == ["<m1>", "<m2>"]
    assert stored == [FolderWatermark(1, 1)], "mail from before the first start is not reported"


def test_resuming_from_a_stored_position_reports_what_came_after_it():
    folder = FakeFolder()
    for message_id in ("<a>", "<b>", "<c>"):
        folder.deliver(message_id)
    stream = FolderStream(FakeImapClient({"INBOX": folder}).session, FakeWaiter(folder, []), "INBOX")
    assert [p["uid"] for p in take(stream, FolderWatermark(1, 1), 2)] == [2, 3]


def test_transient_read_failures_back_off_by_the_policy_and_recover():
    folder = FakeFolder()
    client = FakeImapClient({"INBOX": folder})
    failures = [ConnectionResetError("reset by peer"), TimeoutError("timed out")]

    def flaky_session():
        if failures:
            raise failures.pop(0)
        return client.session()

    sleeps = Sleeps()
    stream = FolderStream(
        flaky_session,
        FakeWaiter(folder, ["<m1>"]),
        "INBOX",
        retry=Backoff(first=2.0, maximum=8.0, jitter=(1.0, 1.0)),
        sleep=sleeps,
    )
    assert [p["message_id"] for p in take(stream, FolderWatermark(1, 0), 1)] == ["<m1>"]
    assert sleeps.slept == [2.0, 4.0]


def test_permanent_failures_park_the_stream_instead_of_failing_it():
    folder = FakeFolder()
    client = FakeImapClient({"INBOX": folder})
    failures = [ConsentRevoked("consent revoked", conn_id="c")] * 3

    def session():
        if failures:
            raise failures.pop(0)
        return client.session()

    sleeps = Sleeps()
    stream = FolderStream(session, FakeWaiter(folder, ["<m1>"]), "INBOX", sleep=sleeps)
    assert [p["message_id"] for p in take(stream, FolderWatermark(1, 0), 1)] == ["<m1>"]
    assert sleeps.slept == [60.0, 120.0, 240.0], "parked: checked again rarely, not in Airflow's restart loop"


def test_the_waiter_is_told_the_folder_s_uidnext():
    folder = FakeFolder()
    folder.deliver("<a>")
    waiter = FakeWaiter(folder, ["<b>"])
    stream = FolderStream(FakeImapClient({"INBOX": folder}).session, waiter, "INBOX")
    take(stream, FolderWatermark(1, 1), 1)
    assert waiter.waits[0] == {"INBOX": 2}


@pytest.mark.parametrize("clean", [2, 1])
def test_the_producer_advances_only_over_messages_airflow_stored(clean):
    from airflow_provider_o365mail.exceptions import O365MailError
    from airflow_provider_o365mail.triggers import imap_events

    producer = imap_events.ImapStreamProducer({"conn_id": "c", "folder": "INBOX"})
    stored: dict[str, Any] = {}

    class Accessor:
        async def aset(self, key, value):
            stored[key] = value

    imap_events._group(producer.key).stores[1] = Accessor()

    @dataclass(frozen=True)
    class Outcome:
        is_clean: bool

    @dataclass(frozen=True)
    class Item:
        broker_payload: dict
        outcome: Outcome

    batch = [
        Item(
            {"uidvalidity": 1, "uid": uid, "message_id": f"<{uid}>", "seen_key": f"<{uid}>|100"},
            Outcome(is_clean=i < clean),
        )
        for i, uid in enumerate((5, 6))
    ]
    try:
        if clean == 2:
            asyncio.run(producer.advance(batch))
        else:
            with pytest.raises(O365MailError, match="restarting the stream from the last confirmed position"):
                asyncio.run(producer.advance(batch))
    finally:
        imap_events._GROUPS.clear()
    position = FolderWatermark.from_dict(stored[imap_events.POSITION_KEY])
    assert position.last_uid == (6 if clean == 2 else 5)
    assert position.seen_keys == [f"<{uid}>|100" for uid in (5, 6)[:clean]]


def test_building_a_stream_or_waiter_reads_no_connection():
    """The triggerer builds them on its event loop: loading the connection there would block it (and fail
    before the stream's retry loop could recover from a connection that appears later)."""
    from airflow_provider_o365mail.hooks.o365mail import O365MailHook

    hook = O365MailHook("o365mail_does_not_exist_yet")
    hook.folder_stream("INBOX")
    hook.mail_waiter(["INBOX"])
    assert "settings" not in vars(hook)
