"""O365ImapAttachmentOperator against Dovecot: exact bytes, hostile names stay inside the target."""

from __future__ import annotations

import base64
import hashlib
import os
import uuid
from pathlib import Path

from airflow_provider_o365mail.hooks.o365mail import O365MailHook
from airflow_provider_o365mail.operators.imap_attachments import O365ImapAttachmentOperator
from airflow_provider_o365mail.sensors.imap import O365ImapSensor
from airflow_provider_o365mail.testing.airflow_services import wait_until
from airflow_provider_o365mail.testing.mailbox import append_messages


def test_downloads_exact_bytes_filtered_by_name(o365mail_conn, o365_sandbox, tmp_path):
    sbx = o365_sandbox
    source = tmp_path / "src"
    source.mkdir()
    big = source / "extract 2026.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024 + 17))  # several 1 MiB slices, odd length
    csv = source / "summary.csv"
    csv.write_bytes("région;total\r\nÎle;1\n".encode())
    subject = f"attachments {uuid.uuid4().hex[:8]}"
    O365MailHook(o365mail_conn).send_email(to=sbx.user, subject=subject, text_content="x", files=[big, csv])
    sensor = O365ImapSensor(task_id="s", conn_id=o365mail_conn, subject=subject)
    # Postfix hands the message to Dovecot after the 250: a 3 MB message can take a moment.
    messages = wait_until(lambda: sensor.poke({}) or None, 60, "the message in the INBOX")
    target = tmp_path / "out"
    written = O365ImapAttachmentOperator(
        task_id="a", conn_id=o365mail_conn, messages=messages.xcom_value, target_dir=target, attachment_name="*.BIN"
    ).execute({})
    assert written == [str(target / big.name)]
    assert hashlib.sha256(Path(written[0]).read_bytes()).digest() == hashlib.sha256(big.read_bytes()).digest()
    again = O365ImapAttachmentOperator(
        task_id="a", conn_id=o365mail_conn, messages=str(messages.xcom_value), target_dir=target
    ).execute({})
    assert sorted(Path(p).name for p in again) == ["extract 2026 (1).bin", "summary.csv"]
    assert (target / "summary.csv").read_bytes() == csv.read_bytes()


def hostile_message(names: list[str]) -> bytes:
    parts = []
    for name in names:
        parts.append(
            "--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
            f'Content-Disposition: attachment; filename="{name}"\r\n\r\n'
            + base64.b64encode(name.encode()).decode()
            + "\r\n"
        )
    return (
        "From: attacker@evil.test\r\nSubject: hostile names\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        + "".join(parts)
        + "--b--\r\n"
    ).encode()


def test_hostile_file_names_cannot_leave_the_target_directory(o365mail_conn, o365_sandbox, tmp_path):
    sbx = o365_sandbox
    folder = f"Hostile attachments {uuid.uuid4().hex[:6]}"
    names = ["../../../../tmp/pwned.txt", "..\\\\..\\\\win.ini", "/etc/cron.d/x", ".profile", "same.txt", "same.txt"]
    append_messages(sbx, sbx.user, folder, [hostile_message(names)])
    messages = O365ImapSensor(task_id="s", conn_id=o365mail_conn, folders=folder).poke({}).xcom_value
    target = tmp_path / "inbox-files"
    written = O365ImapAttachmentOperator(
        task_id="a", conn_id=o365mail_conn, messages=messages, target_dir=target
    ).execute({})
    assert len(written) == len(names)
    for path in map(Path, written):
        assert path.resolve().parent == target.resolve(), path
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["pwned.txt", "win.ini", "x", "profile", "same.txt", "same (1).txt"]
    )
    assert not Path("/tmp/pwned.txt").exists() or Path("/tmp/pwned.txt").read_bytes() != names[0].encode()
