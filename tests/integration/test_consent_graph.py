"""One consent for Exchange and Microsoft Graph: ``airflow o365mail authorize`` on a connection that
sends through Graph asks both resources at ``/authorize``, redeems the code for Exchange only (one
resource per token request) and the stored grant then yields Exchange tokens (SMTP, IMAP) and Graph
tokens. A connection that sends over SMTP only asks Exchange's scopes.

The user's consent is removed before each test, so a permission the stand-in grants can only come
from this sign-in (the ``o365_admin`` fixture restores the seeded consent afterwards).
"""

from __future__ import annotations

import json
import uuid
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
from test_cli import start_authorize

from airflow_provider_o365mail.exceptions import ReauthorizationRequired
from airflow_provider_o365mail.hooks.o365mail import O365MailHook
from airflow_provider_o365mail.testing.mailbox import wait_for_messages
from airflow_provider_o365mail.testing.sandbox import GRAPH

GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
EXCHANGE = "https://outlook.office.com"


def claims(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


@pytest.fixture
def new_conn(db_connection, o365_sandbox, o365_admin):
    """``new_conn(transport)``: a never-authorized DB connection; the user's consent to the app removed."""
    sbx = o365_sandbox
    o365_admin.revoke_consent(sbx.user, sbx.client_id)

    def create(transport: str) -> str:
        extra = sbx.connection_extra(transport=transport, graph_url=sbx.graph_url)
        del extra["refresh_token"]
        conn_id = f"o365mail_consent_{transport}_{uuid.uuid4().hex[:8]}"
        connection = {"conn_type": "o365mail", "login": sbx.client_id, "password": sbx.client_secret, "extra": extra}
        return db_connection(conn_id, json.dumps(connection))

    return create


def consent_by_paste(sbx, conn_id: str) -> tuple[list[str], str]:
    """Run ``authorize --paste``; the scopes its sign-in link asked, and the command's output."""
    process, link = start_authorize(conn_id, "--paste")
    assert link, "the sign-in link was printed"
    asked = parse_qs(urlsplit(link).query)["scope"][0].split()
    redirect = sbx.admin().sign_in(link, login=sbx.user, password=sbx.user_password)
    output, _ = process.communicate(redirect + "\n", timeout=120)
    assert process.returncode == 0, output[-2000:]
    return asked, output


def granted(admin, sbx) -> dict[str, list[str]]:
    """The permissions the stand-in recorded for the user's consent, per resource."""
    grant = admin.state()["grants"].get(f"{sbx.user}|{sbx.client_id}") or {}
    return grant.get("permissions") or {}


def test_transport_graph_one_consent_yields_exchange_and_graph_tokens(new_conn, o365_sandbox, o365_admin):
    sbx = o365_sandbox
    conn_id = new_conn("graph")
    asked, output = consent_by_paste(sbx, conn_id)
    assert {f"{EXCHANGE}/SMTP.Send", f"{GRAPH}/Mail.Send", f"{GRAPH}/Mail.ReadWrite"} <= set(asked)
    assert f"Also consented, for sending through Microsoft Graph: {GRAPH}/Mail.Send {GRAPH}/Mail.ReadWrite" in output
    permissions = granted(o365_admin, sbx)
    assert {"Mail.Send", "Mail.ReadWrite"} <= set(permissions[GRAPH])
    assert "SMTP.Send" in permissions[EXCHANGE]

    hook = O365MailHook(conn_id)
    exchange = claims(hook.access_token(force_refresh=True).token)
    assert exchange["aud"] == EXCHANGE and "SMTP.Send" in exchange["scp"].split()
    graph = claims(hook.graph_access_token(force_refresh=True).token)
    assert graph["aud"] == GRAPH_APP_ID and {"Mail.Send", "Mail.ReadWrite"} <= set(graph["scp"].split())

    # Both work for mail: SMTP AUTH with the Exchange token, sendMail with the Graph token.
    with hook.smtp_client() as client:
        assert client.noop()[0] == 250
    subject = f"graph after consent {uuid.uuid4().hex[:6]}"
    message_id = hook.send_email(to=sbx.user, subject=subject, text_content="sent through Graph")
    arrived = wait_for_messages(sbx, sbx.user, lambda m: m["Message-ID"] == message_id, timeout=30)
    assert len(arrived) == 1 and arrived[0]["Subject"] == subject
    assert any(d["message_id"] == message_id for d in o365_admin.graph_deliveries()), "sent by Graph"


def test_transport_smtp_asks_exchange_scopes_only(new_conn, o365_sandbox, o365_admin):
    sbx = o365_sandbox
    conn_id = new_conn("smtp")
    asked, output = consent_by_paste(sbx, conn_id)
    assert not [s for s in asked if s.startswith(GRAPH)], asked
    assert "Also consented" not in output
    assert GRAPH not in granted(o365_admin, sbx)
    hook = O365MailHook(conn_id)
    assert claims(hook.access_token(force_refresh=True).token)["aud"] == EXCHANGE
    with pytest.raises(ReauthorizationRequired, match="authorize again to add Graph") as refused:
        hook.graph_access_token(force_refresh=True)
    assert 65001 in refused.value.error_codes
