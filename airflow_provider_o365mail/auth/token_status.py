"""What the token store holds for a connection, without any secret: for the CLI and the UI page.

Also the refresh token's health: Microsoft expires a refresh token that was not used for 90 days
(``MaxInactiveTime``; the refusal is AADSTS700082), and every use issues a new one with a new
90-day window. The store records when a token response last came back
(:attr:`.store.StoredCache.refresh_token_used_at`); :func:`keep_alive` redeems the refresh token
on purpose, for connections a DAG uses rarely: the credential watch does it from the scheduler and
the triggerer (``hooks/credential_watch.py``), ``airflow o365mail refresh`` on demand.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass
from typing import Any

import msal

from airflow_provider_o365mail import exceptions as exc
from airflow_provider_o365mail import hints
from airflow_provider_o365mail.auth.store import StoredCache, TokenStore, fingerprint
from airflow_provider_o365mail.auth.tokens import TokenManager
from airflow_provider_o365mail.connection import O365MailSettings
from airflow_provider_o365mail.version_compat import AirflowFailException

#: Microsoft's MaxInactiveTime for refresh tokens (entra-docs ``refresh-tokens.md``): 90 days.
REFRESH_TOKEN_MAX_INACTIVE_DAYS = 90
#: ``token-status``, ``doctor`` and the UI warn this many days before an unused refresh token expires.
REFRESH_TOKEN_WARNING_DAYS = 14
DAY = 86400.0


#: ``[o365mail] credential_watch_keepalive_days``: the credential watch redeems refresh tokens unused this long.
DEFAULT_KEEPALIVE_DAYS = 60.0


def watch_keepalive_days() -> float | None:
    """How many days unused before the credential watch redeems a refresh token; None if the watch is off."""
    from airflow_provider_o365mail.version_compat import conf

    if not conf.getboolean("o365mail", "credential_watch", fallback=True):
        return None
    return conf.getfloat("o365mail", "credential_watch_keepalive_days", fallback=DEFAULT_KEEPALIVE_DAYS)


def keepalive_fix(keepalive_after_days: float | None) -> str:
    """What to do about a refresh token near its 90 days (a template with ``{conn_id}``)."""
    if keepalive_after_days is None:
        return hints.REFRESH_KEEPALIVE
    return hints.REFRESH_WATCH_FAILED.replace("{days}", f"{keepalive_after_days:g}")


def _iso(timestamp: float | None) -> str | None:
    if not timestamp:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class RefreshTokenHealth:
    """When the refresh token was last used and when it expires if it is not used again."""

    last_used: float | None
    #: ``store`` (recorded at each refresh), ``msal cache`` (older stores), or ``unknown``
    recorded_by: str

    @property
    def expires_at(self) -> float | None:
        return self.last_used + REFRESH_TOKEN_MAX_INACTIVE_DAYS * DAY if self.last_used else None

    def days_left(self, now: float | None = None) -> float | None:
        expires_at = self.expires_at
        return None if expires_at is None else (expires_at - (time.time() if now is None else now)) / DAY

    def state(self, now: float | None = None) -> str:
        """``ok``, ``warn`` (inside :data:`REFRESH_TOKEN_WARNING_DAYS`), ``expired`` or ``unknown``."""
        left = self.days_left(now)
        if left is None:
            return "unknown"
        if left <= 0:
            return "expired"
        return "warn" if left <= REFRESH_TOKEN_WARNING_DAYS else "ok"

    def sentence(self, now: float | None = None) -> str:
        if self.last_used is None:
            return (
                "no use of the refresh token is recorded yet (empty token store): it expires "
                f"{REFRESH_TOKEN_MAX_INACTIVE_DAYS} days after the consent unless a task or 'airflow o365mail refresh' "
                "uses it"
            )
        left = self.days_left(now) or 0.0
        when = f"last used {_iso(self.last_used)}"
        if left <= 0:
            return f"{when}: unused for {REFRESH_TOKEN_MAX_INACTIVE_DAYS} days, it expired on {_date(self.expires_at)}"
        return f"{when}; unused, it expires on {_date(self.expires_at)} (in {left:.0f} days)"


def refresh_token_health(stored: StoredCache | None) -> RefreshTokenHealth:
    """The health of the refresh token in ``stored`` (recorded use first, else the MSAL cache's own stamp)."""
    if stored is None:
        return RefreshTokenHealth(None, "unknown")
    if stored.refresh_token_used_at:
        return RefreshTokenHealth(stored.refresh_token_used_at, "store")
    cache = msal.SerializableTokenCache()
    cache.deserialize(stored.msal_cache)
    stamps = [
        float(t.get("last_modification_time", 0) or 0)
        for t in cache.search(msal.TokenCache.CredentialType.REFRESH_TOKEN)
    ]
    newest = max(stamps, default=0.0)
    return RefreshTokenHealth(newest, "msal cache") if newest else RefreshTokenHealth(None, "unknown")


def _date(timestamp: float | None) -> str | None:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).date().isoformat() if timestamp else None


