"""``airflow o365mail authorize | doctor | token-status | forget`` as a user runs them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from urllib.parse import urlsplit

import pytest
import requests

from airflow_provider_o365mail.auth.store import TokenStore
from airflow_provider_o365mail.hooks.o365mail import O365MailHook
from airflow_provider_o365mail.testing.mailbox import wait_for_messages, with_subject
from airflow_provider_o365mail.version_compat import AIRFLOW_V_3_2_PLUS

#: ``airflow o365mail`` where Airflow registers provider CLI commands (>= 3.2), else the module entry.
CLI = (
    [sys.executable, "-m", "airflow", "o365mail"]
    if AIRFLOW_V_3_2_PLUS
    else [sys.executable, "-m", "airflow_provider_o365mail.cli"]
)


#: The environment of a user who pipes the command's output (``| tee``): Python block-buffers stdout,
#: so a prompt the command does not flush never reaches them.
PIPED = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def airflow(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def json_output(text: str):
    """The JSON document a command printed (log lines may come before it)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line in ("[", "{", "[]", "{}"))
    end = next(i for i in range(len(lines) - 1, start - 1, -1) if lines[i] in ("]", "}", "[]", "{}"))
    return json.loads("\n".join(lines[start : end + 1]))


def start_authorize(conn_id: str, *flags: str) -> tuple[subprocess.Popen, str | None]:
    """Start ``airflow o365mail authorize`` and read up to its sign-in link (and the paste prompt)."""
    process = subprocess.Popen(
        [*CLI, "authorize", "--conn-id", conn_id, *flags],
        stdin=subprocess.PIPE if "--paste" in flags else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=PIPED,
    )
    link = None
    for line in process.stdout:
        if line.startswith("https://") and "/oauth2/v2.0/authorize?" in line:
            link = line.strip()
            if "--paste" not in flags:
                break
        if "press Enter" in line:
            break
    return process, link


def stored_connection_extra(conn_id: str) -> dict:
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session

    with create_session() as session:
        return json.loads(session.query(Connection).filter(Connection.conn_id == conn_id).one().extra)


def test_authorize_paste_mode_scripted(unauthorized_db_conn, o365_sandbox):
    sbx = o365_sandbox
    conn_id = unauthorized_db_conn
    with pytest.raises(Exception, match="never been authorized"):
        O365MailHook(conn_id).get_access_token()
    process, link = start_authorize(conn_id, "--paste")
    assert link, "the sign-in link was printed"
    query = dict(p.split("=", 1) for p in urlsplit(link).query.split("&"))
    assert query["code_challenge_method"] == "S256" and query["state"] and query["nonce"]
    redirect = sbx.admin().sign_in(link, login=sbx.user, password=sbx.user_password)
    output, _ = process.communicate(redirect + "\n", timeout=120)
    assert process.returncode == 0, output[-2000:]
    assert f"Authorized connection '{conn_id}' for {sbx.user}" in output
    assert "IMAP.AccessAsUser.All" in output and "the connection and the token store" in output
    assert stored_connection_extra(conn_id)["refresh_token"], "refresh token written into the DB connection"
    assert TokenStore(conn_id).load() is not None, "token store seeded"
    subject = f"after cli consent {uuid.uuid4().hex[:6]}"
    O365MailHook(conn_id).send_email(to=sbx.user, subject=subject, text_content="x")
    wait_for_messages(sbx, sbx.user, with_subject(subject))


def test_authorize_paste_mode_shows_the_fix_when_the_user_cancels(unauthorized_db_conn, o365_sandbox):
    sbx = o365_sandbox
    process, link = start_authorize(unauthorized_db_conn, "--paste")
    redirect = sbx.admin().sign_in(link, login=sbx.user, password=sbx.user_password, decision="cancel")
    output, _ = process.communicate(redirect + "\n", timeout=120)
    assert process.returncode == 1
    assert "access_denied" in output and "Run Authorize again" in output


def test_authorize_loopback_mode(unauthorized_db_conn, o365_sandbox):
    sbx = o365_sandbox
    process, link = start_authorize(unauthorized_db_conn, "--no-browser")
    redirect = sbx.admin().sign_in(link, login=sbx.user, password=sbx.user_password)
    assert re.match(r"http://localhost:\d+/o365mail/callback\?code=", redirect)
    session = requests.Session()
    session.trust_env = False
    page = session.get(redirect.replace("http://localhost:", "http://127.0.0.1:"), timeout=30)
    assert page.status_code == 200 and "Authorized" in page.text and "code=" not in page.text
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output[-2000:]
    assert f"for {sbx.user}" in output


