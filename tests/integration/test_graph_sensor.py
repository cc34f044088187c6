"""O365ImapSensor with ``transport="graph"`` against the sandbox's Graph stand-in over the same Dovecot.

Mail goes in over IMAP APPEND or SMTP; the sensor reads it through Graph; what the sensor's
post-actions did is read back over IMAP. Counts are by Message-ID in the mailbox.
"""

from __future__ import annotations

import time
import uuid
from email.message import EmailMessage
from pathlib import Path

import pytest

from airflow_provider_o365mail.exceptions import CriteriaError, GraphRequestRefused
from airflow_provider_o365mail.graph import folders as graph_folders
from airflow_provider_o365mail.hooks import fallback
from airflow_provider_o365mail.sensors.imap import O365ImapSensor
from airflow_provider_o365mail.testing.mailbox import append_messages, imap_session, recreate_folder


def unique(prefix: str) -> str:
    return f"{prefix} {uuid.uuid4().hex[:10]}"


def raw(subject: str, *, message_id: str | None = None, sender: str = "supplier@partner.test", files=None) -> bytes:
    mail = EmailMessage()
    mail["From"], mail["To"], mail["Subject"] = sender, "alex@o365.sandbox.test", subject
    mail["Message-ID"] = message_id or f"<{uuid.uuid4().hex}@partner.test>"
    mail.set_content("hello")
    for name, data in (files or {}).items():
        mail.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return mail.as_bytes()


def sensor(conn_id: str, **kwargs) -> O365ImapSensor:
    kwargs.setdefault("task_id", f"wait_{uuid.uuid4().hex[:6]}")
    kwargs.setdefault("transport", "graph")
    return O365ImapSensor(conn_id=conn_id, **kwargs)


def subjects(result) -> list[str]:
    return [m["subject"] for m in result.xcom_value] if result else []


@pytest.fixture
def folder(o365_sandbox):
    name = f"GraphSense-{uuid.uuid4().hex[:8]}"
    recreate_folder(o365_sandbox, o365_sandbox.user, name)
    yield name
    with imap_session(o365_sandbox, o365_sandbox.user) as client:
        for _, _, found in sorted(client.list_folders(f"{name}*"), key=lambda f: -len(f[2])):
            client.delete_folder(found)


def imap_state(sbx, folder: str, tag: str) -> dict[str, set[bytes]]:
    """Subject -> IMAP flags of the messages of ``folder`` whose subject contains ``tag``."""
    with imap_session(sbx, sbx.user) as client:
        client.select_folder(folder, readonly=True)
        uids = client.search(["SUBJECT", tag])
        fetched = client.fetch(uids, ["FLAGS", "ENVELOPE"]) if uids else {}
    return {d[b"ENVELOPE"].subject.decode(): set(d[b"FLAGS"]) - {b"\\Recent"} for d in fetched.values()}


def test_new_only_reports_existing_then_only_new_mail(graph_conn, o365_sandbox, folder):
    sbx, conn_id = o365_sandbox, graph_conn()
    tag = unique("graph new_only")
    append_messages(sbx, sbx.user, folder, [raw(f"{tag} old {i}") for i in range(3)] + [raw("unrelated")])
    kwargs = {"folders": folder, "subject": tag, "new_only": True, "watermark_id": f"wm-{folder}"}
    first = sensor(conn_id, **kwargs).poke({})
    assert sorted(subjects(first)) == [f"{tag} old {i}" for i in range(3)]
    assert all(m["graph_id"] and m["folder"] == folder for m in first.xcom_value)
    assert sensor(conn_id, **kwargs).poke({}) is False, "already reported"
    append_messages(sbx, sbx.user, folder, [raw(f"{tag} new"), raw("still unrelated")])
    assert subjects(sensor(conn_id, **kwargs).poke({})) == [f"{tag} new"]
    assert sensor(conn_id, **kwargs).poke({}) is False
    # A flag change is not "new": delta asks for created messages only.
    with imap_session(sbx, sbx.user) as client:
        client.select_folder(folder)
        client.add_flags(client.search(["SUBJECT", tag]), [b"\\Flagged"])
    assert sensor(conn_id, **kwargs).poke({}) is False


