"""The one "new messages since a watermark" routine, on an in-memory IMAP client (no server)."""

from __future__ import annotations

import imaplib

import pytest
from imap_fakes import FakeFolder, FakeImapClient

from airflow_provider_o365mail.core.watermark import FolderWatermark
from airflow_provider_o365mail.exceptions import MailServerError
from airflow_provider_o365mail.imap import scan as imap_scan
from airflow_provider_o365mail.imap.scan import ImapSession, scan_folder
from airflow_provider_o365mail.imap.watch import WatchSpec, check


def opened(client: FakeImapClient) -> ImapSession:
    return ImapSession(client.session).__enter__()


def inbox(*message_ids: str, uidvalidity: int = 1) -> FakeImapClient:
    folder = FakeFolder(uidvalidity=uidvalidity)
    for message_id in message_ids:
        folder.deliver(message_id)
    return FakeImapClient({"INBOX": folder})


def test_without_a_watermark_every_message_is_new_oldest_first():
    client = inbox("<a>", "<b>", "<c>")
    scan = scan_folder(opened(client), "INBOX", None)
    assert [m.summary["message_id"] for m in scan.messages] == ["<a>", "<b>", "<c>"]
    assert (scan.uidvalidity, scan.high_uid, scan.uidnext) == (1, 3, 4)


def test_a_stream_without_a_position_starts_from_now_and_reads_nothing():
    client = inbox("<a>", "<b>")
    scan = scan_folder(opened(client), "INBOX", None, from_now_on=True)
    assert scan.messages == [] and scan.high_uid == 2
    assert not any(name in ("SEARCH", "FETCH") for name, _ in client.commands)


def test_nothing_new_costs_one_status_and_no_select():
    client = inbox("<a>", "<b>")
    scan = scan_folder(opened(client), "INBOX", FolderWatermark(uidvalidity=1, last_uid=2))
    assert scan.messages == [] and scan.high_uid == 2
    assert client.commands == [("STATUS", "INBOX")]


def test_only_messages_above_the_watermark_are_fetched():
    client = inbox("<a>", "<b>", "<c>")
    scan = scan_folder(opened(client), "INBOX", FolderWatermark(uidvalidity=1, last_uid=2))
    assert [m.summary["uid"] for m in scan.messages] == [3]
    assert ("SEARCH", [b"UID", b"3:*"]) in client.commands
    assert ("FETCH", [3]) in client.commands


def test_uid_range_star_returning_the_last_old_message_is_not_reported_again():
    client = inbox("<a>", "<b>")
    client.folders["INBOX"].uidnext = 10  # expunged tail: "3:*" matches UID 2 on real servers
    scan = scan_folder(opened(client), "INBOX", FolderWatermark(uidvalidity=1, last_uid=2))
    assert scan.messages == [] and scan.high_uid == 9


def test_after_a_uidvalidity_change_the_folder_is_rescanned_and_known_ids_skipped():
    client = inbox("<old>", "<new>", uidvalidity=7)
    mark = FolderWatermark(uidvalidity=1, last_uid=50, seen_keys=["<old>|100"], updated_at=1_700_000_000)
    scan = scan_folder(opened(client), "INBOX", mark)
    assert [m.summary["message_id"] for m in scan.messages] == ["<new>"]
    assert scan.uidvalidity == 7 and scan.high_uid == 2
    search = next(keys for name, keys in client.commands if name == "SEARCH")
    assert b"SINCE" in search


def test_fetches_go_in_bounded_chunks_and_skip_expunged_messages(monkeypatch):
    monkeypatch.setattr(imap_scan, "FETCH_CHUNK", 2)
    client = inbox("<1>", "<2>", "<3>", "<4>", "<5>")
    del client.folders["INBOX"].messages[4]  # expunged between SEARCH and FETCH
    real_search = client.search
    client.search = lambda keys, charset=None: [*real_search(keys, charset), 4]
    scan = scan_folder(opened(client), "INBOX", None)
    assert [m.summary["uid"] for m in scan.messages] == [1, 2, 3, 5]
    assert [uids for name, uids in client.commands if name == "FETCH"][::2] == [[1, 2], [3, 4], [5]]


def test_an_unknown_folder_names_the_folder_and_the_fix():
    with pytest.raises(MailServerError, match=r"Cannot open folder 'Rechnungen'.*INBOX"):
        scan_folder(opened(inbox()), "Rechnungen", None)


