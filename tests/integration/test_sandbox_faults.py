"""The sandbox behaves like Exchange Online where a DAG workload meets its limits (#12, #13, #14).

Per-mailbox IMAP and SMTP session caps, SMTP reply injection and lost replies, Sent Items copies,
the fault proxy in front of the real Dovecot, hostile messages delivered into folders.
"""

from __future__ import annotations

import contextlib
import email.utils
import imaplib
import smtplib
import socket
import ssl
import time
import uuid
from collections.abc import Iterator

import pytest
import requests

from airflow_provider_o365mail.testing import hostile_mail
from airflow_provider_o365mail.testing.airflow_services import wait_until
from airflow_provider_o365mail.testing.fault_proxy import FaultProxy
from airflow_provider_o365mail.testing.mailbox import fetch_raw_messages
from airflow_provider_o365mail.testing.sandbox import Sandbox, SandboxInfo

QUOTA = "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message"


# ---------------------------------------------------------------------------------------- helpers
class Token:
    """An access token that pytest cannot print: failure reports show arguments and fixture values."""

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "Token(<hidden>)"


def imap_login(info: SandboxInfo, upn: str, token: Token, port: int | None = None) -> imaplib.IMAP4_SSL:
    client = imaplib.IMAP4_SSL(
        "127.0.0.1",
        port or info.imap_port,
        ssl_context=ssl.create_default_context(cafile=info.ca_file),
        timeout=20,
    )
    sasl = f"user={upn}\x01auth=Bearer {token.value}\x01\x01".encode()
    try:
        client.authenticate("XOAUTH2", lambda challenge: b"" if challenge else sasl)
    except Exception:
        with contextlib.suppress(Exception):
            client.shutdown()
        raise
    return client


def smtp_login(info: SandboxInfo, upn: str, token: Token, port: int | None = None) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port or info.smtp_port, timeout=20)
    client.starttls(context=ssl.create_default_context(cafile=info.ca_file))
    client.ehlo()
    sasl = f"user={upn}\x01auth=Bearer {token.value}\x01\x01"
    client.auth("XOAUTH2", lambda challenge=None: "" if challenge else sasl, initial_response_ok=False)
    return client


def message(sender: str, to: str, subject: str | None = None) -> tuple[bytes, str]:
    message_id = f"<{uuid.uuid4().hex}@faults.sandbox.test>"
    raw = (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject or message_id}\r\n"
        f"Date: {email.utils.formatdate()}\r\nMessage-ID: {message_id}\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\nbody of {message_id}\r\n"
    ).encode()
    return raw, message_id


def wait_for_count(info: SandboxInfo, upn: str, folder: str, needle: bytes, count: int, timeout: float = 15) -> int:
    deadline = time.monotonic() + timeout
    while True:
        found = sum(needle in raw for raw in fetch_raw_messages(info, upn, folder))
        if found >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


@pytest.fixture
def tokens(o365_sandbox, o365_admin) -> dict[str, Token]:
    mailboxes = (o365_sandbox.user, o365_sandbox.second_user, o365_sandbox.shared_mailbox)
    return {upn: Token(o365_admin.mint_access_token(upn)) for upn in mailboxes}


@contextlib.contextmanager
def closing_all(clients: list) -> Iterator[list]:
    try:
        yield clients
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                client.logout() if isinstance(client, imaplib.IMAP4) else client.quit()


