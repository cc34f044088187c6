"""Large mail through the Graph stand-in: a 100 MB attachment through an upload session that loses a
chunk's answer (or gets a 503) mid-way, MaxSendSize, and Airflow's notifier and email backend with
``transport: graph``.

What arrived is read back over IMAP from the recipient's INBOX (the attachment's sha256, copies by
Message-ID); the stand-in's delivery log and counters say which transport and requests carried it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from test_graph_sending import delivered_once, unique

from airflow_provider_o365mail.exceptions import MessageTooLargeError
from airflow_provider_o365mail.hooks.o365mail import O365MailHook
from airflow_provider_o365mail.notifications.email import O365EmailNotifier
from airflow_provider_o365mail.testing import mailbox as mb
from airflow_provider_o365mail.testing.mailbox import wait_for_messages, with_subject
from airflow_provider_o365mail.utils.email import send_email as email_backend

MiB = 1024 * 1024
ATTACHMENT_SIZE = 100 * MiB
#: The sending process may grow by this much at most while it sends the 100 MB attachment (its file is
#: read one 3.75 MiB chunk at a time; holding it, or its 137 MB of base64, would cross this at once).
MAX_GROWTH = 40 * MiB

SEND_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from airflow_provider_o365mail.hooks.o365mail import O365MailHook

    def peak_rss():
        # VmHWM: this process's own peak (getrusage's ru_maxrss starts at the forking parent's peak).
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

    conn_id, to, subject, path = sys.argv[1:5]
    hook = O365MailHook(conn_id)
    # Warm up (imports, tokens, TLS, the code path) with a small mail, then measure the large one.
    hook.send_email(to=to, subject=subject + " warm-up", text_content="warm-up")
    before = peak_rss()
    message_id = hook.send_email(to=to, subject=subject, text_content="see attached", files=[path])
    after = peak_rss()
    print(json.dumps({"message_id": message_id, "peak_before": before, "peak_after": after}))
    """
)


