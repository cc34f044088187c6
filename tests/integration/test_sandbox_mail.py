"""Dovecot and Postfix of the sandbox with stdlib imaplib/smtplib only (independent of the hook)."""

from __future__ import annotations

import imaplib
import smtplib
import socket
import ssl
import time
import uuid

import jwt
import msal
import pytest

from airflow_provider_o365mail.testing.admin import tls_session
from airflow_provider_o365mail.testing.sandbox import DELEGATED_SCOPES


def ctx(sbx):
    return ssl.create_default_context(cafile=sbx.ca_file)


def xoauth2(user, token):
    return f"user={user}\x01auth=Bearer {token}\x01\x01"


def responder(s):
    return lambda challenge=None: "" if challenge else s


def msal_app(sbx, client_id, client_secret):
    return msal.ConfidentialClientApplication(
        client_id,
        client_credential=client_secret,
        authority=sbx.authority,
        instance_discovery=False,
        http_client=tls_session(sbx.ca_file),
    )


@pytest.fixture
def access_token(o365_sandbox, o365_admin):
    sbx = o365_sandbox
    rt = sbx.new_refresh_token()
    app = msal_app(sbx, sbx.client_id, sbx.client_secret)
    return Token(app.acquire_token_by_refresh_token(rt, DELEGATED_SCOPES.split())["access_token"])


class Token(str):
    """A token whose repr stays out of pytest's failure reports."""

    def __repr__(self) -> str:
        return "<access token>"


def smtp_login(sbx, user, token, source="127.0.0.1"):
    client = smtplib.SMTP("127.0.0.1", sbx.smtp_port, timeout=15, source_address=(source, 0))
    client.ehlo()
    client.starttls(context=ctx(sbx))
    client.ehlo()
    client.auth("XOAUTH2", responder(xoauth2(user, token)), initial_response_ok=False)
    return client


def imap_login(sbx, user, token):
    client = imaplib.IMAP4_SSL("127.0.0.1", sbx.imap_port, ssl_context=ctx(sbx), timeout=15)
    client.authenticate("XOAUTH2", responder(xoauth2(user, token).encode()))
    return client