# ---------------------------------------------------------------------------------------- IMAP cap
def test_imap_cap_is_20_per_mailbox_with_dovecots_reply(o365_sandbox, o365_admin, tokens):
    # The shared mailbox: triggerers of other tests may still hold IDLE sessions on the user's.
    user, other = o365_sandbox.shared_mailbox, o365_sandbox.user
    assert o365_admin.mail_limits()["imap_connections"] == 20
    already_open = Sandbox(o365_sandbox.state_dir).imap_sessions(user)
    with closing_all([]) as held:
        for _ in range(20 - already_open):
            held.append(imap_login(o365_sandbox, user, tokens[user]))
        with pytest.raises(imaplib.IMAP4.error) as refused:
            imap_login(o365_sandbox, user, tokens[user])
        assert str(refused.value) == (
            "[LIMIT] Maximum number of connections from user+IP exceeded (mail_max_userip_connections=20)"
        )
        # per mailbox: another mailbox from the same IP still gets in
        held.append(imap_login(o365_sandbox, other, tokens[other]))
        held.pop(0).logout()
        deadline = time.monotonic() + 5
        while True:  # the slot is free once Dovecot has seen the logout
            try:
                held.append(imap_login(o365_sandbox, user, tokens[user]))
                break
            except imaplib.IMAP4.error:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert held[-1].noop()[0] == "OK"


def test_imap_cap_can_be_lowered_and_raised(o365_sandbox, o365_admin, tokens):
    user = o365_sandbox.shared_mailbox
    # The previous test's 20 logouts: Dovecot counts a session until it has processed its logout.
    wait_until(lambda: Sandbox(o365_sandbox.state_dir).imap_sessions(user) == 0, 10, "earlier sessions to close", 0.1)
    assert o365_admin.set_limits(imap_connections=2)["imap_connections"] == 2
    with closing_all([imap_login(o365_sandbox, user, tokens[user]) for _ in range(2)]):
        with pytest.raises(imaplib.IMAP4.error, match=r"mail_max_userip_connections=2\)"):
            imap_login(o365_sandbox, user, tokens[user])
        o365_admin.set_limits(imap_connections=3)
        with closing_all([imap_login(o365_sandbox, user, tokens[user])]):
            pass
    with pytest.raises(requests.HTTPError):
        o365_admin.set_limits(imap_connections=0)


# ---------------------------------------------------------------------------------------- SMTP cap
def test_smtp_cap_refuses_the_fourth_concurrent_session_of_a_mailbox(o365_sandbox, o365_admin, tokens):
    user, other = o365_sandbox.user, o365_sandbox.second_user
    o365_admin.reset_smtp_counters()
    with closing_all([smtp_login(o365_sandbox, user, tokens[user]) for _ in range(3)]) as held:
        for client in held:
            assert client.mail(user)[0] == 250
        fourth = smtp_login(o365_sandbox, user, tokens[user])  # AUTH itself succeeds...
        with closing_all([fourth]):
            assert fourth.mail(user) == (432, b"4.3.2 Concurrent connections limit exceeded.")  # ...MAIL does not
            other_client = smtp_login(o365_sandbox, other, tokens[other])
            with closing_all([other_client]):
                assert other_client.mail(other)[0] == 250  # the cap is per mailbox
            state = o365_admin.smtp_state()
            assert state["active"][user] == 3
            assert state["refused"][user] == 1
            held.pop().quit()
            deadline = time.monotonic() + 5
            while fourth.mail(user)[0] != 250:  # retrying in the same session works once a slot frees
                assert time.monotonic() < deadline
                fourth.rset()
                time.sleep(0.1)
    assert o365_admin.smtp_state()["max_concurrent"][user] == 3


def test_smtp_cap_can_be_raised(o365_sandbox, o365_admin, tokens):
    user = o365_sandbox.user
    assert o365_admin.set_limits(smtp_sessions=5)["smtp_sessions"] == 5
    with closing_all([smtp_login(o365_sandbox, user, tokens[user]) for _ in range(6)]) as held:
        codes = [client.mail(user)[0] for client in held]
    assert codes == [250] * 5 + [432]


