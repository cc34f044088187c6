"""What the token store holds for a connection, without any secret: for the CLI and the UI page."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import msal

from airflow_provider_o365mail.auth.store import TokenStore, fingerprint
from airflow_provider_o365mail.connection import O365MailSettings


def _iso(timestamp: float | None) -> str | None:
    if not timestamp:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds")


def describe_store(settings: O365MailSettings) -> dict[str, Any]:
    """Signed-in account, scopes, access-token expiry and refresh-token age; raises TokenStoreError."""
    stored = TokenStore(settings.conn_id).load()
    status: dict[str, Any] = {
        "connection": settings.conn_id,
        "grant_type": settings.grant_type,
        "mailbox": settings.mailbox,
        "store": "empty" if stored is None else "present",
        "store_written_at": _iso(stored.written_at) if stored else None,
        "connection_refresh_token": "present" if settings.refresh_token else "missing",
        "store_seeded_from_connection": None,
        "account": None,
        "scopes": [],
        "access_token_expires_at": None,
        "access_token_minutes_left": None,
        "refresh_token_last_used": None,
        "refresh_token_age_days": None,
    }
    if stored is None:
        return status
    if settings.delegated:
        status["store_seeded_from_connection"] = (
            stored.seed_fingerprint == fingerprint(settings.refresh_token) if settings.refresh_token else True
        )
    cache = msal.SerializableTokenCache()
    cache.deserialize(stored.msal_cache)
    accounts = list(cache.search(msal.TokenCache.CredentialType.ACCOUNT))
    if accounts:
        status["account"] = accounts[0].get("username")
    tokens = list(cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN, query={"client_id": settings.client_id}))
    if tokens:
        newest = max(tokens, key=lambda t: float(t.get("expires_on", 0)))
        expires_on = float(newest.get("expires_on", 0))
        status["scopes"] = str(newest.get("target", "")).split()
        status["access_token_expires_at"] = _iso(expires_on)
        status["access_token_minutes_left"] = round((expires_on - time.time()) / 60, 1)
    refresh_tokens = list(cache.search(msal.TokenCache.CredentialType.REFRESH_TOKEN))
    if refresh_tokens:
        modified = max(float(t.get("last_modification_time", 0) or 0) for t in refresh_tokens)
        if modified:
            status["refresh_token_last_used"] = _iso(modified)
            status["refresh_token_age_days"] = round((time.time() - modified) / 86400, 2)
    return status
