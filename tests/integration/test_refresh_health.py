"""Refresh-token health against the sandbox: last use recorded, 90-day expiry shown, 14-day warning,
the ``airflow o365mail refresh`` keep-alive and its example DAG, transient refusals versus revocations."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import msal
import pytest

from airflow_provider_o365mail import exceptions as exc
from airflow_provider_o365mail.auth.store import TokenStore
from airflow_provider_o365mail.auth.token_status import keep_alive
from airflow_provider_o365mail.auth.tokens import TokenManager
from airflow_provider_o365mail.hooks.o365mail import O365MailHook

DAY = 86400.0
EXAMPLE = Path(__file__).parents[2] / "example_dags" / "example_o365mail_keepalive.py"


def airflow(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "airflow", "o365mail", *args], capture_output=True, text=True, timeout=timeout
    )


def json_output(text: str):
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line in ("[", "{"))
    end = next(i for i in range(len(lines) - 1, start - 1, -1) if lines[i] in ("]", "}"))
    return json.loads("\n".join(lines[start : end + 1]))


def refresh_tokens(conn_id: str) -> set[str]:
    cache = msal.SerializableTokenCache()
    cache.deserialize(TokenStore(conn_id).load().msal_cache)
    return {rt["secret"] for rt in cache.search(msal.TokenCache.CredentialType.REFRESH_TOKEN)}


def age_store(conn_id: str, days: float) -> None:
    """Pretend the refresh token was last used ``days`` ago (as if nothing used the connection since)."""
    store = TokenStore(conn_id)
    stored = store.load()
    store.save(stored.msal_cache, stored.seed_fingerprint, stored.fence, used_at=time.time() - days * DAY)


def in_days(days: float) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(days=days)).date().isoformat()


def test_a_refresh_records_its_use_and_token_status_shows_the_expiry(o365mail_conn):
    before = time.time()
    O365MailHook(o365mail_conn).access_token()
    used_at = TokenStore(o365mail_conn).load().refresh_token_used_at
    assert used_at is not None and before <= used_at <= time.time()
    status = airflow("token-status", "--conn-id", o365mail_conn, "-o", "json")
    assert status.returncode == 0, status.stderr
    data = json_output(status.stdout)
    assert data["refresh_token_health"] == "ok" and data["refresh_token_warning"] is None
    assert data["refresh_token_expires_on"] in (in_days(90), in_days(89.99))
    assert 89.9 < data["refresh_token_days_left"] <= 90


def test_inside_14_days_token_status_and_doctor_warn_and_refresh_renews(o365mail_conn):
    O365MailHook(o365mail_conn).access_token()
    age_store(o365mail_conn, 80)
    rotated_from = refresh_tokens(o365mail_conn)
    data = json_output(airflow("token-status", "--conn-id", o365mail_conn, "-o", "json").stdout)
    assert data["refresh_token_health"] == "warn" and 9.9 < data["refresh_token_days_left"] < 10.1
    assert data["refresh_token_expires_on"] == in_days(10)
    assert f"airflow o365mail refresh {o365mail_conn}" in data["refresh_token_warning"]

    doctor = airflow("doctor", "--conn-id", o365mail_conn, "-o", "json")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr  # a warning, not a broken link
    checks = {c["link"]: c for c in json_output(doctor.stdout)}
    assert checks["refresh token"]["status"] == "warn", checks
    assert f"expires on {in_days(10)}" in checks["refresh token"]["detail"]
    assert "example_o365mail_keepalive" in checks["refresh token"]["fix"]
    assert checks["token"]["status"] == "ok"

    age_store(o365mail_conn, 80)  # doctor used the token once more; age it again for the keep-alive
    result = airflow("refresh", o365mail_conn)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"[ OK ] {o365mail_conn}: refresh token redeemed" in result.stdout and in_days(90) in result.stdout
    assert time.time() - TokenStore(o365mail_conn).load().refresh_token_used_at < 120
    assert refresh_tokens(o365mail_conn).isdisjoint(rotated_from), "the rotated refresh token is stored"
    again = json_output(airflow("token-status", "--conn-id", o365mail_conn, "-o", "json").stdout)
    assert again["refresh_token_health"] == "ok" and again["refresh_token_warning"] is None


def test_refresh_of_a_revoked_grant_asks_for_reauthorization(o365mail_conn, o365_sandbox, o365_admin):
    O365MailHook(o365mail_conn).access_token()
    o365_admin.revoke_sessions(o365_sandbox.user)
    result = airflow("refresh", o365mail_conn, "-o", "json")
    assert result.returncode == 1
    (entry,) = json_output(result.stdout)
    assert entry["status"] == "reauthorize" and "AADSTS50173" in entry["detail"]
    assert f"airflow o365mail authorize --conn-id {o365mail_conn}" in entry["detail"]


def test_refresh_skips_app_only_and_needs_names_without_db_connections(o365_sandbox, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_O365MAIL_APPONLY_KEEPALIVE", o365_sandbox.app_connection_json())
    result = airflow("refresh", "o365mail_apponly_keepalive")
    assert result.returncode == 0, result.stderr
    assert "[SKIP] o365mail_apponly_keepalive: app-only" in result.stdout
    none = airflow("refresh")  # the test DB holds no o365mail connection; environment ones are not listed
    assert none.returncode == 1 and "Name the connections" in none.stderr


def test_refresh_without_names_covers_the_metadata_databases_connections(db_connection, o365_sandbox):
    conn_id = db_connection(
        "o365mail_db_keepalive", o365_sandbox.connection_json(refresh_token=o365_sandbox.new_refresh_token())
    )
    result = airflow("refresh", "-o", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [(r["connection"], r["status"]) for r in json_output(result.stdout)] == [(conn_id, "ok")]


@pytest.mark.parametrize("code", [50033, 90024, 90033])
def test_a_transient_invalid_grant_is_retried_not_reported_as_revoked(o365mail_conn, o365_admin, code):
    hook = O365MailHook(o365mail_conn)
    hook.access_token()
    o365_admin.add_fault(status=400, count=2, aadsts=code, error="invalid_grant")
    sleeps: list[float] = []
    token = TokenManager(hook.settings, sleep=sleeps.append).get(force_refresh=True)
    assert token.source == "identity_provider" and len(sleeps) == 2

    o365_admin.add_fault(status=400, count=4, aadsts=code, error="invalid_grant")
    with pytest.raises(exc.IdentityProviderUnavailable) as caught:
        TokenManager(hook.settings, sleep=lambda _s: None).get(force_refresh=True)
    assert not isinstance(caught.value, exc.AuthorizationError)
    assert f"AADSTS{code}" in str(caught.value) and "the grant is not revoked" in str(caught.value)

    o365_admin.add_fault(status=400, count=4, aadsts=code, error="invalid_grant")
    result = keep_alive(TokenManager(hook.settings, sleep=lambda _s: None))
    assert result.status == "failed" and "temporary" in result.detail
    o365_admin.clear_faults()
    assert keep_alive(TokenManager(hook.settings)).status == "ok", "the grant survived the transient refusals"


def test_a_real_revocation_is_not_retried(o365mail_conn, o365_sandbox, o365_admin):
    hook = O365MailHook(o365mail_conn)
    hook.access_token()
    o365_admin.revoke_sessions(o365_sandbox.user)
    sleeps: list[float] = []
    with pytest.raises(exc.GrantRevoked, match="AADSTS50173"):
        TokenManager(hook.settings, sleep=sleeps.append).get(force_refresh=True)
    assert sleeps == []
    assert keep_alive(TokenManager(hook.settings)).status == "reauthorize"


def test_the_keepalive_example_dag_refreshes_its_connections(o365mail_conn, run_dag):
    O365MailHook(o365mail_conn).access_token()
    age_store(o365mail_conn, 85)
    source = EXAMPLE.read_text().replace('CONN_IDS = ["o365mail_default"]', f"CONN_IDS = [{o365mail_conn!r}]")
    assert source != EXAMPLE.read_text()
    dag_id = f"keepalive_{o365mail_conn}"
    source = source.replace("def example_o365mail_keepalive():", f"def {dag_id}():").replace(
        "example_o365mail_keepalive()\n", f"{dag_id}()\n"
    )
    result = run_dag(dag_id, source)
    assert result.returncode == 0, result.output[-3000:]
    assert time.time() - TokenStore(o365mail_conn).load().refresh_token_used_at < 300