def test_doctor_healthy_and_token_status_and_forget(o365mail_conn, o365_sandbox):
    doctor = airflow("doctor", "--conn-id", o365mail_conn, "-o", "json")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    checks = json_output(doctor.stdout)
    assert [c["link"] for c in checks] == [
        "connection",
        "scopes",
        "credential watch",
        "endpoints",
        "token store",
        "refresh token",
        "token",
        "IMAP",
        "SMTP",
    ]
    assert {c["status"] for c in checks} == {"ok"}
    status = airflow("token-status", "--conn-id", o365mail_conn, "-o", "json")
    assert status.returncode == 0, status.stdout + status.stderr
    data = json_output(status.stdout)
    assert data["account"] == o365_sandbox.user, "the account the grant was issued to"
    assert data["store"] == "present" and data["access_token_minutes_left"] > 30
    assert any(s.endswith("SMTP.Send") for s in data["scopes"])
    forget = airflow("forget", "--conn-id", o365mail_conn)
    assert forget.returncode == 0 and TokenStore(o365mail_conn).load() is None


def break_consent(admin, sbx, monkeypatch, conn_id):
    admin.revoke_consent(sbx.user, sbx.client_id)


def break_secret(admin, sbx, monkeypatch, conn_id):
    expired = admin.add_secret(sbx.client_id, lifetime_days=-1)  # a secret that expired yesterday
    conn = json.loads(os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"])
    conn["password"] = expired["value"]
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))


def break_smtp(admin, sbx, monkeypatch, conn_id):
    admin.update_user(sbx.user, smtp_auth_enabled=False)


def break_tenant(admin, sbx, monkeypatch, conn_id):
    other = str(uuid.uuid4())
    conn = json.loads(os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"])
    conn["extra"].update(tenant_id=other, authority=f"{sbx.idp_url}/{other}")
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))


def break_v1(admin, sbx, monkeypatch, conn_id):
    conn = json.loads(os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"])
    conn["extra"]["authority"] = f"{sbx.idp_url}/{sbx.tenant_id}/oauth2/token"
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))


@pytest.mark.parametrize(
    ("fault", "link", "words"),
    [
        (break_consent, "consent", "AADSTS65001"),
        (break_secret, "client secret", "AADSTS7000222"),
        (break_smtp, "SMTP", "Set-CASMailbox"),
        (break_tenant, "tenant", "Directory (tenant) ID"),
        (break_v1, "connection", "V1"),
    ],
)
def test_doctor_names_the_broken_link(o365mail_conn, o365_sandbox, o365_admin, monkeypatch, fault, link, words):
    fault(o365_admin, o365_sandbox, monkeypatch, o365mail_conn)
    result = airflow("doctor", "--conn-id", o365mail_conn, "-o", "json")
    assert result.returncode == 1
    checks = json_output(result.stdout)
    failed = [c for c in checks if c["status"] == "fail"]
    assert failed[0]["link"] == link, checks
    assert words in failed[0]["detail"] + failed[0]["fix"]


@pytest.mark.parametrize(("days", "status", "code"), [(-1, "fail", 1), (10, "warn", 0), (200, "ok", 0)])
def test_doctor_reads_the_recorded_secret_expiry(o365mail_conn, monkeypatch, days, status, code):
    import datetime as dt

    conn = json.loads(os.environ[f"AIRFLOW_CONN_{o365mail_conn.upper()}"])
    conn["extra"]["credential_expires_on"] = (dt.date.today() + dt.timedelta(days=days)).isoformat()
    monkeypatch.setenv(f"AIRFLOW_CONN_{o365mail_conn.upper()}", json.dumps(conn))
    result = airflow("doctor", "--conn-id", o365mail_conn, "-o", "json")
    (expiry,) = [c for c in json_output(result.stdout) if c["link"].startswith("client secret")]
    assert expiry["status"] == status and result.returncode == code


@pytest.mark.parametrize(("registered", "status", "code"), [(True, "warn", 0), (False, "fail", 1)])
def test_doctor_on_a_certificate_connection(o365_sandbox, o365_admin, tmp_path, monkeypatch, registered, status, code):
    from airflow_provider_o365mail.testing.app_credentials import make_certificate

    pair = make_certificate("doctor-cli", days=10)  # inside the 30-day warning
    key_path, cert_path = pair.write(tmp_path)
    if registered:
        o365_admin.add_certificate(o365_sandbox.client_id, pair.certificate_pem)
    try:
        extra = o365_sandbox.connection_extra(
            refresh_token=o365_sandbox.new_refresh_token(),
            certificate_path=str(cert_path),
            certificate_key_path=str(key_path),
        )
        conn_id = f"o365mail_{uuid.uuid4().hex[:10]}"
        body = {"conn_type": "o365mail", "login": o365_sandbox.client_id, "extra": extra}
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(body))
        result = airflow("doctor", "--conn-id", conn_id, "-o", "json")
        checks = {c["link"]: c for c in json_output(result.stdout)}
        assert checks["certificate"]["status"] == "warn"
        assert "CN=doctor-cli" in checks["certificate"]["detail"] and "expires in" in checks["certificate"]["detail"]
        assert "PRIVATE KEY" not in result.stdout + result.stderr
        if registered:
            assert checks["token"]["status"] == "ok" and checks["SMTP"]["status"] == "ok"
        else:
            refused = checks["certificate credential"]
            assert refused["status"] == status and "AADSTS700027" in refused["detail"]
            assert "Certificates & secrets" in refused["detail"]
        assert result.returncode == code
    finally:
        o365_admin.clear_certificates(o365_sandbox.client_id)
