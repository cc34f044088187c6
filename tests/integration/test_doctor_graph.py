"""The doctor, the page's rows and ``test_connection`` per transport: which scopes each needs, a Graph
token and a harmless Graph request for ``graph``/``auto``, no SMTP login for ``graph``, and the fix
named when the Graph consent is missing (AADSTS65001) or SMTP AUTH is off (5.7.139).
"""

from __future__ import annotations

import json
import os
import uuid

import pytest
from test_cli import airflow, json_output

from airflow_provider_o365mail.hooks.o365mail import O365MailHook
from airflow_provider_o365mail.plugins.connection_states import connection_state
from airflow_provider_o365mail.runtime import load_connection
from airflow_provider_o365mail.testing.sandbox import GRAPH


@pytest.fixture
def with_transport(o365mail_conn, o365_sandbox, monkeypatch):
    """``with_transport(t)``: the fresh-grant connection of ``o365mail_conn`` set to send through ``t``."""

    def set_transport(transport: str) -> str:
        name = f"AIRFLOW_CONN_{o365mail_conn.upper()}"
        conn = json.loads(os.environ[name])
        conn["extra"].update(transport=transport, graph_url=o365_sandbox.graph_url)
        monkeypatch.setenv(name, json.dumps(conn))
        return o365mail_conn

    return set_transport


def doctor(conn_id: str) -> tuple[int, dict[str, dict]]:
    result = airflow("doctor", "--conn-id", conn_id, "-o", "json")
    return result.returncode, {c["link"]: c for c in json_output(result.stdout)}


def graph_reads(admin, upn: str) -> int:
    """Graph requests that listed a mailbox folder's messages (the doctor's harmless request)."""
    return admin.graph_counters(upn).get("by_operation", {}).get("listMessages", 0)


def test_doctor_graph_gets_a_graph_token_and_reads_without_logging_in_to_smtp(with_transport, o365_sandbox, o365_admin):
    sbx = o365_sandbox
    conn_id = with_transport("graph")
    # SMTP AUTH and IMAP off for the mailbox: a graph-only connection needs neither (their logins would fail).
    o365_admin.update_user(sbx.user, smtp_auth_enabled=False, imap_enabled=False)
    before = graph_reads(o365_admin, sbx.user)
    code, checks = doctor(conn_id)
    assert code == 0, checks
    assert list(checks) == [
        "connection",
        "scopes",
        "credential watch",
        "endpoints",
        "token store",
        "refresh token",
        "token",
        "IMAP",
        "SMTP",
        "Graph token",
        "Graph",
    ]
    assert checks["SMTP"]["status"] == "skip" and "not needed" in checks["SMTP"]["detail"]
    assert checks["IMAP"]["status"] == "skip" and "reads through Microsoft Graph" in checks["IMAP"]["detail"]
    assert {c["status"] for link, c in checks.items() if link not in ("SMTP", "IMAP")} == {"ok"}, checks
    assert f"{GRAPH}/Mail.Send" in checks["scopes"]["detail"] and "SMTP.Send" in checks["scopes"]["detail"]
    assert "Mail.Send" in checks["Graph token"]["detail"]
    assert graph_reads(o365_admin, sbx.user) == before + 1, "one harmless Graph request reached the stand-in"


def test_doctor_names_the_fix_for_a_missing_graph_consent(with_transport, o365_sandbox, o365_admin):
    sbx = o365_sandbox
    conn_id = with_transport("auto")
    o365_admin.revoke_consent(sbx.user, sbx.client_id, resource=GRAPH)
    code, checks = doctor(conn_id)
    assert code == 1, checks
    assert checks["token"]["status"] == checks["IMAP"]["status"] == checks["SMTP"]["status"] == "ok", checks
    failed = checks["Graph consent"]
    assert failed["status"] == "fail" and "AADSTS65001" in failed["detail"], failed
    assert "Authorize again once" in failed["fix"] and "Exchange and Graph together" in failed["fix"], failed
    assert checks["Graph"]["status"] == "skip"


