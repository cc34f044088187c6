"""Sending through the sandbox's Microsoft Graph stand-in with the provider's hook, read back from Dovecot.

What arrived is counted over IMAP by Message-ID in the recipients' mailboxes, never taken from the
provider's or the stand-in's word.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid

import pytest

from airflow_provider_o365mail.exceptions import (
    ConsentRevoked,
    GraphRequestRefused,
    MessageRejectedError,
)
from airflow_provider_o365mail.hooks.o365mail import O365MailHook
from airflow_provider_o365mail.testing import mailbox as mb
from airflow_provider_o365mail.testing.mailbox import wait_for_messages, with_subject
from airflow_provider_o365mail.testing.sandbox import GRAPH

PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8cfc0000003010100"
    "18dd8db00000000049454e44ae426082"
)
MiB = 1024 * 1024


def unique(prefix: str) -> str:
    return f"{prefix} {uuid.uuid4().hex[:8]}"


def copies(sbx, upn: str, message_id: str, folder: str = "INBOX") -> int:
    """Messages of ``folder`` whose Message-ID is exactly ``message_id``."""
    with mb.imap_session(sbx, upn) as client:
        client.select_folder(folder, readonly=True)
        uids = client.search(["HEADER", "Message-ID", message_id])
        fetched = client.fetch(uids, ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]) if uids else {}
    values = [next(iter(v for k, v in data.items() if k.startswith(b"BODY"))) for data in fetched.values()]
    return sum(1 for raw in values if mb.parse(raw)["Message-ID"].strip() == message_id)


def delivered_once(sbx, conn_id: str, upn: str, message_ids: list[str]) -> dict[str, int]:
    """Copies of each Message-ID in ``upn``'s INBOX once a control message sent after them has arrived
    (the stand-in delivers in the order it answers; Postfix delivers locally at once)."""
    control = O365MailHook(conn_id).send_email(to=upn, subject=unique("control"), text_content="control")
    deadline = time.monotonic() + 60
    while copies(sbx, upn, control) < 1:
        assert time.monotonic() < deadline, "the control message did not arrive"
        time.sleep(0.3)
    return {message_id: copies(sbx, upn, message_id) for message_id in message_ids}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_small_mail_by_graph_arrives_intact_for_to_cc_and_bcc(graph_conn, o365_sandbox, o365_admin, tmp_path):
    sbx = o365_sandbox
    conn_id = graph_conn()
    report = tmp_path / "Überblick – Q3.csv"
    report.write_bytes("région,montant\r\nÎle-de-France,12\n".encode())
    logo = tmp_path / "logo.png"
    logo.write_bytes(PNG)
    subject = unique("Grüße – Graph ✓")
    message_id = O365MailHook(conn_id).send_email(
        to=f"Zoë Ærø <{sbx.user}>",
        cc=f'"Doe, Blair" <{sbx.second_user}>',
        bcc=sbx.shared_mailbox,
        subject=subject,
        text_content="Plain text: naïve café",
        html_content='<p>HTML: naïve café <img src="cid:logo"></p>',
        files=[report],
        inline_images={"logo": logo},
        custom_headers={"X-Report-Id": "Q3-2026"},
    )
    for upn in (sbx.user, sbx.second_user, sbx.shared_mailbox):
        (msg,) = wait_for_messages(sbx, upn, with_subject(subject))
        assert msg["Message-ID"] == message_id
        assert "Bcc" not in msg, "no Bcc header in any copy"
        if upn != sbx.shared_mailbox:
            assert sbx.shared_mailbox not in str(msg), "no trace of the Bcc recipient in the others' copies"
        assert msg["To"].addresses[0].display_name == "Zoë Ærø"
        assert msg["X-Report-Id"] == "Q3-2026"
        assert msg.get_body(("plain",)).get_content().strip() == "Plain text: naïve café"
        images = [p for p in msg.walk() if p["Content-ID"] == "<logo>"]
        assert len(images) == 1 and images[0].get_content() == PNG
        attachments = {a.get_filename(): a.get_payload(decode=True) for a in msg.iter_attachments()}
        assert attachments[report.name] == report.read_bytes()
    deliveries = [d for d in o365_admin.graph_deliveries() if d.get("message_id") == message_id]
    assert deliveries, "the message went through Graph, not SMTP"


def test_large_mail_goes_as_a_draft_with_upload_sessions_and_arrives_intact(graph_conn, o365_sandbox, tmp_path):
    sbx = o365_sandbox
    conn_id = graph_conn()
    big = tmp_path / "extract.bin"
    big.write_bytes(os.urandom(12 * MiB))
    medium = tmp_path / "medium.pdf"
    medium.write_bytes(os.urandom(2 * MiB))
    small = tmp_path / "notes.txt"
    small.write_bytes(b"a few notes\r\n")
    subject = unique("graph large")
    message_id = O365MailHook(conn_id).send_email(
        to=sbx.second_user,
        bcc=sbx.shared_mailbox,
        subject=subject,
        text_content="see attached",
        files=[big, medium, small],
    )
    for upn in (sbx.second_user, sbx.shared_mailbox):
        (msg,) = wait_for_messages(sbx, upn, with_subject(subject), timeout=120)
        assert msg["Message-ID"] == message_id
        assert "Bcc" not in msg
        attachments = {a.get_filename(): a.get_payload(decode=True) for a in msg.iter_attachments()}
        assert {name: _sha(data) for name, data in attachments.items()} == {
            p.name: _sha(p.read_bytes()) for p in (big, medium, small)
        }


def test_large_mail_needs_mail_readwrite_and_says_so(graph_conn, o365_sandbox):
    conn_id = graph_conn(graph_permissions="Mail.Send")
    hook = O365MailHook(conn_id)
    assert not hook.graph_can_read()
    with pytest.raises(Exception, match="Mail.ReadWrite"):
        hook.send_email(to=o365_sandbox.second_user, subject="too big", text_content="x" * (5 * MiB))


def test_throttling_is_waited_out_and_nothing_is_sent_twice(graph_conn, o365_sandbox, o365_admin):
    sbx = o365_sandbox
    conn_id = graph_conn()
    o365_admin.graph_throttle(count=3, retry_after=1, operation="sendMail")
    tag = unique("throttled")
    hook = O365MailHook(conn_id)
    ids = [hook.send_email(to=sbx.second_user, subject=f"{tag} #{i}", text_content="x") for i in range(3)]
    assert set(delivered_once(sbx, conn_id, sbx.second_user, ids).values()) == {1}


def test_four_concurrent_requests_at_most_and_refusals_are_waited_out(graph_conn, o365_sandbox, o365_admin):
    """Eight threads of one process send at once: the budget keeps 4 in flight; the stand-in's
    MailboxConcurrency refusals (from other apps' requests in real life) are waited out."""
    sbx = o365_sandbox
    conn_id = graph_conn()
    tag = unique("concurrent")
    ids: list[str] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            ids.append(O365MailHook(conn_id).send_email(to=sbx.second_user, subject=f"{tag} #{i}", text_content="x"))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len(ids) == 8
    assert set(delivered_once(sbx, conn_id, sbx.second_user, ids).values()) == {1}
    counters = o365_admin.graph_counters(mailbox=sbx.user)
    assert 1 <= counters["peak_concurrency"] <= 4, counters


def test_a_lost_answer_is_looked_up_in_sent_items_not_resent(graph_conn, o365_sandbox, o365_admin):
    sbx = o365_sandbox
    conn_id = graph_conn()
    o365_admin.graph_fault("after_delivery", status=504, code="GatewayTimeout", operation="sendMail")
    subject = unique("504 but delivered")
    message_id = O365MailHook(conn_id).send_email(to=sbx.second_user, subject=subject, text_content="x")
    (msg,) = wait_for_messages(sbx, sbx.second_user, with_subject(subject))
    assert msg["Message-ID"] == message_id
    assert delivered_once(sbx, conn_id, sbx.second_user, [message_id]) == {message_id: 1}


def test_a_dropped_connection_after_delivery_is_not_resent(graph_conn, o365_sandbox, o365_admin):
    sbx = o365_sandbox
    conn_id = graph_conn()
    o365_admin.graph_fault("drop_after_delivery", operation="sendMail")
    subject = unique("dropped after delivery")
    message_id = O365MailHook(conn_id).send_email(to=sbx.second_user, subject=subject, text_content="x")
    wait_for_messages(sbx, sbx.second_user, with_subject(subject))
    assert delivered_once(sbx, conn_id, sbx.second_user, [message_id]) == {message_id: 1}


def test_send_as_without_rights_names_the_fix(graph_conn, o365_sandbox):
    conn_id = graph_conn()
    with pytest.raises(MessageRejectedError, match="ErrorSendAsDenied") as caught:
        O365MailHook(conn_id).send_email(
            from_email=o365_sandbox.second_user, to=o365_sandbox.user, subject="send as", text_content="x"
        )
    assert "Send As" in str(caught.value)


def test_missing_graph_consent_says_authorize_again(graph_conn, o365_sandbox, o365_admin):
    conn_id = graph_conn()
    o365_admin.revoke_consent(o365_sandbox.user, o365_sandbox.client_id, resource=GRAPH)
    try:
        with pytest.raises(ConsentRevoked, match="Microsoft Graph") as caught:
            O365MailHook(conn_id).send_email(to=o365_sandbox.second_user, subject="no consent", text_content="x")
        assert "authorize" in str(caught.value)
    finally:
        o365_sandbox.new_refresh_token()  # consent again for the other tests (the stand-in keeps grants per user)


def test_mailbox_without_rest_access_names_the_cause(graph_conn, o365_sandbox, o365_admin):
    conn_id = graph_conn()
    o365_admin.graph_mailbox(o365_sandbox.user, rest_enabled=False)
    with pytest.raises(GraphRequestRefused, match="MailboxNotEnabledForRESTAPI") as caught:
        O365MailHook(conn_id).send_email(to=o365_sandbox.second_user, subject="no rest", text_content="x")
    assert caught.value.code == "MailboxNotEnabledForRESTAPI"


def test_auto_sends_by_graph_when_smtp_auth_is_disabled(graph_conn, o365_sandbox, o365_admin, caplog):
    sbx = o365_sandbox
    conn_id = graph_conn(transport="auto")
    o365_admin.update_user(sbx.user, smtp_auth_enabled=False)
    try:
        tag = unique("auto")
        hook = O365MailHook(conn_id)
        with caplog.at_level("WARNING", logger="airflow_provider_o365mail.hooks.fallback"):
            ids = [hook.send_email(to=sbx.second_user, subject=f"{tag} #{i}", text_content="x") for i in range(2)]
        assert set(delivered_once(sbx, conn_id, sbx.second_user, ids).values()) == {1}
        sent_by_graph = {d.get("message_id") for d in o365_admin.graph_deliveries()}
        assert set(ids) <= sent_by_graph
        warnings = [r for r in caplog.records if "SMTP AUTH is disabled" in r.getMessage()]
        assert len(warnings) == 1 and "5.7.139" in warnings[0].getMessage()
    finally:
        o365_admin.update_user(sbx.user, smtp_auth_enabled=True)


def test_auto_keeps_smtp_while_it_works(graph_conn, o365_sandbox, o365_admin):
    sbx = o365_sandbox
    conn_id = graph_conn(transport="auto")
    message_id = O365MailHook(conn_id).send_email(to=sbx.second_user, subject=unique("auto smtp"), text_content="x")
    assert delivered_once(sbx, conn_id, sbx.second_user, [message_id]) == {message_id: 1}
    assert message_id not in {d.get("message_id") for d in o365_admin.graph_deliveries()}


def test_send_as_a_shared_mailbox_with_rights_and_mail_send_shared(graph_conn, o365_sandbox, o365_admin):
    sbx = o365_sandbox
    conn_id = graph_conn(graph_permissions="Mail.Send Mail.ReadWrite Mail.Send.Shared")
    o365_admin.graph_mailbox(sbx.shared_mailbox, send_as=[sbx.user])
    subject = unique("send as shared")
    message_id = O365MailHook(conn_id).send_email(
        from_email=sbx.shared_mailbox, to=sbx.second_user, subject=subject, text_content="x"
    )
    (msg,) = wait_for_messages(sbx, sbx.second_user, with_subject(subject))
    assert msg["Message-ID"] == message_id
    assert msg["From"].addresses[0].addr_spec == sbx.shared_mailbox


def test_app_only_sends_as_the_mailbox_through_users_path(o365_sandbox, o365_admin, monkeypatch, tmp_path):
    sbx = o365_sandbox
    o365_admin.graph_reset()
    extra = sbx.connection_extra(
        grant_type="client_credentials",
        scopes="https://outlook.office365.com/.default",
        transport="graph",
        graph_url=sbx.graph_url,
    )
    del extra["refresh_token"]
    conn_id = f"o365mail_{uuid.uuid4().hex[:10]}"
    body = {"conn_type": "o365mail", "login": sbx.app_client_id, "password": sbx.app_client_secret, "extra": extra}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(body))
    hook = O365MailHook(conn_id)
    assert hook.settings.graph_scopes == (f"{GRAPH}/.default",)
    tag = unique("app-only")
    small = hook.send_email(to=sbx.second_user, subject=f"{tag} small", text_content="x")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(5 * MiB))
    large = hook.send_email(to=sbx.second_user, subject=f"{tag} large", text_content="y", files=[big])
    assert set(delivered_once(sbx, conn_id, sbx.second_user, [small, large]).values()) == {1}
    mailboxes = {d.get("message_id"): d.get("mailbox") for d in o365_admin.graph_deliveries()}
    assert mailboxes[small] == mailboxes[large] == sbx.user


def test_an_abandoned_draft_is_deleted_and_the_mail_sent_once(graph_conn, o365_sandbox, o365_admin, tmp_path):
    """The upload session is lost mid-way (404 on a chunk): the draft is deleted and a new one sent; Drafts
    holds no copy afterwards (counted over IMAP), the recipient exactly one."""
    sbx = o365_sandbox
    conn_id = graph_conn()
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(9 * MiB))
    o365_admin.graph_fault(
        status=404, code="itemNotFound", message="The upload session was not found.", operation="uploadChunk"
    )
    message_id = O365MailHook(conn_id).send_email(
        to=sbx.second_user, subject=unique("abandoned"), files=[big], text_content="x"
    )
    assert delivered_once(sbx, conn_id, sbx.second_user, [message_id]) == {message_id: 1}
    assert copies(sbx, sbx.user, message_id, folder="Drafts") == 0