@pytest.fixture(scope="module")
def hundred_mib_file(tmp_path_factory):
    """100 MiB of random bytes (written 1 MiB at a time) and their sha256."""
    path = tmp_path_factory.mktemp("graph-large") / "archive-100mb.bin"
    digest = hashlib.sha256()
    with path.open("wb") as handle:
        for _ in range(ATTACHMENT_SIZE // MiB):
            piece = os.urandom(MiB)
            digest.update(piece)
            handle.write(piece)
    yield path, digest.hexdigest()
    path.unlink(missing_ok=True)


def attachment_sha256(sbx, upn: str, message_id: str) -> list[tuple[str, str]]:
    """``(content type, sha256)`` of each non-text part of the INBOX message, fetched over IMAP 8 MiB at
    a time (partial FETCH) and decoded as it comes: the test process never holds the whole part."""
    with mb.imap_session(sbx, upn) as client:
        client.select_folder("INBOX", readonly=True)
        (uid,) = client.search(["HEADER", "Message-ID", message_id])
        structure = client.fetch([uid], ["BODYSTRUCTURE"])[uid][b"BODYSTRUCTURE"]
        parts = structure[0] if structure.is_multipart else [structure]
        found = []
        for number, part in enumerate(parts, 1):
            if isinstance(part[0], list) or part[0].lower() in (b"text", b"multipart"):
                continue
            digest, carry, offset, step = hashlib.sha256(), b"", 0, 8 * MiB
            while True:
                answer = client.fetch([uid], [f"BODY.PEEK[{number}]<{offset}.{step}>"])[uid]
                piece = next(v for k, v in answer.items() if k.startswith(f"BODY[{number}]".encode())) or b""
                text = carry + piece.replace(b"\r", b"").replace(b"\n", b"")
                usable = len(text) - len(text) % 4
                digest.update(base64.b64decode(text[:usable], validate=True))
                carry = text[usable:]
                offset += len(piece)
                if len(piece) < step:
                    break
            assert not carry, "the base64 body ends on a whole group"
            found.append((f"{part[0].decode()}/{part[1].decode()}".lower(), digest.hexdigest()))
    return found


def send_in_subprocess(conn_id: str, to: str, subject: str, path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SEND_SCRIPT, conn_id, to, subject, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )


def upload_chunks(admin, upn: str) -> int:
    return admin.graph_counters(mailbox=upn).get("by_operation", {}).get("uploadChunk", 0)


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "drop_after_delivery"},
        {"kind": "error", "status": 503, "code": "ServiceUnavailable", "retry_after": 1},
    ],
    ids=["chunk-answer-dropped", "chunk-503"],
)
def test_100mb_attachment_survives_a_chunk_fault_mid_way_intact_and_once(
    graph_conn, o365_sandbox, o365_admin, hundred_mib_file, fault
):
    sbx = o365_sandbox
    path, expected_sha = hundred_mib_file
    conn_id = graph_conn()
    o365_admin.graph_mailbox(sbx.user, max_send_size=150 * MiB)
    subject = unique("graph 100 MB")
    sender = send_in_subprocess(conn_id, sbx.second_user, subject, path)
    try:
        # Mid-way: once a few chunks are in (27 in all), the next chunk meets the fault.
        deadline = time.monotonic() + 300
        while upload_chunks(o365_admin, sbx.user) < 4:
            assert sender.poll() is None, sender.communicate()
            assert time.monotonic() < deadline, "the upload did not start"
            time.sleep(0.1)
        o365_admin.graph_fault(
            fault["kind"], operation="uploadChunk", mailbox=sbx.user, **{k: v for k, v in fault.items() if k != "kind"}
        )
        out, err = sender.communicate(timeout=600)
    finally:
        if sender.poll() is None:
            sender.kill()
    assert sender.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    message_id = result["message_id"]

    state = o365_admin.graph_state()
    assert [f for f in state["fired"] if f["operation"] == "uploadChunk"] == [
        {"kind": fault["kind"], "operation": "uploadChunk", "mailbox": sbx.user.lower()}
    ], "the fault hit one chunk"
    by_operation = o365_admin.graph_counters(mailbox=sbx.user)["by_operation"]
    chunks = -(-ATTACHMENT_SIZE // (12 * 320 * 1024))
    assert by_operation["uploadChunk"] == chunks + 1, "the faulted chunk once more, nothing else twice"
    assert by_operation["createMessage"] == 1 and by_operation["send"] == 1, "one draft, sent once"

    assert delivered_once(sbx, conn_id, sbx.second_user, [message_id]) == {message_id: 1}
    assert attachment_sha256(sbx, sbx.second_user, message_id) == [("application/octet-stream", expected_sha)]
    assert [d for d in o365_admin.graph_deliveries() if d.get("message_id") == message_id], "sent through Graph"

    growth = result["peak_after"] - result["peak_before"]
    assert growth < MAX_GROWTH, f"sending 100 MB grew the process's peak RSS by {growth / MiB:.0f} MiB"


def test_a_message_over_max_send_size_fails_naming_the_fix_and_sends_nothing(
    graph_conn, o365_sandbox, o365_admin, tmp_path
):
    sbx = o365_sandbox
    conn_id = graph_conn()
    o365_admin.graph_mailbox(sbx.user, max_send_size=5 * MiB)
    big = tmp_path / "too-big.bin"
    big.write_bytes(os.urandom(6 * MiB))
    subject = unique("over MaxSendSize")
    before = {d.get("message_id") for d in o365_admin.graph_deliveries()}
    with pytest.raises(MessageTooLargeError) as caught:
        O365MailHook(conn_id).send_email(to=sbx.second_user, subject=subject, text_content="x", files=[big])
    text = str(caught.value)
    assert "MaxSendSize" in text and "Set-Mailbox -MaxSendSize" in text and "smaller files or links" in text
    o365_admin.graph_mailbox(sbx.user, max_send_size=35 * MiB)
    control = delivered_once(sbx, conn_id, sbx.second_user, [])  # a control mail sent after it has arrived
    assert control == {}
    with mb.imap_session(sbx, sbx.second_user) as client:
        client.select_folder("INBOX", readonly=True)
        assert client.search(["SUBJECT", subject]) == [], "nothing of it arrived"
    after = {d.get("message_id") for d in o365_admin.graph_deliveries()}
    assert len(after - before) == 1, "only the control message went out"
    assert o365_admin.graph_counters(mailbox=sbx.user)["by_operation"].get("send", 0) == 0, "no draft was sent"


def test_notifier_and_email_backend_send_through_graph(graph_conn, o365_sandbox, o365_admin):
    sbx = o365_sandbox
    conn_id = graph_conn()
    tag = unique("graph alerts")
    notifier = O365EmailNotifier(
        to=sbx.second_user,
        conn_id=conn_id,
        subject=f"{tag} notifier",
        html_content="<p>task failed</p>",
        custom_headers={"X-Tag": tag},
    )
    notifier.notify({})
    backend_id = email_backend(
        sbx.second_user, f"{tag} backend", "<p>legacy alert</p>", conn_id=conn_id, from_email="airflow@airflow"
    )
    (notified,) = wait_for_messages(sbx, sbx.second_user, with_subject(f"{tag} notifier"))
    (legacy,) = wait_for_messages(sbx, sbx.second_user, with_subject(f"{tag} backend"))
    assert notified["X-Tag"] == tag and legacy["Message-ID"] == backend_id
    assert legacy["From"].addresses[0].addr_spec == sbx.user
    ids = [notified["Message-ID"], backend_id]
    assert delivered_once(sbx, conn_id, sbx.second_user, ids) == dict.fromkeys(ids, 1)
    by_graph = [d.get("message_id") for d in o365_admin.graph_deliveries()]
    assert by_graph.count(ids[0]) == 1 and by_graph.count(ids[1]) == 1, "both went through Graph, once"
