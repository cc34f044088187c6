"""The event trigger over Microsoft Graph behind AssetWatchers in a real Airflow (scheduler, dag-processor,
triggerer), and ``MessageQueueTrigger(scheme="o365mail")``, against the sandbox's Graph stand-in.

Mail goes into a folder of each test's own over IMAP APPEND (Message-IDs chosen here); the watchers read
it through Graph delta; what arrived is counted by Message-ID against the folder's content.
"""

from __future__ import annotations

import collections
import time
import uuid
from email.message import EmailMessage

import pytest

from airflow_provider_o365mail.testing.airflow_services import wait_until
from airflow_provider_o365mail.testing.mailbox import append_messages, imap_session, recreate_folder
from tests.integration.test_imap_events import asset_events, dag_runs, event_airflow, write_dag

__all__ = ["event_airflow"]  # the fixture, shared with test_imap_events.py


def raw(subject: str) -> tuple[str, bytes]:
    mail = EmailMessage()
    mail["From"], mail["To"], mail["Subject"] = "supplier@partner.test", "alex@o365.sandbox.test", subject
    mail["Message-ID"] = message_id = f"<{uuid.uuid4().hex}@partner.test>"
    mail.set_content("hello")
    return message_id, mail.as_bytes()


@pytest.fixture
def graph_db_conn(db_connection, o365_sandbox, o365_admin):
    """A connection in the metadata DB (the triggerer reads it) with transport graph."""
    assert o365_sandbox.graph_url, "the sandbox has no Graph stand-in"
    o365_admin.graph_reset()

    def make(tag: str) -> str:
        extra = {"transport": "graph", "graph_url": o365_sandbox.graph_url}
        json_ = o365_sandbox.connection_json(refresh_token=o365_sandbox.new_refresh_token(), **extra)
        return db_connection(f"o365mail_gevents_{tag}", json_)

    yield make
    o365_admin.graph_reset()


@pytest.fixture
def folder(o365_sandbox):
    name = f"GraphEvents-{uuid.uuid4().hex[:8]}"
    recreate_folder(o365_sandbox, o365_sandbox.user, name)
    yield name
    with imap_session(o365_sandbox, o365_sandbox.user) as client:
        for _, _, found in sorted(client.list_folders(f"{name}*"), key=lambda f: -len(f[2])):
            client.delete_folder(found)


def watcher_dag(
    tag: str, conn_id: str, folder: str, trigger_args: str, *, trigger: str | None = None, imports: str = ""
) -> str:
    trigger = trigger or (
        f"O365ImapEventTrigger(conn_id={conn_id!r}, folder={folder!r}, transport='graph', poll_interval=5, "
        f"{trigger_args})"
    )
    write_dag(
        f"o365_gevents_{tag}",
        f"""
        from airflow.sdk import Asset, AssetWatcher, dag, task
        from airflow_provider_o365mail.triggers.imap_events import O365ImapEventTrigger
        {imports}

        mail = Asset("gevents_{tag}", watchers=[AssetWatcher(name="gevents_{tag}", trigger={trigger})])

        @dag(schedule=[mail])
        def o365_gevents_{tag}():
            @task
            def noop():
                pass

            noop()

        o365_gevents_{tag}()
        """,
    )
    return f"o365_gevents_{tag}"


def stream_started(services, conn_id: str, folder: str, count: int = 1) -> bool:
    return services.log_text("triggerer").count(f"Graph stream {conn_id}/{folder} starts") >= count