def test_max_messages_caps_and_the_rest_comes_next(graph_conn, o365_sandbox, folder):
    sbx, conn_id = o365_sandbox, graph_conn()
    tag = unique("graph cap")
    kwargs = {"folders": folder, "subject": tag, "new_only": True, "max_messages": 2, "watermark_id": f"cap-{folder}"}
    assert sensor(conn_id, **kwargs).poke({}) is False  # the watermark starts here
    append_messages(sbx, sbx.user, folder, [raw(f"{tag} {i}") for i in range(5)])
    runs = [subjects(sensor(conn_id, **kwargs).poke({})) for _ in range(4)]
    reported = [s for run in runs for s in run]
    assert sorted(reported) == [f"{tag} {i}" for i in range(5)], runs
    assert [len(r) for r in runs] == [2, 2, 1, 0]


def test_expired_delta_token_neither_loses_nor_repeats(graph_conn, o365_sandbox, o365_admin, folder):
    sbx, conn_id = o365_sandbox, graph_conn()
    tag = unique("graph expiry")
    kwargs = {"folders": folder, "subject": tag, "new_only": True, "watermark_id": f"exp-{folder}"}
    append_messages(sbx, sbx.user, folder, [raw(f"{tag} before {i}") for i in range(3)])
    assert len(subjects(sensor(conn_id, **kwargs).poke({}))) == 3
    for how in ("syncStateNotFound", "resyncRequired"):
        assert o365_admin.graph_expire_delta(sbx.user, how=how) >= 1
        append_messages(sbx, sbx.user, folder, [raw(f"{tag} after {how}")])
        assert subjects(sensor(conn_id, **kwargs).poke({})) == [f"{tag} after {how}"]
        assert sensor(conn_id, **kwargs).poke({}) is False


def test_a_renamed_folder_is_still_watched_and_a_new_one_under_its_name_starts_over(graph_conn, o365_sandbox, folder):
    sbx, conn_id = o365_sandbox, graph_conn()
    tag = unique("graph rename")
    kwargs = {"folders": folder, "subject": tag, "new_only": True, "watermark_id": f"mv-{folder}"}
    append_messages(sbx, sbx.user, folder, [raw(f"{tag} 1")])
    assert subjects(sensor(conn_id, **kwargs).poke({})) == [f"{tag} 1"]
    with imap_session(sbx, sbx.user) as client:
        client.rename_folder(folder, f"{folder}-renamed")
    graph_folders._CACHE.clear()  # another process: nothing cached
    append_messages(sbx, sbx.user, f"{folder}-renamed", [raw(f"{tag} 2")])
    assert subjects(sensor(conn_id, **kwargs).poke({})) == [f"{tag} 2"], "the renamed folder is the watched one"
    # An admin makes a new folder under the old name and files mail there: new to the watch, old ones not.
    recreate_folder(sbx, sbx.user, folder)
    append_messages(sbx, sbx.user, folder, [raw(f"{tag} 3")])
    graph_folders._CACHE.clear()
    assert subjects(sensor(conn_id, **kwargs).poke({})) == [f"{tag} 3"]
    assert sensor(conn_id, **kwargs).poke({}) is False


def test_criteria_graph_decides_and_those_matched_here(graph_conn, o365_sandbox, folder):
    sbx, conn_id = o365_sandbox, graph_conn()
    tag = unique("graph criteria")
    append_messages(
        sbx,
        sbx.user,
        folder,
        [
            raw(f"{tag} invoice", sender="Billing <billing@vendor.test>", files={"invoice_7.PDF": b"%PDF-1"}),
            raw(f"{tag} note", sender="billing@vendor.test"),
            raw(f"{tag} other", sender="someone@else.test", files={"invoice_8.pdf": b"%PDF-2"}),
        ],
    )
    hit = sensor(conn_id, folders=folder, subject=tag, sender="billing@", attachment_name="invoice_*.pdf").poke({})
    assert subjects(hit) == [f"{tag} invoice"]
    [summary] = hit.xcom_value
    assert summary["attachments"][0]["name"] == "invoice_7.PDF"
    assert summary["from"] == "Billing <billing@vendor.test>"
    assert sorted(subjects(sensor(conn_id, folders=folder, subject=tag, has_attachment=True).poke({}))) == [
        f"{tag} invoice",
        f"{tag} other",
    ]
    assert sensor(conn_id, folders=folder, subject=tag, unseen=True, sender="nobody@").poke({}) is False
    with pytest.raises(CriteriaError, match="Raw IMAP criteria"):
        sensor(conn_id, folders=folder, criteria="FLAGGED")


