"""Every ``o365mail`` connection Airflow can see, and an honest state for each (no secrets).

Connections come from the metadata DB, from ``AIRFLOW_CONN_*`` environment variables and, when a
secrets backend is configured, from it for the ids the provider has seen (a token store, a recorded
error, or the default id): a secrets backend cannot be listed, only asked for an id.

The state is never better than the evidence: a permanent token error recorded after the token store
was last written makes the connection red (``revoked`` or ``failing``) whatever the store still holds;
an error older than the last successful write is shown as recovered.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Iterable
from typing import Any

from airflow_provider_o365mail import exceptions as exc
from airflow_provider_o365mail.auth.expiry import EXPIRING, configured_warning_days, credential_warnings
from airflow_provider_o365mail.auth.last_error import last_error_record
from airflow_provider_o365mail.auth.store import LEGACY_STORE_PREFIX, STORE_PREFIX, TokenStore
from airflow_provider_o365mail.auth.token_status import describe_store, watch_keepalive_days
from airflow_provider_o365mail.connection import CONN_TYPE, DEFAULT_CONN_ID, settings_from_connection
from airflow_provider_o365mail.exceptions import O365MailError
from airflow_provider_o365mail.hooks.doctor import scopes_needed
from airflow_provider_o365mail.runtime import load_connection

log = logging.getLogger(__name__)

ENV_PREFIX = "AIRFLOW_CONN_"
LAST_ERROR_PREFIX = "o365mail_last_error__"
#: Entra ID refresh tokens die after 90 days without use (docs/token-store.md).
REFRESH_TOKEN_MAX_INACTIVE_DAYS = 90
SECRET_EXPIRY_WARNING_DAYS = 30

SOURCE_DB = "metadata DB"
SOURCE_ENV = "environment variable"
SOURCE_SECRETS = "secrets backend"

OK, WARN, ERROR, INFO = "ok", "warn", "error", "info"
REVOKED_TEXT = {
    "GrantRevoked": "the grant was revoked",
    "ConsentRevoked": "the consent was removed",
    "RefreshTokenExpired": "the refresh token expired",
    "InteractionRequired": "the user must sign in again",
}


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds")


def _parse_iso(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def env_conn_ids(environ: dict[str, str] | None = None) -> list[str]:
    """Ids of the connections defined as ``AIRFLOW_CONN_<ID>`` (Airflow looks them up upper-cased)."""
    environ = dict(os.environ) if environ is None else environ
    return sorted(
        {name[len(ENV_PREFIX) :].lower() for name in environ if name.startswith(ENV_PREFIX) and name != ENV_PREFIX}
    )


def _env_connection(conn_id: str) -> Any | None:
    from airflow.secrets.environment_variables import EnvironmentVariablesBackend

    try:
        return EnvironmentVariablesBackend().get_connection(conn_id)
    except Exception as err:  # an unparsable value: Airflow itself fails on it too
        log.warning("Environment variable for connection %s cannot be parsed: %s", conn_id, type(err).__name__)
        return None


def _secrets_backend_configured() -> bool:
    from airflow.configuration import conf

    return bool((conf.get("secrets", "backend", fallback="") or "").strip())


def _ids_with_provider_state(session: Any) -> set[str]:
    from airflow.models.variable import Variable

    ids = {DEFAULT_CONN_ID}
    for prefix in (STORE_PREFIX, LEGACY_STORE_PREFIX, LAST_ERROR_PREFIX):
        for (key,) in session.query(Variable.key).filter(Variable.key.like(f"{prefix}%")).all():
            ids.add(key[len(prefix) :])
    return ids


def discover(session: Any) -> list[tuple[Any, str]]:
    """``(connection, source)`` for every ``o365mail`` connection, sorted by id; the effective definition."""
    from airflow.exceptions import AirflowNotFoundException
    from airflow.models.connection import Connection

    db_ids = {
        conn_id for (conn_id,) in session.query(Connection.conn_id).filter(Connection.conn_type == CONN_TYPE).all()
    }
    env_ids = {
        conn_id for conn_id in env_conn_ids() if getattr(_env_connection(conn_id), "conn_type", None) == CONN_TYPE
    }
    candidates = db_ids | env_ids
    if _secrets_backend_configured():
        candidates |= _ids_with_provider_state(session)
    found: list[tuple[Any, str]] = []
    for conn_id in sorted(candidates):
        try:
            connection = load_connection(conn_id)  # the definition Airflow uses (backend, env, then DB)
        except AirflowNotFoundException:
            continue
        except Exception as err:
            log.warning("Connection %s cannot be read: %s", conn_id, type(err).__name__)
            continue
        if connection.conn_type != CONN_TYPE:
            continue
        source = SOURCE_ENV if conn_id in env_ids else SOURCE_DB if conn_id in db_ids else SOURCE_SECRETS
        found.append((connection, source))
    return found


def source_of(conn_id: str, session: Any) -> str:
    """Where the definition Airflow uses for ``conn_id`` comes from (environment before metadata DB)."""
    from airflow.models.connection import Connection

    if _env_defined(conn_id) and getattr(_env_connection(conn_id), "conn_type", None) == CONN_TYPE:
        return SOURCE_ENV
    if session.query(Connection.conn_id).filter(Connection.conn_id == conn_id).one_or_none() is not None:
        return SOURCE_DB
    return SOURCE_SECRETS


def _env_defined(conn_id: str) -> bool:
    return f"{ENV_PREFIX}{conn_id.upper()}" in os.environ


def _secret_expiry(expires: dt.date | None, today: dt.date) -> dict[str, Any]:
    if expires is None:
        return {"secret_expires_on": None, "secret_days_left": None, "secret_level": INFO}
    days = (expires - today).days
    level = ERROR if days < 0 else WARN if days <= SECRET_EXPIRY_WARNING_DAYS else OK
    return {"secret_expires_on": expires.isoformat(), "secret_days_left": days, "secret_level": level}


def _is_reauthorization(error_name: str | None) -> bool:
    error_type = getattr(exc, error_name or "", None)
    return isinstance(error_type, type) and issubclass(error_type, exc.ReauthorizationRequired)


def _how_to_authorize(conn_id: str, source: str) -> str | None:
    if source == SOURCE_DB:
        return None
    return (
        f"Defined in {'an' if source == SOURCE_ENV else 'a'} {source}: the plugin cannot change that definition. Authorize (here, or "
        f"'airflow o365mail authorize --conn-id {conn_id}' on any Airflow host) stores the grant in the "
        "encrypted token store, which every component reads first; the definition's refresh_token is used "
        "only when the store is empty (after 'forget' or a lost key). The refresh token is never shown here."
    )


def connection_state(conn: Any, source: str = SOURCE_DB, *, now: dt.datetime | None = None) -> dict[str, Any]:
    """What the page shows for one connection: fields, ``state``, ``level`` (ok/warn/error/info), no secret."""
    now = now or dt.datetime.now(dt.UTC)
    row: dict[str, Any] = {
        "conn_id": conn.conn_id,
        "source": source,
        "authorize_note": _how_to_authorize(conn.conn_id, source),
        "mailbox": None,
        "grant_type": None,
        "credential_type": None,
        "transport": None,
        "scopes_needed": None,
        "account": None,
        "last_error": None,
        "last_error_at": None,
        "last_error_current": False,
        "access_token_expires_at": None,
        "refresh_token_last_used": None,
        "refresh_token_expires_at": None,
        "refresh_token_expiry_estimated": False,
        "credential_warnings": [],
        **_secret_expiry(None, now.date()),
    }
    try:
        settings = settings_from_connection(conn)
    except O365MailError as err:
        return {**row, "state": "misconfigured", "level": ERROR, "state_text": str(err)[:300]}
    row.update(
        mailbox=settings.mailbox,
        grant_type=settings.grant_type,
        credential_type=settings.credential_type,
        transport=settings.transport,
        scopes_needed=scopes_needed(settings),
    )
    if settings.public_client:  # the page's sign-in needs a Web redirect URI, which Entra redeems only with a secret
        row["authorize_note"] = (
            f"Public client (no secret): authorize with the device code, 'airflow o365mail authorize --conn-id "
            f"{conn.conn_id} --device-code' on any Airflow host; the Authorize button is not offered."
        )
    row.update(_secret_expiry(settings.credential_expires_on, now.date()))
    error = last_error_record(conn.conn_id)
    if error is not None:
        row.update(
            last_error=f"{error.get('error')}: {error.get('message')}",
            last_error_at=_iso(float(error.get("at") or 0)),
        )
    try:
        status = describe_store(settings)
    except O365MailError as err:
        return {
            **row,
            "state": "store-unreadable",
            "level": ERROR,
            "state_text": f"token store unreadable: {err}"[:300],
        }
    row["credential_warnings"] = _warnings(settings, error, now)
    written = _parse_iso(status.get("store_written_at"))
    error_at = _parse_iso(row["last_error_at"])
    row["last_error_current"] = error_at is not None and (written is None or error_at >= written)
    row.update(account=status.get("account"), access_token_expires_at=status.get("access_token_expires_at"))
    last_used = status.get("refresh_token_last_used")
    row["refresh_token_last_used"] = last_used
    if last_used and settings.delegated:  # Entra: 90 days without use (the store records the last use)
        expiry = _parse_iso(last_used) + dt.timedelta(days=REFRESH_TOKEN_MAX_INACTIVE_DAYS)  # type: ignore[operator]
        row.update(refresh_token_expires_at=expiry.isoformat(timespec="seconds"), refresh_token_expiry_estimated=True)

    if row["last_error_current"]:
        assert error is not None
        if _is_reauthorization(error.get("error")):
            if not settings.refresh_token and not status["account"]:
                return {**row, "state": "needs-consent", "level": WARN, "state_text": "needs consent: click Authorize"}
            why = REVOKED_TEXT.get(str(error.get("error")), "consent is needed again")
            return {**row, "state": "revoked", "level": ERROR, "state_text": f"{why}: authorize again"}
        return {**row, "state": "failing", "level": ERROR, "state_text": "the last token request failed"}
    if row["secret_level"] == ERROR:
        return {**row, "state": "secret-expired", "level": ERROR, "state_text": "the client secret has expired"}
    if not settings.delegated:
        return {
            **row,
            "state": "app-only",
            "level": OK,
            "state_text": "app-only (client credentials): no consent needed",
        }
    if status["account"]:
        text = f"authorized for {status['account']}"
        minutes = status["access_token_minutes_left"]
        if minutes is not None:
            text += f"; access token valid for {max(0, minutes):.0f} min" if minutes > 0 else "; access token expired"
        return {**row, "state": "authorized", "level": OK, "state_text": text}
    if settings.refresh_token:
        return {
            **row,
            "state": "unverified",
            "level": INFO,
            "state_text": "refresh token present, not used yet: press Check to try it",
        }
    if settings.public_client:
        text = f"needs consent: run airflow o365mail authorize --conn-id {conn.conn_id} --device-code"
        return {**row, "state": "needs-consent", "level": WARN, "state_text": text}
    return {**row, "state": "needs-consent", "level": WARN, "state_text": "needs consent: click Authorize"}


def _warnings(settings: Any, error: dict | None, now: dt.datetime) -> list[dict[str, Any]]:
    """The credential watch's warnings for this connection (what its notifier sends), without secrets."""
    try:
        stored = TokenStore(settings.conn_id).load()
    except O365MailError:
        stored = None
    found = credential_warnings(
        settings,
        stored,
        error,
        warning_days=configured_warning_days(),
        now=now.timestamp(),
        keepalive_after_days=watch_keepalive_days(),
    )
    return [{**w.as_dict(), "level": WARN if w.state == EXPIRING else ERROR} for w in found]


def all_states(found: Iterable[tuple[Any, str]]) -> list[dict[str, Any]]:
    return [connection_state(conn, source) for conn, source in found]