def wait_for_subject(sbx, token, subject, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        imap = imap_login(sbx, sbx.user, token)
        try:
            imap.select("INBOX", readonly=True)
            typ, data = imap.search(None, "SUBJECT", f'"{subject}"')
            if data[0]:
                _, fetched = imap.fetch(data[0].split()[-1], "(RFC822)")
                return fetched[0][1]
        finally:
            imap.logout()
        time.sleep(0.2)
    raise AssertionError(f"{subject} did not arrive")


def test_smtp_xoauth2_over_starttls_arrives_in_the_imap_mailbox(o365_sandbox, access_token):
    sbx = o365_sandbox
    subject = f"sandbox {uuid.uuid4()}"
    with smtp_login(sbx, sbx.user, access_token) as smtp:
        smtp.sendmail(sbx.user, [sbx.user], f"From: {sbx.user}\r\nTo: {sbx.user}\r\nSubject: {subject}\r\n\r\nhi\r\n")
    assert b"hi" in wait_for_subject(sbx, access_token, subject)


def test_imap_offers_idle_move_uidplus_after_login(o365_sandbox, access_token):
    imap = imap_login(o365_sandbox, o365_sandbox.user, access_token)
    try:
        _, data = imap.capability()
        caps = set(data[0].decode().upper().split())
        assert {"IDLE", "MOVE", "UIDPLUS"} <= caps
    finally:
        imap.logout()


def test_idle_sessions_are_counted_per_folder_and_only_while_in_idle(o365_sandbox, access_token):
    """The count integration tests use to prove how many IDLE connections a folder has."""
    from airflow_provider_o365mail.testing.sandbox import Sandbox

    sbx, sandbox = o365_sandbox, Sandbox(o365_sandbox.state_dir)
    folder = f"IdleCount{uuid.uuid4().hex[:8]}"
    idling, selected, elsewhere = (imap_login(sbx, sbx.user, access_token) for _ in range(3))
    try:
        assert idling.create(folder)[0] == "OK"
        assert selected.select(folder)[0] == "OK" and elsewhere.select("INBOX")[0] == "OK"
        assert sandbox.imap_idle_sessions(sbx.user, folder) == 0
        for client, where in ((idling, folder), (elsewhere, "INBOX")):
            client.select(where)
            client.send(client._new_tag() + b" IDLE\r\n")
            assert client.readline().startswith(b"+ ")
        # one IDLE on the folder; one session selected on it without IDLE; one IDLE on another folder
        assert sandbox.imap_idle_sessions(sbx.user, folder) == 1
        assert sandbox.imap_idle_sessions(sbx.user, "INBOX") >= 1
        idling.send(b"DONE\r\n")
        assert b"OK" in idling.readline()
        assert sandbox.imap_idle_sessions(sbx.user, folder) == 0, "DONE ends the count"
        elsewhere.send(b"DONE\r\n")
        elsewhere.readline()
    finally:
        for client in (idling, selected, elsewhere):
            client.logout()
        cleanup = imap_login(sbx, sbx.user, access_token)
        cleanup.delete(folder)
        cleanup.logout()


def test_long_access_tokens_are_accepted(o365_sandbox, o365_admin):
    """Real Entra tokens are 1.5-3 kB; pad the scp claim to reach about 3 kB."""
    sbx = o365_sandbox
    token = o365_admin.mint_access_token(sbx.user, scp="IMAP.AccessAsUser.All SMTP.Send " + "x" * 2000)
    assert len(token) > 3000
    smtp_login(sbx, sbx.user, token).quit()
    imap_login(sbx, sbx.user, token).logout()


BAD_TOKENS = {
    "bogus": lambda a, s: "eyJhbGciOiJSUzI1NiJ9.e30.c2ln",
    "expired": lambda a, s: a.mint_access_token(s.user, lifetime=-120),
    "wrong-audience": lambda a, s: a.mint_access_token(s.user, audience="https://graph.microsoft.com"),
    "missing-scope": lambda a, s: a.mint_access_token(s.user, scp="User.Read"),
    "other-user": lambda a, s: a.mint_access_token(s.second_user),
}


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
def test_bad_tokens_are_refused_by_both_servers(o365_sandbox, o365_admin, kind):
    sbx = o365_sandbox
    token = BAD_TOKENS[kind](o365_admin, sbx)
    with pytest.raises(smtplib.SMTPAuthenticationError) as smtp_err:
        smtp_login(sbx, sbx.user, token)
    assert smtp_err.value.smtp_code == 535
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED|Authentication failed"):
        imap_login(sbx, sbx.user, token)


def test_revoked_sessions_kill_issued_access_tokens(o365_sandbox, o365_admin, access_token):
    sbx = o365_sandbox
    imap_login(sbx, sbx.user, access_token).logout()
    time.sleep(1.1)  # iat has a resolution of one second
    o365_admin.revoke_sessions(sbx.user)
    with pytest.raises(smtplib.SMTPAuthenticationError):
        smtp_login(sbx, sbx.user, access_token)
    with pytest.raises(imaplib.IMAP4.error):
        imap_login(sbx, sbx.user, access_token)


def _iat(token: str) -> int:
    return jwt.decode(token, options={"verify_signature": False})["iat"]


def test_a_token_from_the_second_of_a_revocation_is_valid_and_one_from_before_is_not(o365_sandbox, o365_admin):
    """iat has whole seconds: a token issued just after a revocation (same second) must not count as revoked."""
    sbx, upn = o365_sandbox, o365_sandbox.second_user
    token = Token(o365_admin.mint_access_token(upn))
    try:
        o365_admin.update_user(upn, tokens_valid_from=_iat(token) + 0.999)  # revoked within the token's second
        smtp_login(sbx, upn, token).quit()
        imap_login(sbx, upn, token).logout()
        o365_admin.update_user(upn, tokens_valid_from=_iat(token) + 1.0)  # revoked in the next second
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp_login(sbx, upn, token)
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            imap_login(sbx, upn, token)
    finally:
        o365_admin.update_user(upn, tokens_valid_from=0.0)


def test_tokens_issued_while_the_stand_ins_clock_runs_ahead_are_accepted(o365_sandbox, o365_admin):
    """Time claims are judged by the stand-in's clock: with clock_offset an hour ahead, a token it issues
    has an iat an hour ahead of the host's clock and is still valid (was refused as a bad signature)."""
    sbx = o365_sandbox
    o365_admin.update_settings(clock_offset=4000)  # the o365_admin fixture puts the clock back
    token = Token(o365_admin.mint_access_token(sbx.user))
    assert _iat(token) > time.time() + 3900
    smtp_login(sbx, sbx.user, token).quit()
    imap_login(sbx, sbx.user, token).logout()
    early = Token(o365_admin.mint_access_token(sbx.user))
    o365_admin.update_settings(clock_offset=0)  # the host's clock again: that token is not valid yet
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        imap_login(sbx, sbx.user, early)


def test_revoked_consent_leaves_access_tokens_valid_until_expiry(o365_sandbox, o365_admin, access_token):
    sbx = o365_sandbox
    o365_admin.revoke_consent(sbx.user, sbx.client_id)
    imap_login(sbx, sbx.user, access_token).logout()  # as at Microsoft


def test_smtp_auth_disabled_for_a_mailbox(o365_sandbox, o365_admin, access_token):
    sbx = o365_sandbox
    o365_admin.update_user(sbx.user, smtp_auth_enabled=False)
    with pytest.raises(smtplib.SMTPAuthenticationError):
        smtp_login(sbx, sbx.user, access_token)
    imap_login(sbx, sbx.user, access_token).logout()


def test_plain_password_login_is_refused(o365_sandbox):
    sbx = o365_sandbox
    imap = imaplib.IMAP4_SSL("127.0.0.1", sbx.imap_port, ssl_context=ctx(sbx), timeout=15)
    with pytest.raises(imaplib.IMAP4.error):
        imap.login(sbx.user, sbx.user_password)
    smtp = smtplib.SMTP("127.0.0.1", sbx.smtp_port, timeout=15)
    smtp.ehlo()
    smtp.starttls(context=ctx(sbx))
    smtp.ehlo()
    assert "PLAIN" not in smtp.esmtp_features["auth"] and "LOGIN" not in smtp.esmtp_features["auth"]
    smtp.close()


def test_no_open_relay_and_no_auth_before_tls(o365_sandbox):
    sbx = o365_sandbox
    smtp = smtplib.SMTP("127.0.0.1", sbx.smtp_port, timeout=15, source_address=("127.0.0.2", 0))
    smtp.ehlo()
    assert "auth" not in smtp.esmtp_features, "AUTH must not be offered before STARTTLS"
    code, _ = smtp.mail(sbx.user)
    assert code == 530  # Postfix: must issue a STARTTLS command first
    smtp.close()
    smtp = smtplib.SMTP("127.0.0.1", sbx.smtp_port, timeout=15)
    smtp.ehlo()
    smtp.starttls(context=ctx(sbx))
    smtp.ehlo()
    smtp.mail(sbx.user)
    code, _ = smtp.rcpt(sbx.user)
    assert 550 <= code <= 554, "unauthenticated submission must be refused"
    smtp.close()


def test_imap_refuses_authentication_before_tls_from_a_remote_address(o365_sandbox):
    """Dovecot trusts 127.0.0.1 as secure; 127.0.0.2 is treated as remote. Only TLS ports exist anyway."""
    sbx = o365_sandbox
    with socket.create_connection(("127.0.0.1", sbx.imap_port), timeout=5, source_address=("127.0.0.2", 0)) as sock:
        sock.sendall(b"a1 CAPABILITY\r\n")
        data = sock.recv(200)
    assert not data.startswith(b"* OK"), "the IMAP port must speak TLS first"


def test_unknown_recipient_is_refused_at_rcpt(o365_sandbox, access_token):
    sbx = o365_sandbox
    with smtp_login(sbx, sbx.user, access_token) as smtp:
        smtp.mail(sbx.user)
        code, _ = smtp.rcpt("nobody@o365.sandbox.test")
        assert code == 550


def test_send_as_another_mailbox_needs_permission(o365_sandbox, access_token):
    sbx = o365_sandbox
    with smtp_login(sbx, sbx.user, access_token) as smtp:
        assert smtp.mail(sbx.shared_mailbox)[0] == 250  # alex has Send As on the shared mailbox
        smtp.rcpt(sbx.user)
        smtp.rset()
        smtp.mail(sbx.second_user)
        code, _ = smtp.rcpt(sbx.user)
        assert code == 553, "sending as a mailbox without permission is refused"


def test_client_credentials_token_opens_the_permitted_mailbox(o365_sandbox):
    sbx = o365_sandbox
    app = msal_app(sbx, sbx.app_client_id, sbx.app_client_secret)
    token = app.acquire_token_for_client(["https://outlook.office365.com/.default"])["access_token"]
    imap_login(sbx, sbx.user, token).logout()
    smtp_login(sbx, sbx.user, token).quit()
    with pytest.raises(imaplib.IMAP4.error):
        imap_login(sbx, sbx.second_user, token)