def test_post_actions_seen_flag_move_delete_show_over_imap(graph_conn, o365_sandbox, folder):
    sbx, conn_id = o365_sandbox, graph_conn()
    tag = unique("graph post")
    target = f"{folder}/Done"
    with imap_session(sbx, sbx.user) as client:
        client.create_folder(target)
    append_messages(sbx, sbx.user, folder, [raw(f"{tag} {i}") for i in range(4)])
    assert subjects(sensor(conn_id, folders=folder, subject=f"{tag} 0", post_action="seen").poke({}))
    assert subjects(sensor(conn_id, folders=folder, subject=f"{tag} 1", post_action="flag").poke({}))
    assert subjects(sensor(conn_id, folders=folder, subject=f"{tag} 2", post_action="move", move_to=target).poke({}))
    assert subjects(sensor(conn_id, folders=folder, subject=f"{tag} 3", post_action="delete").poke({}))
    left = imap_state(sbx, folder, tag)
    assert left == {f"{tag} 0": {b"\\Seen"}, f"{tag} 1": {b"\\Flagged"}}
    assert list(imap_state(sbx, target, tag)) == [f"{tag} 2"]
    assert f"{tag} 3" in imap_state(sbx, "Deleted Items", tag)


def test_missing_folder_fails_with_its_name(graph_conn):
    conn_id = graph_conn()
    with pytest.raises(GraphRequestRefused, match="No-Such-Folder-"):
        sensor(conn_id, folders=f"No-Such-Folder-{uuid.uuid4().hex[:6]}").poke({})


def test_auto_reads_through_graph_when_imap_is_off_for_the_mailbox(graph_conn, o365_sandbox, o365_admin, folder):
    sbx, conn_id = o365_sandbox, graph_conn(transport="auto")
    tag = unique("graph auto")
    append_messages(sbx, sbx.user, folder, [raw(f"{tag} 1")])
    try:
        o365_admin.update_user(sbx.user, imap_enabled=False)
        fallback.forget_disabled()
        found = sensor(conn_id, folders=folder, subject=tag, transport=None).poke({})
        assert subjects(found) == [f"{tag} 1"]
        assert found.xcom_value[0]["graph_id"], "read through Graph"
    finally:
        o365_admin.update_user(sbx.user, imap_enabled=True)
        fallback.forget_disabled()


def test_watch_moved_from_imap_to_graph_does_not_repeat(graph_conn, o365_sandbox, folder):
    sbx, conn_id = o365_sandbox, graph_conn()
    tag = unique("graph switch")
    kwargs = {"folders": folder, "subject": tag, "new_only": True, "watermark_id": f"sw-{folder}"}
    append_messages(sbx, sbx.user, folder, [raw(f"{tag} {i}") for i in range(2)])
    assert len(subjects(sensor(conn_id, transport="imap", **kwargs).poke({}))) == 2
    time.sleep(1.1)
    append_messages(sbx, sbx.user, folder, [raw(f"{tag} later")])
    assert subjects(sensor(conn_id, **kwargs).poke({})) == [f"{tag} later"]
    assert sensor(conn_id, **kwargs).poke({}) is False