@dataclass
class KeepAliveResult:
    """What ``airflow o365mail refresh`` did for one connection (no secret)."""

    connection: str
    status: str  # "ok", "skipped", "failed" (retry later), "reauthorize" or "broken" (fix the connection)
    detail: str
    refresh_token_expires_on: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def keep_alive(manager: TokenManager) -> KeepAliveResult:
    """Redeem the connection's refresh token now and store the rotated one (a new 90-day window).

    A refusal that needs a person (revoked, expired, consent removed) is ``reauthorize``; a permanent
    error of the connection itself (expired secret, unregistered certificate, bad field) is ``broken``; a temporary
    failure (network, proxy, identity provider busy, a transient AADSTS code) is ``failed`` and the next
    scheduled run tries again.
    """
    settings = manager.settings
    conn_id = settings.conn_id
    if not settings.delegated:
        return KeepAliveResult(conn_id, "skipped", "app-only (client credentials): no refresh token to keep alive")
    try:
        manager.get(force_refresh=True)
        health = refresh_token_health(manager.store.load())
    except exc.ReauthorizationRequired as err:
        return KeepAliveResult(conn_id, "reauthorize", str(err))
    except (exc.IdentityProviderUnavailable, exc.MailServerUnavailable, exc.TokenStoreError) as err:
        return KeepAliveResult(conn_id, "failed", f"{err} (temporary: the next run tries again)")
    except exc.O365MailError as err:
        if isinstance(err, AirflowFailException | exc.ConnectionConfigError):  # bad secret, certificate, field
            return KeepAliveResult(conn_id, "broken", str(err))
        return KeepAliveResult(conn_id, "failed", str(err))
    return KeepAliveResult(
        conn_id,
        "ok",
        f"refresh token redeemed and the rotated one stored; unused, it expires on {_date(health.expires_at)}",
        _date(health.expires_at),
    )


def describe_store(settings: O365MailSettings) -> dict[str, Any]:
    """Signed-in account, scopes, access-token expiry and refresh-token health; raises TokenStoreError."""
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
        "refresh_token_expires_on": None,
        "refresh_token_days_left": None,
        "refresh_token_health": None,
        "refresh_token_warning": None,
    }
    if settings.delegated:
        health = refresh_token_health(stored)
        status["refresh_token_health"] = health.state()
        if health.state() in ("warn", "expired"):
            fix = keepalive_fix(watch_keepalive_days()) if health.state() == "warn" else hints.REAUTHORIZE
            if settings.public_client:
                fix = hints.for_public_client(fix)
            status["refresh_token_warning"] = f"{health.sentence()}. {fix.format(conn_id=settings.conn_id)}"
        if health.last_used:
            status["refresh_token_last_used"] = _iso(health.last_used)
            status["refresh_token_age_days"] = round((time.time() - health.last_used) / DAY, 2)
            status["refresh_token_expires_on"] = _date(health.expires_at)
            status["refresh_token_days_left"] = round(health.days_left() or 0.0, 1)
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
    return status