def test_whole_messages_in_three_sessions_then_the_fourth_is_deferred(
    o365_sandbox, o365_admin, tokens, o365_clean_mailboxes
):
    user, other = o365_sandbox.user, o365_sandbox.second_user
    with closing_all([smtp_login(o365_sandbox, user, tokens[user]) for _ in range(4)]) as held:
        for client in held[:3]:
            client.sendmail(user, [other], message(user, other)[0])  # sessions stay open after the 250
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            held[3].sendmail(user, [other], message(user, other)[0])
    assert refused.value.smtp_code == 432


# ---------------------------------------------------------------------------------------- injection
@pytest.mark.parametrize(
    ("stage", "error"),
    [("mail", smtplib.SMTPSenderRefused), ("rcpt", smtplib.SMTPRecipientsRefused), ("data", smtplib.SMTPDataError)],
)
def test_injected_reply_at_each_stage_for_the_next_n(
    o365_sandbox, o365_admin, tokens, o365_clean_mailboxes, stage, error
):
    user, other = o365_sandbox.user, o365_sandbox.second_user
    o365_admin.inject_smtp_reply(QUOTA, stage=stage, count=2)
    client = smtp_login(o365_sandbox, user, tokens[user])
    with closing_all([client]):
        for _ in range(2):
            with pytest.raises(error) as refused:
                client.sendmail(user, [other], message(user, other)[0])
            text = str(refused.value)
            assert "554" in text and "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException" in text
            client.rset()
        raw, message_id = message(user, other)
        client.sendmail(user, [other], raw)  # the third goes through
    assert o365_admin.smtp_state()["injections"] == []
    assert wait_for_count(o365_sandbox, other, "INBOX", message_id.encode(), 1) == 1


def test_injection_only_for_one_mailbox_and_continuous_error_throttling_text(o365_sandbox, o365_admin, tokens):
    user, other = o365_sandbox.user, o365_sandbox.second_user
    o365_admin.inject_smtp_reply(
        "550 5.2.255 Continuous error throttling: invalid recipients", stage="mail", mailbox=other
    )
    mine = smtp_login(o365_sandbox, user, tokens[user])
    theirs = smtp_login(o365_sandbox, other, tokens[other])
    with closing_all([mine, theirs]):
        assert mine.mail(user)[0] == 250
        assert theirs.mail(other) == (550, b"5.2.255 Continuous error throttling: invalid recipients")
        theirs.rset()
        assert theirs.mail(other)[0] == 250


def test_temporary_421_reply_closes_the_session(o365_sandbox, o365_admin, tokens):
    user = o365_sandbox.user
    o365_admin.inject_smtp_reply("421 4.7.0 Service not available, closing transmission channel", stage="mail")
    client = smtp_login(o365_sandbox, user, tokens[user])
    assert client.mail(user)[0] == 421
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.noop()


def test_injection_api_refuses_what_a_milter_cannot_say(o365_admin):
    for bad in ("250 2.0.0 fine", "hello", "554 5.0.0 100% full"):
        with pytest.raises(requests.HTTPError) as refused:
            o365_admin.inject_smtp_reply(bad)
        assert refused.value.response.status_code == 400
    with pytest.raises(requests.HTTPError):
        o365_admin.inject_smtp_reply(QUOTA, stage="helo")


def test_lost_reply_delivers_but_the_client_never_sees_250(o365_sandbox, o365_admin, tokens, o365_clean_mailboxes):
    user, other = o365_sandbox.user, o365_sandbox.second_user
    o365_admin.lose_smtp_reply()
    raw, message_id = message(user, other)
    client = smtp_login(o365_sandbox, user, tokens[user])
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.sendmail(user, [other], raw)
    assert wait_for_count(o365_sandbox, other, "INBOX", message_id.encode(), 1) == 1
    assert wait_for_count(o365_sandbox, user, "Sent Items", message_id.encode(), 1) == 1
    state = o365_admin.smtp_state()
    assert state["lost_replies"][user] >= 1
    assert user not in state["active"]  # the cut session gave its slot back


