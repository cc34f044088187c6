"""Broken and random MIME in a real Dovecot folder: the sensor summarises every message, never crashes."""

from __future__ import annotations

import json
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_provider_o365mail.sensors.imap import O365ImapSensor
from airflow_provider_o365mail.testing.mailbox import append_messages, recreate_folder

HAND_MADE = [
    b"no headers at all, just a body line\r\n",
    b"Subject: =?utf-8?q?broken=ZZ?= =?unknown-charset?b?AAAA?=\r\nFrom: <@>\r\n\r\nbody\r\n",
    b"Subject: \xff\xfe raw 8-bit \xc3\x28 bytes\r\nFrom: \xe4\xf6 <x@y>\r\n\r\n\xff\r\n",
    b"Subject: missing boundary\r\nContent-Type: multipart/mixed\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n",
    b"Subject: unterminated\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: application/pdf; "
    b'name="a.pdf"\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!\r\n',
    b"Subject: rfc2231 broken\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n"
    b"Content-Disposition: attachment; filename*0*=bogus-charset''%ZZ; filename*2=tail\r\n\r\nx\r\n--b--\r\n",
    b"Subject: deep\r\n"
    + b"".join(f"Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n".encode() for i in range(60))
    + b"Content-Type: text/plain\r\n\r\ndeep\r\n",
    b"Subject: nested message\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\nContent-Type: multipart/mixed; "
    b"boundary=q\r\n\r\n--q\r\nContent-Disposition: attachment\r\n\r\nx\r\n",
    b"Subject: disposition only\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment\r\n\r\nx\r\n",
    b"From: a@b\r\nTo: undisclosed-recipients:;\r\nCc: group: a@b, c@d;\r\nSubject: groups\r\nDate: not a date\r\n\r\nx\r\n",
    b"Subject: " + b"long " * 3000 + b"\r\n\r\nx\r\n",
]

header_names = st.sampled_from(
    [
        "Subject",
        "From",
        "To",
        "Cc",
        "Date",
        "Message-ID",
        "Content-Type",
        "Content-Disposition",
        "Content-Transfer-Encoding",
        "X-Junk",
    ]
)
header_values = st.one_of(
    st.text(max_size=80).map(lambda t: t.replace("\r", " ").replace("\n", " ")),
    st.sampled_from(
        [
            "multipart/mixed; boundary=zz",
            "multipart/alternative",
            'application/octet-stream; name="=?utf-8?b?w6Q=?="',
            "attachment; filename*=utf-8''%E2%82%AC.txt",
            "base64",
            "=?utf-8?q?=C3=A4?=",
        ]
    ),
)
bodies = st.lists(
    st.one_of(st.text(max_size=60), st.sampled_from(["--zz", "--zz--", "Content-Type: text/html", ""])),
    max_size=12,
)
raw_messages = st.builds(
    lambda headers, body: (
        "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n" + "\r\n".join(body) + "\r\n"
    ).encode("utf-8", "surrogatepass"),
    st.lists(st.tuples(header_names, header_values), max_size=10),
    bodies,
)


def test_every_broken_message_gets_a_summary(o365mail_conn, o365_sandbox):
    sbx = o365_sandbox
    folder = f"Broken {uuid.uuid4().hex[:6]}"
    recreate_folder(sbx, sbx.user, folder)
    append_messages(sbx, sbx.user, folder, HAND_MADE)
    result = O365ImapSensor(task_id="broken", conn_id=o365mail_conn, folders=folder, max_messages=1000).poke({})
    summaries = result.xcom_value
    assert len(summaries) == len(HAND_MADE)
    json.dumps(summaries)
    by_subject = {m["subject"]: m for m in summaries}
    assert by_subject["unterminated"]["attachments"][0]["name"] == "a.pdf"
    assert by_subject["disposition only"]["attachments"][0]["name"].startswith("part-")


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(messages=st.lists(raw_messages, min_size=1, max_size=8))
def test_random_mime_in_dovecot_never_breaks_the_sensor(o365mail_conn, o365_sandbox, messages):
    sbx = o365_sandbox
    folder = "Random MIME"
    recreate_folder(sbx, sbx.user, folder)
    append_messages(sbx, sbx.user, folder, messages)
    result = O365ImapSensor(task_id="random", conn_id=o365mail_conn, folders=folder, max_messages=1000).poke({})
    assert len(result.xcom_value) == len(messages)
    json.dumps(result.xcom_value)
