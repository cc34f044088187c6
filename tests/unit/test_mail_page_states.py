"""Issue #17: the page's states are honest (an error after the last good write is red), and no secret shows."""

from __future__ import annotations

import datetime as dt
import json
import re

import pytest
from airflow.sdk import Connection

from airflow_provider_o365mail.plugins import connection_states, pages
from airflow_provider_o365mail.plugins.connection_states import (
    SOURCE_DB,
    SOURCE_ENV,
    SOURCE_SECRETS,
    connection_state,
    env_conn_ids,
)

NOW = dt.datetime(2026, 12, 2, 2, 0, tzinfo=dt.UTC)
SECRET, REFRESH = "client-secret-value-7f3a", "refresh-token-value-91c2"


def conn(conn_id: str = "o365mail_x", **extra: object) -> Connection:
    fields = {"tenant_id": "11111111-2222-3333-4444-555555555555", "mailbox": "reports@contoso.com"}
    fields.update({"refresh_token": REFRESH, **extra})
    return Connection(conn_id=conn_id, conn_type="o365mail", login="app-id", password=SECRET, extra=json.dumps(fields))


def store(account: str | None = "reports@contoso.com", written: dt.datetime | None = NOW - dt.timedelta(hours=1)):
    return {
        "account": account,
        "store_written_at": written.isoformat(timespec="seconds") if written else None,
        "access_token_expires_at": (NOW + dt.timedelta(minutes=64)).isoformat(timespec="seconds") if account else None,
        "access_token_minutes_left": 64.0 if account else None,
        "refresh_token_last_used": written.isoformat(timespec="seconds") if written and account else None,
    }


@pytest.fixture
def evidence(monkeypatch):
    """Set what the token store and the last-error record say, without a database."""
    state: dict = {"store": store(), "error": None}
    monkeypatch.setattr(connection_states, "describe_store", lambda settings: state["store"])
    monkeypatch.setattr(connection_states, "last_error_record", lambda conn_id: state["error"])
    return state


def error_at(when: dt.datetime, name: str = "GrantRevoked") -> dict:
    return {"at": when.timestamp(), "error": name, "message": "AADSTS50173: the grant was revoked"}


def test_an_error_after_the_last_store_write_is_red_although_the_access_token_is_still_valid(evidence):
    """Before: green 'authorized ... valid for 64 min' next to 'Last error: GrantRevoked'."""
    evidence["error"] = error_at(NOW - dt.timedelta(minutes=5))
    row = connection_state(conn(), now=NOW)
    assert (row["state"], row["level"]) == ("revoked", "error")
    assert row["last_error_current"] is True and "GrantRevoked" in row["last_error"]
    assert "authorized" not in row["state_text"]
    html = pages.index_page("http://x/o365mail/callback", [row], now=NOW)
    assert "class='badge error' data-state='revoked'" in html and "class='text-error clamp'" in html
    assert "badge ok" not in html


def test_a_non_consent_error_is_failing_and_an_error_older_than_a_good_refresh_is_recovered(evidence):
    evidence["error"] = error_at(NOW - dt.timedelta(minutes=5), "ClientCredentialError")
    assert connection_state(conn(), now=NOW)["state"] == "failing"
    evidence["error"] = error_at(NOW - dt.timedelta(days=2))  # the store was written an hour ago
    row = connection_state(conn(), now=NOW)
    assert (row["state"], row["level"], row["last_error_current"]) == ("authorized", "ok", False)
    assert "recovered" in pages.index_page("http://x/cb", [row], now=NOW)


def test_an_error_with_an_empty_store_is_current_and_never_authorized_is_needs_consent(evidence):
    evidence["store"], evidence["error"] = store(account=None, written=None), error_at(NOW)
    assert connection_state(conn(), now=NOW)["level"] == "error"
    evidence["error"] = error_at(NOW, "ReauthorizationRequired")  # the Check of a never-authorized connection
    row = connection_state(conn(refresh_token=None), now=NOW)
    assert (row["state"], row["level"], row["last_error_current"]) == ("needs-consent", "warn", True)


def test_unverified_needs_consent_and_the_secret_expiry(evidence):
    evidence["store"] = store(account=None, written=None)
    assert (connection_state(conn(), now=NOW)["state"], connection_state(conn(), now=NOW)["level"]) == (
        "unverified",
        "info",
    )
    assert connection_state(conn(refresh_token=None), now=NOW)["state"] == "needs-consent"
    evidence["store"] = store()
    soon = connection_state(conn(credential_expires_on="2026-12-20"), now=NOW)
    assert (soon["secret_days_left"], soon["secret_level"], soon["level"]) == (18, "warn", "ok")
    expired = connection_state(conn(credential_expires_on="2026-11-30"), now=NOW)
    assert (expired["state"], expired["level"], expired["secret_level"]) == ("secret-expired", "error", "error")