# ---------------------------------------------------------------------------------------- Sent Items
def test_sent_items_holds_the_submitted_bytes_and_not_the_inbox(o365_sandbox, tokens, o365_clean_mailboxes):
    user, other = o365_sandbox.user, o365_sandbox.second_user
    raw, message_id = message(user, other)
    client = smtp_login(o365_sandbox, user, tokens[user])
    with closing_all([client]):
        client.sendmail(user, [other], raw)
    assert wait_for_count(o365_sandbox, user, "Sent Items", message_id.encode(), 1) == 1
    [copy] = fetch_raw_messages(o365_sandbox, user, "Sent Items")
    assert copy == raw  # exactly what the client submitted
    assert fetch_raw_messages(o365_sandbox, user, "INBOX") == []
    assert fetch_raw_messages(o365_sandbox, other, "Sent Items") == []
    [received] = fetch_raw_messages(o365_sandbox, other, "INBOX")
    assert received.endswith(raw)  # the recipient's copy: trace headers + the same message


def test_sent_items_to_self_counts_once_in_inbox(o365_sandbox, tokens, o365_clean_mailboxes):
    user = o365_sandbox.user
    raw, message_id = message(user, user)
    client = smtp_login(o365_sandbox, user, tokens[user])
    with closing_all([client]):
        client.sendmail(user, [user], raw)
    assert wait_for_count(o365_sandbox, user, "INBOX", message_id.encode(), 1) == 1
    assert wait_for_count(o365_sandbox, user, "Sent Items", message_id.encode(), 1) == 1
    time.sleep(0.5)
    assert len(fetch_raw_messages(o365_sandbox, user, "INBOX")) == 1


def test_send_as_copy_goes_to_the_authenticated_mailbox(o365_sandbox, tokens, o365_clean_mailboxes):
    user, shared, other = o365_sandbox.user, o365_sandbox.shared_mailbox, o365_sandbox.second_user
    raw, message_id = message(shared, other)
    client = smtp_login(o365_sandbox, user, tokens[user])
    with closing_all([client]):
        client.sendmail(shared, [other], raw)
    assert wait_for_count(o365_sandbox, user, "Sent Items", message_id.encode(), 1) == 1
    assert fetch_raw_messages(o365_sandbox, shared, "Sent Items") == []


def test_rejected_submission_leaves_no_sent_copy(o365_sandbox, o365_admin, tokens, o365_clean_mailboxes):
    user, other = o365_sandbox.user, o365_sandbox.second_user
    o365_admin.inject_smtp_reply(QUOTA, stage="data")
    client = smtp_login(o365_sandbox, user, tokens[user])
    with closing_all([client]), pytest.raises(smtplib.SMTPDataError):
        client.sendmail(user, [other], message(user, other)[0])
    time.sleep(1)
    assert fetch_raw_messages(o365_sandbox, user, "Sent Items") == []


def test_sent_items_copy_can_lag(o365_sandbox, o365_admin, tokens, o365_clean_mailboxes):
    user, other = o365_sandbox.user, o365_sandbox.second_user
    o365_admin.set_limits(sent_items_lag=3)
    raw, message_id = message(user, other)
    client = smtp_login(o365_sandbox, user, tokens[user])
    with closing_all([client]):
        client.sendmail(user, [other], raw)
    sent_at = time.monotonic()
    assert wait_for_count(o365_sandbox, other, "INBOX", message_id.encode(), 1) == 1
    assert time.monotonic() - sent_at < 2.5
    assert wait_for_count(o365_sandbox, user, "Sent Items", message_id.encode(), 1, timeout=0) == 0
    assert wait_for_count(o365_sandbox, user, "Sent Items", message_id.encode(), 1, timeout=15) == 1
    assert time.monotonic() - sent_at >= 2.5