def folder_message_ids(sbx, folder: str) -> dict[str, set[bytes]]:
    """Message-ID -> IMAP flags of every message in ``folder`` (what the mailbox holds)."""
    with imap_session(sbx, sbx.user) as client:
        client.select_folder(folder, readonly=True)
        uids = client.search(["ALL"])
        fetched = client.fetch(uids, ["FLAGS", "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]) if uids else {}
    found = {}
    for data in fetched.values():
        header = data[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"].decode().split(":", 1)[1].strip()
        found[header] = set(data[b"FLAGS"]) - {b"\\Recent"}
    return found


def event_message_ids(tag: str) -> list[str]:
    return [e["payload"]["message_id"] for e in asset_events(f"gevents_{tag}")]


def test_graph_watcher_reports_only_new_matching_mail_once_and_marks_it_read_after_storing(
    event_airflow, graph_db_conn, o365_sandbox, folder
):
    sbx = o365_sandbox
    tag = uuid.uuid4().hex[:8]
    conn_id = graph_db_conn(tag)
    old_id, old = raw(f"Invoice {tag} already there")
    append_messages(sbx, sbx.user, folder, [old])
    dag_id = watcher_dag(tag, conn_id, folder, f'subject="Invoice {tag}", post_action="seen"')
    wait_until(lambda: stream_started(event_airflow, conn_id, folder), 120, "the watcher's Graph stream")
    sent = {}
    for name in ("Invoice 1", "Newsletter 1", "Invoice 2", "Newsletter 2"):
        message_id, data = raw(f"{name.split()[0]} {tag} #{name.split()[1]}")
        sent[name] = message_id
        append_messages(sbx, sbx.user, folder, [data])
    invoices = {sent["Invoice 1"], sent["Invoice 2"]}
    # Seen only after the asset event is stored: each time a message shows \Seen, its event is already there.
    read_before_stored = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        flags = folder_message_ids(sbx, folder)
        stored = set(event_message_ids(tag))
        read_before_stored += [m for m in invoices if b"\\Seen" in flags.get(m, set()) and m not in stored]
        if invoices <= stored and all(b"\\Seen" in flags[m] for m in invoices):
            break
        time.sleep(0.2)
    assert read_before_stored == [], "post_action ran before Airflow stored the event"
    wait_until(lambda: len([r for r in dag_runs(dag_id) if r[0] == "success"]) >= 1, 120, "the DAG run")
    events = asset_events(f"gevents_{tag}")
    assert sorted(e["payload"]["message_id"] for e in events) == sorted(invoices), "each new invoice once"
    assert old_id not in event_message_ids(tag), "mail already in the folder at the first start is not new"
    assert all(e["payload"]["graph_id"] and e["payload"]["uid"] is None for e in events)
    flags = folder_message_ids(sbx, folder)
    assert b"\\Seen" not in flags[sent["Newsletter 1"]] and b"\\Seen" not in flags[sent["Newsletter 2"]]
    assert b"\\Seen" not in flags[old_id]


def test_graph_watcher_triggerer_killed_mid_burst_loses_and_repeats_nothing(
    event_airflow, graph_db_conn, o365_sandbox, folder
):
    sbx = o365_sandbox
    tag = uuid.uuid4().hex[:8]
    conn_id = graph_db_conn(tag)
    watcher_dag(tag, conn_id, folder, f'subject="Burst {tag}"')
    wait_until(lambda: stream_started(event_airflow, conn_id, folder), 120, "the watcher's Graph stream")
    total = 200
    mails = [raw(f"Burst {tag} {i}") for i in range(total)]
    # Staged elsewhere and moved in at once: one delta round of 200, whose link advances only once all 200
    # are handled, so a restart re-reads what was handled before the kill (handled ids and the listener's
    # record must keep it from being reported again).
    append_messages(sbx, sbx.user, f"{folder}/staging", [data for _, data in mails])
    with imap_session(sbx, sbx.user) as client:
        client.select_folder(f"{folder}/staging")
        client.move(client.search(["ALL"]), folder)
    wait_until(lambda: len(asset_events(f"gevents_{tag}")) >= 10, 120, "the first events")
    event_airflow.kill("triggerer")  # SIGKILL, mid-burst
    persisted_at_kill = len(asset_events(f"gevents_{tag}"))
    event_airflow.start("triggerer")
    wait_until(lambda: len(set(event_message_ids(tag))) >= total, 300, "every message after the restart", interval=2)
    time.sleep(10)  # a repeat, if any, comes right after the restart's first round; give it time to show
    in_mailbox = set(folder_message_ids(sbx, folder))
    counts = collections.Counter(event_message_ids(tag))
    expected = {message_id for message_id, _ in mails}
    assert expected <= in_mailbox, "every message of the burst is in the folder"
    assert set(counts) == expected, f"lost: {len(expected - set(counts))}"
    duplicates = sum(n - 1 for n in counts.values())
    print(f"graph burst of {total}: {persisted_at_kill} persisted at the kill, {duplicates} repeated after the restart")
    assert persisted_at_kill < total, "the kill came mid-burst"
    assert duplicates == 0, "messages stored before the kill were reported again"


def test_graph_watcher_survives_an_expired_delta_token_without_repeats(
    event_airflow, graph_db_conn, o365_sandbox, o365_admin, folder
):
    sbx = o365_sandbox
    tag = uuid.uuid4().hex[:8]
    conn_id = graph_db_conn(tag)
    watcher_dag(tag, conn_id, folder, f'subject="Expiry {tag}"')
    wait_until(lambda: stream_started(event_airflow, conn_id, folder), 120, "the watcher's Graph stream")
    first_id, first = raw(f"Expiry {tag} before")
    append_messages(sbx, sbx.user, folder, [first])
    wait_until(lambda: event_message_ids(tag) == [first_id], 120, "the first event")
    expected = [first_id]
    for how in ("syncStateNotFound", "resyncRequired"):
        assert o365_admin.graph_expire_delta(sbx.user, how=how) >= 1
        message_id, data = raw(f"Expiry {tag} after {how}")
        append_messages(sbx, sbx.user, folder, [data])
        expected.append(message_id)
        wait_until(lambda n=len(expected): len(event_message_ids(tag)) >= n, 120, f"the event after {how}")
    wait_until(
        lambda: event_airflow.log_text("triggerer").count(f"The delta token of {folder!r} expired") >= 2,
        60,
        "both resyncs in the log",
    )
    time.sleep(12)  # two more polls (poll_interval=5): a repeat would show now
    assert event_message_ids(tag) == expected, "each message once across two expired tokens"


def test_message_queue_trigger_scheme_watches_a_folder_over_graph(event_airflow, graph_db_conn, o365_sandbox, folder):
    pytest.importorskip("airflow.providers.common.messaging", reason="the common-messaging extra is not installed")
    sbx = o365_sandbox
    tag = uuid.uuid4().hex[:8]
    conn_id = graph_db_conn(tag)
    trigger = (
        f"MessageQueueTrigger(scheme='o365mail', conn_id={conn_id!r}, folder={folder!r}, transport='graph', "
        f"poll_interval=5, subject='Queue {tag}')"
    )
    imports = "from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger"
    dag_id = watcher_dag(tag, conn_id, folder, "", trigger=trigger, imports=imports)
    wait_until(lambda: stream_started(event_airflow, conn_id, folder), 120, "the MessageQueueTrigger's Graph stream")
    message_id, data = raw(f"Queue {tag} 1")
    _, other = raw(f"Other {tag}")
    append_messages(sbx, sbx.user, folder, [data, other])
    wait_until(lambda: ("success", "asset_triggered") in dag_runs(dag_id), 120, "the DAG run")
    assert event_message_ids(tag) == [message_id]
