"""Refresh-token health and the transient-refusal table, without I/O."""

from __future__ import annotations

import json
import time

import pytest

from airflow_provider_o365mail.auth.errors import TRANSIENT_AADSTS, authorization_error, transient_refusal
from airflow_provider_o365mail.auth.store import StoredCache
from airflow_provider_o365mail.auth.token_status import (
    REFRESH_TOKEN_WARNING_DAYS,
    RefreshTokenHealth,
    refresh_token_health,
)
from airflow_provider_o365mail.exceptions import GrantRevoked, RefreshTokenExpired

DAY = 86400.0
NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("days_ago", "state"),
    [
        (0, "ok"),
        (75.9, "ok"),
        (90 - REFRESH_TOKEN_WARNING_DAYS, "warn"),
        (89.5, "warn"),
        (90, "expired"),
        (120, "expired"),
    ],
)
def test_state_follows_the_90_day_window_and_warns_inside_14_days(days_ago, state):
    health = RefreshTokenHealth(NOW - days_ago * DAY, "store")
    assert health.state(NOW) == state
    assert health.expires_at == NOW - days_ago * DAY + 90 * DAY
    assert health.days_left(NOW) == pytest.approx(90 - days_ago)


def test_sentences_name_the_dates():
    assert "expires on 2027-01-25 (in 10 days)" in RefreshTokenHealth(NOW - 80 * DAY, "store").sentence(NOW)
    assert "it expired on" in RefreshTokenHealth(NOW - 91 * DAY, "store").sentence(NOW)
    unknown = RefreshTokenHealth(None, "unknown")
    assert unknown.state(NOW) == "unknown" and "no use of the refresh token is recorded" in unknown.sentence(NOW)


def test_recorded_use_wins_and_older_stores_fall_back_to_msals_stamp():
    msal_cache = json.dumps(
        {
            "RefreshToken": {
                "k": {"credential_type": "RefreshToken", "secret": "rt", "last_modification_time": "1700000000"}
            }
        }
    )
    assert refresh_token_health(StoredCache(msal_cache, None, time.time(), refresh_token_used_at=NOW)).last_used == NOW
    older = refresh_token_health(StoredCache(msal_cache, None, time.time()))
    assert (older.last_used, older.recorded_by) == (1_700_000_000.0, "msal cache")
    assert refresh_token_health(None).recorded_by == "unknown"
    assert refresh_token_health(StoredCache("{}", None, time.time())).last_used is None


@pytest.mark.parametrize("code", sorted(TRANSIENT_AADSTS))
def test_transient_codes_are_recognised_whatever_the_error_value(code):
    assert transient_refusal({"error": "invalid_grant", "error_codes": [code]}).startswith(f"AADSTS{code} ")


@pytest.mark.parametrize(("code", "cls"), [(50173, GrantRevoked), (70008, GrantRevoked), (700082, RefreshTokenExpired)])
def test_revocations_are_not_transient(code, cls):
    result = {"error": "invalid_grant", "error_codes": [code]}
    assert transient_refusal(result) is None
    assert isinstance(authorization_error(result, "c"), cls)
    assert transient_refusal({"error": "invalid_grant"}) is None


@pytest.mark.parametrize(
    ("error", "status"),
    [
        ("ConnectionConfigError", "broken"),
        ("AuthorizationError", "broken"),
        ("GrantRevoked", "reauthorize"),
        ("IdentityProviderUnavailable", "failed"),
    ],
)
def test_keep_alive_tells_a_broken_connection_from_a_temporary_failure(error, status):
    """An expired secret or an unregistered certificate is not retried by the keep-alive DAG."""
    from types import SimpleNamespace

    from airflow_provider_o365mail import exceptions
    from airflow_provider_o365mail.auth.token_status import keep_alive

    def refuse(force_refresh: bool = False):
        raise getattr(exceptions, error)("refused")

    manager = SimpleNamespace(settings=SimpleNamespace(conn_id="c", delegated=True), get=refuse)
    assert keep_alive(manager).status == status