def test_attachments_of_graph_summaries_download_exactly_even_after_a_move(graph_conn, o365_sandbox, folder, tmp_path):
    import hashlib
    import os

    from airflow_provider_o365mail.operators.imap_attachments import O365ImapAttachmentOperator

    sbx, conn_id = o365_sandbox, graph_conn()
    tag = unique("graph files")
    big = os.urandom(6 * 1024 * 1024 + 123)
    files = {"report.csv": b"a,b\n1,2\n", "../../etc/passwd": b"root", "big.bin": big}
    append_messages(sbx, sbx.user, folder, [raw(f"{tag} 1", files=files)])
    target = f"{folder}/Done"
    with imap_session(sbx, sbx.user) as client:
        client.create_folder(target)
    found = sensor(conn_id, folders=folder, subject=tag, post_action="move", move_to=target).poke({})
    [summary] = found.xcom_value
    assert sorted(a["name"] for a in summary["attachments"]) == sorted(files)
    written = O365ImapAttachmentOperator(
        task_id="save", conn_id=conn_id, messages=found.xcom_value, target_dir=str(tmp_path)
    ).execute({})
    saved = {os.path.basename(p): Path(p).read_bytes() for p in written}
    assert set(saved) == {"report.csv", "passwd", "big.bin"}, "names reduced to safe base names"
    assert hashlib.sha256(saved["big.bin"]).digest() == hashlib.sha256(big).digest()
    assert saved["report.csv"] == files["report.csv"] and saved["passwd"] == b"root"
    assert all(os.path.dirname(p) == str(tmp_path) for p in written)


def test_watch_moved_from_graph_to_imap_does_not_repeat(graph_conn, o365_sandbox, folder):
    sbx, conn_id = o365_sandbox, graph_conn()
    tag = unique("graph back")
    kwargs = {"folders": folder, "subject": tag, "new_only": True, "watermark_id": f"bk-{folder}"}
    append_messages(sbx, sbx.user, folder, [raw(f"{tag} {i}") for i in range(2)])
    assert len(subjects(sensor(conn_id, **kwargs).poke({}))) == 2
    append_messages(sbx, sbx.user, folder, [raw(f"{tag} later")])
    assert subjects(sensor(conn_id, transport="imap", **kwargs).poke({})) == [f"{tag} later"]
    assert sensor(conn_id, transport="imap", **kwargs).poke({}) is False


def test_app_only_and_shared_mailbox_read_through_the_users_path(graph_conn, o365_sandbox, o365_admin, monkeypatch):
    import json

    sbx = o365_sandbox
    tag = unique("graph users path")
    # A shared mailbox the signed-in user may read: users/{shared}/..., delegated.
    shared_folder = f"GraphShared-{uuid.uuid4().hex[:6]}"
    recreate_folder(sbx, sbx.shared_mailbox, shared_folder)
    append_messages(sbx, sbx.shared_mailbox, shared_folder, [raw(f"{tag} shared")])
    o365_admin.graph_mailbox(sbx.shared_mailbox, full_access=[sbx.user])
    conn_id = graph_conn(graph_permissions="Mail.Send Mail.ReadWrite Mail.ReadWrite.Shared")
    found = sensor(conn_id, folders=shared_folder, subject=tag, mailbox=sbx.shared_mailbox).poke({})
    assert subjects(found) == [f"{tag} shared"]
    # App-only (client credentials): users/{mailbox}/... with Graph's application permissions.
    extra = sbx.connection_extra(
        grant_type="client_credentials",
        scopes="https://outlook.office365.com/.default",
        transport="graph",
        graph_url=sbx.graph_url,
    )
    del extra["refresh_token"]
    app_conn = f"o365mail_{uuid.uuid4().hex[:10]}"
    body = {"conn_type": "o365mail", "login": sbx.app_client_id, "password": sbx.app_client_secret, "extra": extra}
    monkeypatch.setenv(f"AIRFLOW_CONN_{app_conn.upper()}", json.dumps(body))
    user_folder = f"GraphApp-{uuid.uuid4().hex[:6]}"
    recreate_folder(sbx, sbx.user, user_folder)
    append_messages(sbx, sbx.user, user_folder, [raw(f"{tag} app")])
    kwargs = {"folders": user_folder, "subject": tag, "new_only": True, "watermark_id": f"app-{user_folder}"}
    assert subjects(sensor(app_conn, post_action="seen", **kwargs).poke({})) == [f"{tag} app"]
    assert imap_state(sbx, user_folder, tag) == {f"{tag} app": {b"\\Seen"}}
    assert sensor(app_conn, **kwargs).poke({}) is False