def test_refresh_token_expiry_is_90_days_after_its_last_use(evidence):
    row = connection_state(conn(), now=NOW)
    assert row["refresh_token_expires_at"] == "2027-03-02T01:00:00+00:00" and row["refresh_token_expiry_estimated"]


@pytest.mark.parametrize("source", [SOURCE_ENV, SOURCE_SECRETS])
def test_connections_outside_the_db_say_how_to_authorize_them(evidence, source):
    row = connection_state(conn("o365mail_env"), source, now=NOW)
    assert (
        "airflow o365mail authorize --conn-id o365mail_env" in row["authorize_note"] and source in row["authorize_note"]
    )
    assert connection_state(conn(), SOURCE_DB, now=NOW)["authorize_note"] is None


def test_no_secret_in_the_state_or_the_page(evidence):
    evidence["error"] = error_at(NOW)
    row = connection_state(conn(credential_expires_on="2027-01-01"), SOURCE_ENV, now=NOW)
    html = pages.index_page("http://x/cb", [row], now=NOW)
    for text in (json.dumps(row), html):
        assert SECRET not in text and REFRESH not in text


def test_env_conn_ids_are_the_lower_cased_suffixes():
    environ = {"AIRFLOW_CONN_O365MAIL_DEFAULT": "{}", "AIRFLOW_CONN_": "x", "AIRFLOW__CORE__X": "1", "HOME": "/"}
    assert env_conn_ids(environ) == ["o365mail_default"]


def test_each_row_has_check_and_encoded_urls():
    row = {"conn_id": "a/b c", "grant_type": "client_credentials", "state": "app-only", "level": "ok", "state_text": ""}
    html = pages.index_page("http://x/cb", [row], now=NOW)
    assert re.findall(r"data-url='([^']+)'", html) == ["/o365mail/api/check/a%2Fb%20c"]
    assert "<form method='post'" not in html, "app-only connections have nothing to authorize"


def test_a_public_client_is_pointed_to_the_device_code_and_gets_no_authorize_button(evidence):
    evidence["store"] = store(account=None, written=None)
    public = Connection(
        conn_id="o365mail_pub",
        conn_type="o365mail",
        login="app-id",
        extra=json.dumps(
            {
                "tenant_id": "11111111-2222-3333-4444-555555555555",
                "mailbox": "a@contoso.com",
                "credential_type": "public_client",
            }
        ),
    )
    row = connection_state(public, now=NOW)
    assert row["state"] == "needs-consent" and "--device-code" in row["state_text"]
    assert "--device-code" in row["authorize_note"]
    assert "id='authorize-o365mail_pub'" not in pages.row_cells(row, NOW)
    confidential = connection_state(conn("o365mail_conf"), now=NOW)
    assert "id='authorize-o365mail_conf'" in pages.row_cells(confidential, NOW)


def test_the_credential_watchs_warnings_show_under_the_state_without_secrets(evidence, monkeypatch):
    class EmptyStore:
        def __init__(self, conn_id: str) -> None:
            pass

        def load(self):
            return None

    monkeypatch.setattr(connection_states, "TokenStore", EmptyStore)
    expires = (NOW + dt.timedelta(days=5)).date().isoformat()
    row = connection_state(conn(credential_expires_on=expires), now=NOW)
    (warning,) = row["credential_warnings"]
    assert (warning["credential"], warning["state"], warning["level"]) == ("client secret", "expiring", "warn")
    html = pages.row_cells(row, NOW)
    assert "data-field='credential-warnings'" in html and f"expires on {expires}" in html
    assert "Certificates &amp; secrets" in html

    evidence["error"] = error_at(NOW - dt.timedelta(minutes=5))
    row = connection_state(conn(credential_expires_on=expires), now=NOW)
    revoked = [w for w in row["credential_warnings"] if w["credential"] == "refresh token"]
    assert revoked and revoked[0]["state"] == "revoked" and revoked[0]["level"] == "error"
    assert "airflow o365mail authorize --conn-id o365mail_x" in revoked[0]["fix"]
    html = pages.row_cells(row, NOW)
    assert SECRET not in html and REFRESH not in html and SECRET not in json.dumps(row)
