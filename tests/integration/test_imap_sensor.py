"""O365ImapSensor against the sandbox's Dovecot: mail sent through the sandbox's Postfix is detected."""

from __future__ import annotations

import time
import uuid
from email.message import EmailMessage

import pytest

from airflow_provider_o365mail.core.criteria import CriteriaError
from airflow_provider_o365mail.exceptions import ReauthorizationRequired
from airflow_provider_o365mail.hooks.o365mail import O365MailHook
from airflow_provider_o365mail.sensors.imap import O365ImapSensor
from airflow_provider_o365mail.testing.mailbox import (
    append_messages,
    imap_session,
    recreate_folder,
    wait_for_messages,
)


def unique(prefix: str = "sensor") -> str:
    return f"{prefix} {uuid.uuid4().hex[:10]}"


def sensor(conn_id: str, **kwargs) -> O365ImapSensor:
    kwargs.setdefault("task_id", f"wait_{uuid.uuid4().hex[:6]}")
    return O365ImapSensor(conn_id=conn_id, **kwargs)


def poke_until(s: O365ImapSensor, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = s.poke({})
        if result:
            return result.xcom_value
        time.sleep(0.3)
    return None


def raw_message(subject: str, message_id: str | None = None, sender: str = "supplier@partner.test") -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "alex@o365.sandbox.test"
    msg["Subject"] = subject
    msg["Message-ID"] = message_id or f"<{uuid.uuid4().hex}@partner.test>"
    msg.set_content("hello")
    return msg.as_bytes()


def test_sent_mail_with_attachment_is_detected_with_a_full_summary(o365mail_conn, o365_sandbox, tmp_path):
    sbx = o365_sandbox
    subject = unique("Rechnung Nr. 42 – März")
    invoice = tmp_path / "Rechnung März.pdf"
    invoice.write_bytes(b"%PDF-1.7 " + b"x" * 5000)
    hook = O365MailHook(o365mail_conn)
    message_id = hook.send_email(
        to=sbx.user, cc=sbx.second_user, subject=subject, text_content="see attachment", files=[invoice]
    )
    s = sensor(o365mail_conn, subject=subject, has_attachment=True, attachment_name="*.PDF")
    (summary,) = poke_until(s)
    assert summary["message_id"] == message_id and summary["subject"] == subject
    assert summary["folder"] == "INBOX" and summary["uid"] > 0 and summary["uidvalidity"] > 0
    assert summary["from"] == sbx.user and summary["to"] == [sbx.user] and summary["cc"] == [sbx.second_user]
    (attachment,) = summary["attachments"]
    assert attachment["name"] == "Rechnung März.pdf" and attachment["content_type"] == "application/pdf"
    assert attachment["size"] >= 5000 and attachment["section"] == "2"
    assert summary["size"] > 5000 and summary["date"]
    # not every criterion matches: a wrong attachment glob finds nothing
    assert sensor(o365mail_conn, subject=subject, attachment_name="*.csv").poke({}) is False


def test_new_only_watermark_survives_restarts(o365mail_conn, o365_sandbox):
    sbx = o365_sandbox
    tag = unique("watermark")
    hook = O365MailHook(o365mail_conn)
    watermark_id = f"wm-{uuid.uuid4().hex[:8]}"
    hook.send_email(to=sbx.user, subject=f"{tag} one", text_content="1")

    def fresh_sensor():  # a new sensor object each time: like a new task try on another worker
        return sensor(o365mail_conn, subject=tag, new_only=True, watermark_id=watermark_id)

    first = poke_until(fresh_sensor())
    assert [m["subject"] for m in first] == [f"{tag} one"]
    assert fresh_sensor().poke({}) is False, "already reported"
    hook.send_email(to=sbx.user, subject=f"{tag} two", text_content="2")
    hook.send_email(to=sbx.user, subject=f"{tag} three", text_content="3")
    # Both delivered before the poke: otherwise it could legitimately report "two" alone.
    wait_for_messages(sbx, sbx.user, lambda m: m["Subject"] in (f"{tag} two", f"{tag} three"), count=2)
    second = poke_until(fresh_sensor())
    assert [m["subject"] for m in second] == [f"{tag} two", f"{tag} three"]
    assert fresh_sensor().poke({}) is False


def test_max_messages_caps_and_the_rest_comes_next_run(o365mail_conn, o365_sandbox):
    sbx = o365_sandbox
    tag = unique("cap")
    folder = f"Cap {uuid.uuid4().hex[:6]}"
    append_messages(sbx, sbx.user, folder, [raw_message(f"{tag} {i}") for i in range(5)])
    kwargs = {"folders": folder, "subject": tag, "new_only": True, "max_messages": 2, "watermark_id": folder}
    runs = [sensor(o365mail_conn, **kwargs).poke({}) for _ in range(4)]
    assert [[m["subject"] for m in r.xcom_value] if r else [] for r in runs] == [
        [f"{tag} 0", f"{tag} 1"],
        [f"{tag} 2", f"{tag} 3"],
        [f"{tag} 4"],
        [],
    ]


def test_uidvalidity_change_neither_loses_nor_repeats(o365mail_conn, o365_sandbox):
    sbx = o365_sandbox
    folder = f"Lieferungen/Übersicht {uuid.uuid4().hex[:6]}"  # non-ASCII: modified UTF-7 on the wire
    tag = unique("uidvalidity")
    old = [raw_message(f"{tag} old {i}", message_id=f"<old-{i}-{tag.split()[-1]}@partner.test>") for i in range(3)]
    recreate_folder(sbx, sbx.user, folder)
    append_messages(sbx, sbx.user, folder, old)
    kwargs = {"folders": [folder], "subject": tag, "new_only": True, "watermark_id": folder}
    first = sensor(o365mail_conn, **kwargs).poke({}).xcom_value
    assert sorted(m["subject"] for m in first) == [f"{tag} old {i}" for i in range(3)]
    with imap_session(sbx, sbx.user) as client:
        before = client.folder_status(folder, [b"UIDVALIDITY"])[b"UIDVALIDITY"]
    time.sleep(1.1)  # Dovecot's UIDVALIDITY is a timestamp
    recreate_folder(sbx, sbx.user, folder)  # e.g. an admin restored the folder
    append_messages(sbx, sbx.user, folder, [*old, raw_message(f"{tag} new")])
    with imap_session(sbx, sbx.user) as client:
        assert client.folder_status(folder, [b"UIDVALIDITY"])[b"UIDVALIDITY"] != before
    second = sensor(o365mail_conn, **kwargs).poke({}).xcom_value
    assert [m["subject"] for m in second] == [f"{tag} new"], "old messages were not repeated, the new one not lost"
    assert sensor(o365mail_conn, **kwargs).poke({}) is False


HOSTILE = [
    'x" ALL "',
    'x") OR ALL ("',
    "x\\",
    '"',
    "*",
    "%",
    "{5}\r\n",
    'ü" OR ALL "ö',
]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_cannot_change_the_search(o365mail_conn, o365_sandbox, value):
    sbx = o365_sandbox
    folder = "Hostile"
    with imap_session(sbx, sbx.user) as client:
        if not client.folder_exists(folder):
            client.create_folder(folder)
        client.select_folder(folder)
        if len(client.search(["SUBJECT", "harmless"])) < 3:  # also after the mailboxes were cleaned
            for i in range(3):
                client.append(folder, raw_message(f"harmless {i}"))
    # The control: the folder has mail a search finds, so "no match" below is the search's doing.
    assert sensor(o365mail_conn, folders=folder, subject="harmless").poke({})
    for field in ("subject", "sender", "recipient"):
        s = sensor(o365mail_conn, folders=folder, **{field: value})
        if "\r" in value or "\n" in value:
            with pytest.raises(CriteriaError, match="line break"):
                s.poke({})
        else:
            assert s.poke({}) is False, f"{field}={value!r} matched messages it does not appear in"
    header = sensor(o365mail_conn, folders=folder, header={"X-Test": value})
    if "\r" not in value:
        assert header.poke({}) is False


def test_post_actions_seen_flag_and_move(o365mail_conn, o365_sandbox):
    sbx = o365_sandbox
    source = f"Inbound {uuid.uuid4().hex[:6]}"
    target = f"Processed {uuid.uuid4().hex[:6]}"
    tag = unique("post")
    append_messages(sbx, sbx.user, source, [raw_message(f"{tag} {i}") for i in range(3)])
    with imap_session(sbx, sbx.user) as client:
        client.create_folder(target)
    seen = sensor(o365mail_conn, folders=source, subject=f"{tag} 0", unseen=True, post_action="seen").poke({})
    assert len(seen.xcom_value) == 1
    assert sensor(o365mail_conn, folders=source, subject=f"{tag} 0", unseen=True).poke({}) is False
    flagged = sensor(o365mail_conn, folders=source, subject=f"{tag} 1", post_action="flag").poke({})
    assert len(flagged.xcom_value) == 1
    assert len(sensor(o365mail_conn, folders=source, criteria="FLAGGED").poke({}).xcom_value) == 1
    moved = sensor(o365mail_conn, folders=source, subject=tag, post_action="move", move_to=target).poke({})
    assert len(moved.xcom_value) == 3
    assert sensor(o365mail_conn, folders=source, subject=tag).poke({}) is False
    assert len(sensor(o365mail_conn, folders=target, subject=tag).poke({}).xcom_value) == 3


def test_raw_criteria_escape_hatch(o365mail_conn, o365_sandbox):
    sbx = o365_sandbox
    folder = f"Raw {uuid.uuid4().hex[:6]}"
    tag = unique("raw")
    append_messages(sbx, sbx.user, folder, [raw_message(f"{tag} a"), raw_message(f"{tag} b", sender="x@other.test")])
    found = sensor(o365mail_conn, folders=folder, criteria=f'SUBJECT "{tag}" NOT FROM "other.test"').poke({})
    assert [m["subject"] for m in found.xcom_value] == [f"{tag} a"]


def test_revoked_consent_fails_the_sensor_instead_of_poking_forever(o365mail_conn, o365_sandbox, o365_admin):
    s = sensor(o365mail_conn, subject="never", poke_interval=1, timeout=60)
    assert s.poke({}) is False
    o365_admin.revoke_consent(o365_sandbox.user, o365_sandbox.client_id)
    o365_admin.update_settings(clock_offset=4000)
    # Exchange ends a session whose token expired (BYE AccessTokenExpired); Dovecot checks tokens only
    # at login, so the process's reused IMAP session is ended here the way Exchange would end it.
    O365MailHook(o365mail_conn).imap_pool().close_idle()
    with pytest.raises(ReauthorizationRequired, match=f"airflow o365mail authorize --conn-id {o365mail_conn}"):
        s.poke({})