def test_doctor_auto_accepts_smtp_auth_disabled_when_graph_works(with_transport, o365_sandbox, o365_admin):
    sbx = o365_sandbox
    conn_id = with_transport("auto")
    o365_admin.update_user(sbx.user, smtp_auth_enabled=False)
    code, checks = doctor(conn_id)
    assert code == 0, checks
    smtp = checks["SMTP"]
    assert smtp["status"] == "warn" and "5.7.139" in smtp["detail"] and "through Microsoft Graph" in smtp["detail"]
    assert checks["Graph token"]["status"] == checks["Graph"]["status"] == "ok", checks


def test_doctor_auto_accepts_imap_off_when_graph_reads(with_transport, o365_sandbox, o365_admin):
    sbx = o365_sandbox
    conn_id = with_transport("auto")
    o365_admin.update_user(sbx.user, imap_enabled=False)
    code, checks = doctor(conn_id)
    assert code == 0, checks
    imap = checks["IMAP"]
    assert imap["status"] == "warn" and "refused the IMAP login" in imap["detail"], imap
    assert "through Microsoft Graph" in imap["detail"]


def test_doctor_smtp_transport_has_no_graph_step(o365mail_conn, o365_admin, o365_sandbox):
    before = graph_reads(o365_admin, o365_sandbox.user)
    code, checks = doctor(o365mail_conn)
    assert code == 0, checks
    assert not [link for link in checks if link.startswith("Graph")], checks
    assert "Graph is not asked" in checks["scopes"]["detail"]
    assert graph_reads(o365_admin, o365_sandbox.user) == before


def test_page_row_says_the_transport_and_its_scopes(with_transport):
    row = connection_state(load_connection(with_transport("graph")))
    assert row["transport"] == "graph"
    assert f"{GRAPH}/Mail.ReadWrite" in row["scopes_needed"] and "one consent asks for both" in row["scopes_needed"]


def fresh_connection(monkeypatch, sbx, transport: str) -> str:
    """Another connection with a fresh grant and an empty token store (no Graph token fetched yet)."""
    conn_id = f"o365mail_{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{conn_id.upper()}",
        sbx.connection_json(refresh_token=sbx.new_refresh_token(), transport=transport, graph_url=sbx.graph_url),
    )
    return conn_id


def test_test_connection_graph_tests_graph_not_smtp(with_transport, o365_sandbox, o365_admin, monkeypatch):
    sbx = o365_sandbox
    hook = O365MailHook(with_transport("graph"))
    o365_admin.update_user(sbx.user, smtp_auth_enabled=False)  # an SMTP login would fail
    before = graph_reads(o365_admin, sbx.user)
    ok, message = hook.test_connection()
    assert ok, message
    assert "Microsoft Graph" in message and "SMTP is not used" in message
    assert graph_reads(o365_admin, sbx.user) == before + 1

    # Revoking consent does not end access tokens already issued (as at Microsoft): a connection that
    # has no Graph token yet meets the missing consent at its first Graph token request.
    o365_admin.revoke_consent(sbx.user, sbx.client_id, resource=GRAPH)
    ok, message = O365MailHook(fresh_connection(monkeypatch, sbx, "graph")).test_connection()
    assert not ok and message.startswith("Graph step failed") and "AADSTS65001" in message, message


def test_test_connection_auto_tests_both_and_accepts_smtp_auth_disabled(
    with_transport, o365_sandbox, o365_admin, monkeypatch
):
    sbx = o365_sandbox
    conn_id = with_transport("auto")
    ok, message = O365MailHook(conn_id).test_connection()
    assert ok and "SMTP" in message and "Microsoft Graph" in message, message

    o365_admin.update_user(sbx.user, smtp_auth_enabled=False)
    ok, message = O365MailHook(conn_id).test_connection()
    assert ok, message
    assert "5.7.139" in message and "sends its mail through Microsoft Graph" in message, message

    o365_admin.revoke_consent(sbx.user, sbx.client_id, resource=GRAPH)  # and now Graph fails too
    ok, message = O365MailHook(fresh_connection(monkeypatch, sbx, "auto")).test_connection()
    assert not ok and message.startswith("Graph step failed"), message
