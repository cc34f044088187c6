"""Diagnose an ``o365mail`` connection link by link and name the broken one with its fix.

Used by ``airflow o365mail doctor`` and the api-server plugin's status page. Each check runs only
if the links it needs work; nothing here prints or returns a secret.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import requests

from airflow_provider_o365mail import exceptions as exc
from airflow_provider_o365mail.auth.store import TokenStore
from airflow_provider_o365mail.connection import O365MailSettings, load_connection, settings_from_connection
from airflow_provider_o365mail.tls import IdentityProviderSession

SECRET_EXPIRY_WARNING_DAYS = 30
CREDENTIAL_EXPIRY_FIELD = "credential_expires_on"

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"

# Which link an error breaks, in the order of the chain.
LINK_OF_ERROR: list[tuple[type[BaseException], str, str]] = [
    (
        exc.ClientCredentialError,
        "client secret",
        "Create a new client secret (Certificates & secrets), paste its "
        "Value (not its ID) into the connection's Client secret field.",
    ),
    (
        exc.ReauthorizationRequired,
        "consent",
        "Run 'airflow o365mail authorize --conn-id {conn_id}' or use Authorize on the Airflow page Microsoft 365 Mail.",
    ),
    (
        exc.AccessBlocked,
        "conditional access",
        "An administrator must allow the app in the Conditional Access policy named in the sign-in logs.",
    ),
    (
        exc.TokenStoreError,
        "token store",
        "Use the same [o365mail] token_cache_keys (or [core] fernet_key) on "
        "every Airflow component, or 'airflow o365mail forget' and authorize again.",
    ),
    (exc.IdentityProviderUnavailable, "identity provider", "Check network access to the login host; retry."),
    (exc.ConnectionConfigError, "connection", "Fix the connection's fields (see docs/connection.md)."),
    (exc.AuthorizationError, "identity provider", "See docs/troubleshooting.md for the AADSTS code."),
]


@dataclass
class Check:
    link: str
    status: str
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _classify(err: BaseException, conn_id: str) -> tuple[str, str]:
    for error_type, link, fix in LINK_OF_ERROR:
        if isinstance(err, error_type):
            return link, fix.format(conn_id=conn_id)
    return "unknown", ""


def _check_endpoints(s: O365MailSettings) -> Check:
    url = f"{s.authority}/v2.0/.well-known/openid-configuration"
    try:
        response = IdentityProviderSession(s.ca_bundle, s.timeout).get(url)
    except requests.RequestException as err:
        return Check("endpoints", FAIL, f"{url} unreachable ({type(err).__name__})", "Check DNS, proxy and firewall.")
    if response.status_code != 200:
        try:
            body = response.json()
        except ValueError:
            body = {}
        codes = body.get("error_codes") or []
        if 90002 in codes or "tenant" in str(body.get("error_description", "")).lower():
            return Check(
                "tenant",
                FAIL,
                f"the identity provider does not know tenant {s.tenant_id!r} (AADSTS{codes[0] if codes else ''})",
                "Copy the Directory (tenant) ID from the app registration's Overview page.",
            )
        return Check("endpoints", FAIL, f"discovery answered HTTP {response.status_code}", "Check the authority URL.")
    issuer = str(response.json().get("issuer", ""))
    if s.tenant_id and s.tenant_id not in ("common", "organizations") and s.tenant_id not in issuer:
        return Check(
            "tenant",
            FAIL,
            f"the authority's issuer {issuer} is not tenant {s.tenant_id}",
            "Use the tenant ID of the directory the app is registered in.",
        )
    return Check("endpoints", OK, f"V2 discovery at {s.authority} answers; issuer {issuer}")


def _check_secret_expiry(extra: dict[str, Any]) -> Check | None:
    raw = extra.get(CREDENTIAL_EXPIRY_FIELD)
    if not raw:
        return None
    try:
        expires = dt.date.fromisoformat(str(raw)[:10])
    except ValueError:
        return Check("client secret", WARN, f"{CREDENTIAL_EXPIRY_FIELD}={raw!r} is not a date (YYYY-MM-DD)")
    days = (expires - dt.date.today()).days
    if days < 0:
        return Check(
            "client secret",
            FAIL,
            f"the client secret expired on {expires} (recorded in the connection)",
            "Create a new secret and update the connection (and its expiry date).",
        )
    if days <= SECRET_EXPIRY_WARNING_DAYS:
        return Check(
            "client secret",
            WARN,
            f"the client secret expires in {days} day(s), on {expires}",
            "Create a new secret now and update the connection before it expires.",
        )
    return Check("client secret expiry", OK, f"expires on {expires} ({days} days)")


def diagnose(conn_id: str) -> list[Check]:
    """Run the chain; a failed link skips the checks that depend on it."""
    from airflow_provider_o365mail.hooks.o365mail import O365MailHook

    checks: list[Check] = []
    try:
        connection = load_connection(conn_id)
        settings = settings_from_connection(connection)
    except Exception as err:
        _, fix = _classify(err, conn_id)
        return [Check("connection", FAIL, str(err), fix or "Create the connection (docs/connection.md).")]
    checks.append(
        Check(
            "connection",
            OK,
            f"{settings.grant_type}, mailbox {settings.mailbox}, authority {settings.authority}, "
            f"IMAP {settings.imap_host}:{settings.imap_port}, SMTP {settings.smtp_host}:{settings.smtp_port}",
        )
    )
    endpoints = _check_endpoints(settings)
    checks.append(endpoints)
    expiry = _check_secret_expiry(connection.extra_dejson)
    if expiry is not None:
        checks.append(expiry)
    if endpoints.status == FAIL:
        return [*checks, *(Check(link, SKIP, "needs the identity provider") for link in ("token", "IMAP", "SMTP"))]

    try:
        stored = TokenStore(conn_id).load()
        checks.append(
            Check("token store", OK, "readable" + (f", written {_age(stored.written_at)} ago" if stored else ", empty"))
        )
    except exc.TokenStoreError as err:
        link, fix = _classify(err, conn_id)
        checks.append(Check(link, FAIL, str(err), fix))
        return [*checks, *(Check(link, SKIP, "needs the token store") for link in ("token", "IMAP", "SMTP"))]

    hook = O365MailHook(conn_id)
    try:
        token = hook.access_token(force_refresh=True)
        what = "refresh token redeemed" if settings.delegated else "client credentials accepted"
        checks.append(Check("token", OK, f"{what}; access token valid for {token.seconds_left / 60:.0f} min"))
    except Exception as err:
        link, fix = _classify(err, conn_id)
        checks.append(Check(link, FAIL, str(err), fix))
        return [*checks, *(Check(link, SKIP, "needs an access token") for link in ("IMAP", "SMTP"))]

    checks.append(_run("IMAP", lambda: _imap_check(hook), settings))
    checks.append(_run("SMTP", lambda: _smtp_check(hook), settings))
    return checks


def _imap_check(hook: Any) -> str:
    with hook.imap_client() as client:
        info = client.select_folder("INBOX", readonly=True)
        return f"login and SELECT INBOX work ({info.get(b'EXISTS', '?')} messages)"


def _smtp_check(hook: Any) -> str:
    with hook.smtp_client() as client:
        return f"STARTTLS and AUTH XOAUTH2 accepted (max message size {client.esmtp_features.get('size', '?')})"


def _run(link: str, check: Callable[[], str], settings: O365MailSettings) -> Check:
    try:
        return Check(link, OK, check())
    except exc.O365MailError as err:
        fix = ""
        if link == "SMTP" and "5.7.139" in str(err):
            fix = "Enable SMTP AUTH: Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false."
        elif link == "SMTP":
            fix = "Check SMTP AUTH for the tenant and mailbox and the SMTP.Send permission."
        else:
            fix = "Check IMAP is enabled for the mailbox and the IMAP.AccessAsUser.All permission."
        return Check(link, FAIL, str(err), fix)
    except (OSError, TimeoutError) as err:
        host = settings.imap_host if link == "IMAP" else settings.smtp_host
        return Check(link, FAIL, f"cannot reach {host}: {type(err).__name__}: {err}", "Check network access.")


def _age(timestamp: float) -> str:
    seconds = max(0, time.time() - timestamp)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"