@pytest.mark.parametrize(
    "broken", [TimeoutError("The read operation timed out"), imaplib.IMAP4.abort("socket error: EOF")]
)
def test_a_connection_that_breaks_at_select_is_not_blamed_on_the_folder(broken):
    class DeadClient(FakeImapClient):
        def select_folder(self, folder, readonly=False):
            raise broken

    with pytest.raises(type(broken)):  # the hook says "connection lost ... retried"; the pool drops the session
        imap_scan.select(DeadClient({"INBOX": FakeFolder()}), "INBOX", readonly=True)


def test_the_sensor_check_uses_the_scan_per_folder_and_caps_results():
    client = inbox("<a>", "<b>", "<c>")
    result = check(opened(client), WatchSpec.build("INBOX", new_only=True, max_messages=2), {})
    assert [m["message_id"] for m in result.messages] == ["<a>", "<b>"]
    assert result.scanned["INBOX"]["high_uid"] == 2, "the watermark must not pass what was not reported"


def test_a_new_message_that_reuses_a_message_id_is_reported():
    """Senders choose Message-IDs; within one UIDVALIDITY the UID alone says what is new."""
    client = inbox("<dup>", "<dup>")
    mark = FolderWatermark(uidvalidity=1, last_uid=1, seen_keys=["<dup>|100"])
    scan = scan_folder(opened(client), "INBOX", mark)
    assert [(m.summary["uid"], m.summary["message_id"]) for m in scan.messages] == [(2, "<dup>")]


def test_watermarks_written_before_seen_keys_still_load():
    mark = FolderWatermark.from_dict({"uidvalidity": 3, "last_uid": 9, "seen_message_ids": ["<a>"]})
    assert mark == FolderWatermark(3, 9, ["<a>"])


@pytest.mark.parametrize(
    "failure", [RecursionError("maximum recursion depth"), RuntimeError("got more than 1000000 bytes")]
)
def test_a_message_whose_structure_cannot_be_read_is_reported_unparsed_and_hides_nothing(monkeypatch, failure):
    monkeypatch.setattr(imap_scan, "STRUCTURE_GROUP", 4)
    client = inbox(*(f"<{n}>" for n in range(1, 7)))
    real_fetch = client.fetch

    def fetch(uids, items):
        if items == ["BODYSTRUCTURE"] and 3 in uids:
            raise failure
        return real_fetch(uids, items)

    client.fetch = fetch
    session = opened(client)
    scan = scan_folder(session, "INBOX", None)
    assert [m.summary["uid"] for m in scan.messages] == [1, 2, 3, 4, 5, 6], "the good mail is all there"
    poisoned = [m.summary for m in scan.messages if m.summary.get("unparsed")]
    assert [(p["uid"], p["message_id"], p["attachments"]) for p in poisoned] == [(3, "<3>", [])]
    assert session.reopened == 3, "one fresh connection per failed group: [1-4], [1-2]... down to UID 3"


def test_an_unparsed_message_is_skipped_only_when_the_criteria_ask_about_attachments():
    client = inbox("<a>")
    real_fetch = client.fetch
    client.fetch = lambda uids, items: (
        (_ for _ in ()).throw(RecursionError()) if items == ["BODYSTRUCTURE"] else real_fetch(uids, items)
    )
    assert [m["uid"] for m in check(opened(client), WatchSpec.build("INBOX"), {}).messages] == [1]
    assert check(opened(client), WatchSpec.build("INBOX", attachment_name="*.pdf"), {}).messages == []


def test_an_oversized_literal_in_a_structure_is_refused_without_reading_it(monkeypatch):
    class Imaplib:
        def __init__(self):
            self.reads: list[int] = []

        def read(self, size):
            self.reads.append(size)
            return b"x" * size

    client = inbox("<a>", "<b>")
    client._imap = Imaplib()
    real_fetch = client.fetch

    def fetch(uids, items):
        if items == ["BODYSTRUCTURE"] and 2 in uids:
            client._imap.read(100 * 1024 * 1024)  # what imaplib does for a literal in the answer
        return real_fetch(uids, items)

    client.fetch = fetch
    scan = scan_folder(opened(client), "INBOX", None)
    assert [m.summary.get("unparsed", False) for m in scan.messages] == [False, True]
    assert 100 * 1024 * 1024 not in client._imap.reads, "the 100 MB literal was never read into memory"
    assert "read" not in vars(client._imap), "the bound is lifted after the fetch"


def test_a_reused_session_with_the_folder_selected_selects_instead_of_trusting_status():
    client = inbox("<a>", "<b>")

    class Imaplib:
        state = "SELECTED"

    client._imap = Imaplib()
    scan = scan_folder(opened(client), "INBOX", FolderWatermark(uidvalidity=1, last_uid=1))
    assert [m.summary["uid"] for m in scan.messages] == [2]
    assert ("STATUS", "INBOX") not in client.commands