# ---------------------------------------------------------------------------------------- fault proxy
def test_fault_proxy_in_front_of_dovecot(o365_sandbox, tokens):
    user = o365_sandbox.user
    with FaultProxy(("127.0.0.1", o365_sandbox.imap_port)) as proxy:
        client = imap_login(o365_sandbox, user, tokens[user], port=proxy.port)  # TLS end to end
        assert client.noop()[0] == "OK"
        client.select("INBOX")
        tag = client._new_tag().decode()
        client.send(f"{tag} IDLE\r\n".encode())
        assert client.readline().startswith(b"+ idling")
        up_before = proxy.stats().bytes_up
        assert proxy.reset() == 1
        with pytest.raises((ConnectionResetError, ssl.SSLError, imaplib.IMAP4.abort, OSError)):
            client.readline() or client.noop()
        stats = proxy.stats()
        assert stats.accepted == 1 and stats.active == 0 and stats.bytes_up == up_before
        # a second client through the same proxy: a stalled server direction makes the client time out
        second = imap_login(o365_sandbox, user, tokens[user], port=proxy.port)
        second.sock.settimeout(1)
        with proxy.stalled("down"), pytest.raises((TimeoutError, socket.timeout, imaplib.IMAP4.abort)):
            second.noop()
        proxy.drop()


def test_fault_proxy_in_front_of_postfix_starttls(o365_sandbox, tokens):
    user = o365_sandbox.user
    with FaultProxy(("127.0.0.1", o365_sandbox.smtp_port)) as proxy:
        client = smtp_login(o365_sandbox, user, tokens[user], port=proxy.port)  # STARTTLS end to end
        assert client.noop()[0] == 250
        assert proxy.drop() == 1
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
        with proxy.refusing(), pytest.raises(ConnectionRefusedError):
            smtp_login(o365_sandbox, user, tokens[user], port=proxy.port)
        assert proxy.stats().accepted == 1


# ---------------------------------------------------------------------------------------- hostile mail
def test_hostile_messages_are_delivered_and_visible(o365_sandbox, o365_clean_mailboxes):
    user = o365_sandbox.user
    folder = f"Hostile generators {uuid.uuid4().hex[:8]}"
    try:
        check_hostile_delivery(o365_sandbox, user, folder)
    finally:
        with closing_all([imap_login(o365_sandbox, user, Token(o365_sandbox.admin().mint_access_token(user)))]) as c:
            c[0].delete(f'"{folder}"')  # 100 MB of hostile mail must not linger for later tests


def check_hostile_delivery(o365_sandbox: SandboxInfo, user: str, folder: str) -> None:
    delivered = {
        "many_parts": hostile_mail.many_parts(10_000),
        "deep": hostile_mail.deeply_nested(1_000),
        "huge_filenames": hostile_mail.huge_filenames(parts=200, name_length=8_000),
        "good": hostile_mail.good_message(user, subject="a good one"),
    }
    assert 800_000 < len(delivered["many_parts"]) < 1_200_000
    uids = {name: hostile_mail.deliver(o365_sandbox, user, raw, folder=folder) for name, raw in delivered.items()}
    huge = hostile_mail.huge_header(100 * 1024 * 1024)
    assert len(huge) > 100 * 1024 * 1024
    uids["huge_header"] = hostile_mail.deliver(o365_sandbox, user, huge, folder=folder)
    del huge
    client = imap_login(o365_sandbox, user, Token(o365_sandbox.admin().mint_access_token(user)))
    with closing_all([client]):
        assert client.select(f'"{folder}"', readonly=True)[0] == "OK"
        _, data = client.uid("SEARCH", "ALL")
        found = sorted(int(u) for u in data[0].split())
        assert found == sorted(uids.values())
        _, sizes = client.uid("FETCH", str(uids["huge_header"]), "(RFC822.SIZE)")
        assert int(sizes[0].split(b"RFC822.SIZE ")[1].rstrip(b")")) > 100 * 1024 * 1024
        _, header = client.uid("FETCH", str(uids["good"]), "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert b"a good one" in header[0][1]
