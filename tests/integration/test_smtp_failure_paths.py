"""SMTP failure paths against a scriptable fake server (tokens from the sandbox's Entra stand-in).

The fake server records every byte, which proves what the client did NOT send.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from pathlib import Path

import pytest

from airflow_provider_o365mail.exceptions import (
    MailServerError,
    MessageRejectedError,
    MessageTooLargeError,
    RecipientsRefusedError,
    TlsRequiredError,
)
from airflow_provider_o365mail.hooks.o365mail import O365MailHook
from airflow_provider_o365mail.retry import Backoff
from airflow_provider_o365mail.testing.fake_smtp import FakeSmtpServer, SmtpScript
from airflow_provider_o365mail.testing.tls import make_untrusted_certificate


@pytest.fixture
def fake_conn(o365_sandbox, monkeypatch):
    """Returns a function: start a fake server with a script, point a fresh connection at it."""
    refresh_token = o365_sandbox.new_refresh_token()
    servers = []
    tls_dir = Path(o365_sandbox.ca_file).parent

    def start(**script_fields):
        script_fields.setdefault("cert_file", tls_dir / "server.pem")
        script_fields.setdefault("key_file", tls_dir / "server.key")
        server = FakeSmtpServer(SmtpScript(**script_fields)).__enter__()
        servers.append(server)
        conn_id = f"o365mail_fake_{uuid.uuid4().hex[:8]}"
        monkeypatch.setenv(
            f"AIRFLOW_CONN_{conn_id.upper()}",
            o365_sandbox.connection_json(refresh_token=refresh_token, smtp_port=server.port, timeout=5),
        )
        return server, O365MailHook(conn_id)

    yield start
    for server in servers:
        server.__exit__(None, None, None)


def no_sleep(_seconds: float) -> None:
    pass


def message(hook, **fields):
    fields.setdefault("to", "rcpt@o365.sandbox.test")
    fields.setdefault("subject", "s")
    fields.setdefault("text_content", "body")
    return hook.compose(**fields)


def test_no_starttls_means_no_auth_and_no_token(fake_conn):
    server, hook = fake_conn(offer_starttls=False)
    token = hook.get_access_token()
    with pytest.raises(TlsRequiredError, match="does not offer STARTTLS; no credentials were sent"):
        hook.send_messages([message(hook)])
    assert server.received, "the client did talk to the server"
    assert b"AUTH" not in server.received.upper()
    assert token.encode() not in server.received
    assert all(s.auth_commands == 0 and not s.messages for s in server.sessions)


def test_untrusted_certificate_means_no_auth(fake_conn, tmp_path):
    untrusted = make_untrusted_certificate(tmp_path)
    server, hook = fake_conn(cert_file=untrusted.cert_file, key_file=untrusted.key_file)
    with pytest.raises(MailServerError, match="certificate .* failed verification"):
        hook.send_messages([message(hook)])
    assert server.sessions and all(not s.lines_after_tls for s in server.sessions), "nothing sent over the bad TLS"
    assert b"AUTH" not in server.received.upper()


def test_auth_happens_after_starttls_and_after_the_334_prompt(fake_conn):
    server, hook = fake_conn()
    hook.send_messages([message(hook)])
    (session,) = server.sessions
    before = b"".join(session.lines_before_tls).upper()
    assert b"STARTTLS" in before and b"AUTH" not in before
    auth_line = next(line for line in session.lines_after_tls if line.upper().startswith(b"AUTH"))
    assert auth_line.strip().upper() == b"AUTH XOAUTH2", "the token goes after 334, not on the AUTH line"


def test_432_concurrent_connection_limit_is_retried(fake_conn):
    server, hook = fake_conn(connect_replies=deque(["432 4.3.2 Concurrent connections limit exceeded"] * 2))
    with hook.smtp_batch_sender(sleep=no_sleep) as sender:
        result = sender.send(message(hook))
    assert result.accepted == ("rcpt@o365.sandbox.test",)
    assert len(server.sessions) == 3 and len(server.delivered) == 1


def test_temporary_failures_give_up_after_bounded_attempts(fake_conn):
    server, hook = fake_conn(connect_replies=deque(["432 4.3.2 Concurrent connections limit exceeded"] * 10))
    slept: list[float] = []
    sender = hook.smtp_batch_sender(
        retry=Backoff(first=1.0, maximum=3.0, attempts=4, jitter=(0.75, 1.0)), sleep=slept.append
    )
    with pytest.raises(MailServerError, match=r"failed 4 times .*432 4\.3\.2.*Airflow pool") as err, sender:
        sender.send(message(hook))
    assert not isinstance(err.value, MessageRejectedError)
    assert len(server.sessions) == 4 and len(slept) == 3
    assert all(wait <= 3.0 for wait in slept) and slept[1] > slept[0] * 1.2, "exponential, capped"


def test_refused_recipients_are_reported_per_address_and_temporary_ones_retried(fake_conn):
    server, hook = fake_conn(
        rcpt_replies={
            "gone@o365.sandbox.test": deque(["550 5.1.10 RESOLVER.ADR.RecipNotFound; not found"]),
            "busy@o365.sandbox.test": deque(["452 4.2.2 Mailbox full, try later"]),
        }
    )
    out = message(hook, to="ok@o365.sandbox.test, gone@o365.sandbox.test, busy@o365.sandbox.test")
    with hook.smtp_batch_sender(sleep=no_sleep) as sender:
        result = sender.send(out)
    assert set(result.accepted) == {"ok@o365.sandbox.test", "busy@o365.sandbox.test"}
    assert list(result.refused) == ["gone@o365.sandbox.test"]
    assert result.refused["gone@o365.sandbox.test"][0] == 550
    assert [rcpts for _, rcpts, _ in server.delivered] == [["ok@o365.sandbox.test"], ["busy@o365.sandbox.test"]]

    server.script.rcpt_replies["gone@o365.sandbox.test"] = deque(["550 5.1.10 RESOLVER.ADR.RecipNotFound"])
    with pytest.raises(RecipientsRefusedError, match=r"gone@o365\.sandbox\.test .*550 5\.1\.10") as err:
        hook.send_messages([message(hook, to="ok@o365.sandbox.test, gone@o365.sandbox.test")])
    assert err.value.refused["gone@o365.sandbox.test"][0] == 550


def test_permanent_data_refusal_fails_with_the_server_text(fake_conn):
    server, hook = fake_conn(data_replies=deque(["554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceeded"]))
    with pytest.raises(MessageRejectedError, match="554 5.2.0 STOREDRV"):
        hook.send_messages([message(hook)])
    assert not server.delivered


def test_message_larger_than_server_size_fails_before_data(fake_conn):
    server, hook = fake_conn(size_limit=2000)
    with pytest.raises(MessageTooLargeError, match="accepts at most 2,000 bytes"):
        hook.send_messages([message(hook, text_content="x" * 5000)])
    assert b"DATA" not in server.received.upper()


def test_batch_uses_one_session_and_survives_a_dropped_connection(fake_conn):
    server, hook = fake_conn(drop_after_messages=deque([3]))
    outgoing = [message(hook, subject=f"m{i}") for i in range(8)]
    results = hook.send_messages(outgoing, sleep=no_sleep)
    assert [r.message_id for r in results] == [m.message_id for m in outgoing]
    assert len(server.delivered) == 8
    assert len(server.sessions) == 2, "one session, plus one reconnect after the drop"
    assert sum(s.auth_commands for s in server.sessions) == 2


def test_batch_logs_in_again_before_the_token_expires(fake_conn, o365_admin):
    """Tokens live 600 s; once the sender's clock says 400 s passed, the 300 s margin forces a new login.

    The clock is injected, so no real time has to pass. Token expiries are computed from the real
    clock, so the second token is issued with a long lifetime: it stays outside the margin even on
    the advanced clock, and the batch logs in again exactly once.
    """
    server, hook = fake_conn()
    o365_admin.update_settings(access_token_lifetime=600)
    skew = 0.0

    def clock() -> float:
        return time.time() + skew

    outgoing = [hook.compose(to="rcpt@o365.sandbox.test", subject=f"m{i}", text_content="x") for i in range(6)]
    with hook.smtp_batch_sender(reauth_margin=300, clock=clock, sleep=no_sleep) as sender:
        for index, out in enumerate(outgoing):
            if index == 3:
                o365_admin.update_settings(access_token_lifetime=3900)
                skew = 400.0
            sender.send(out)
    assert len(server.delivered) == 6
    assert [s.auth_commands for s in server.sessions] == [1, 1], "re-authenticated once, mid-batch"
    assert [len(s.messages) for s in server.sessions] == [3, 3]
    tokens = [next(line for line in s.lines_after_tls if line.startswith(b"dXNlcj")) for s in server.sessions]
    assert tokens[0] != tokens[1], "the second session logged in with a new access token"
