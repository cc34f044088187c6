"""Diagnose an ``o365mail`` connection link by link and name the broken one with its fix.

Used by ``airflow o365mail doctor`` and the Check button of the Microsoft 365 Mail page (both glue,
hence here, below them). Each check runs only if the links it needs work; nothing here prints or
returns a secret.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import jwt
import requests

from airflow_provider_o365mail import exceptions as exc
from airflow_provider_o365mail import hints
from airflow_provider_o365mail.auth.credential import FederatedTokenFile, certificate_info
from airflow_provider_o365mail.auth.crypto import StoreUndecryptable
from airflow_provider_o365mail.auth.store import StoredCache, TokenStore
from airflow_provider_o365mail.auth.token_status import (
    REFRESH_TOKEN_WARNING_DAYS,
    keepalive_fix,
    refresh_token_health,
    watch_keepalive_days,
)
from airflow_provider_o365mail.connection import O365MailSettings, settings_from_connection
from airflow_provider_o365mail.connection_defaults import (
    CREDENTIAL_CERTIFICATE,
    CREDENTIAL_FEDERATED,
    CREDENTIAL_PUBLIC,
    CREDENTIAL_SECRET,
    FEDERATED_TOKEN_AUDIENCE,
    TRANSPORT_AUTO,
    TRANSPORT_GRAPH,
    TRANSPORT_SMTP,
)
from airflow_provider_o365mail.graph.sender import mailbox_path
from airflow_provider_o365mail.hooks.credential_watch import WatchConfig, WatchConfigError, watch_status
from airflow_provider_o365mail.hooks.fallback import smtp_auth_disabled
from airflow_provider_o365mail.runtime import load_connection
from airflow_provider_o365mail.tls import IdentityProviderSession

SECRET_EXPIRY_WARNING_DAYS = 30

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"

# Which link an error breaks, in the order of the chain.
LINK_OF_ERROR: list[tuple[type[BaseException], str, str]] = [
    (exc.ClientCredentialError, "client secret", hints.NEW_CLIENT_SECRET),
    (exc.ReauthorizationRequired, "consent", hints.NEVER_AUTHORIZED),
    (exc.AccessBlocked, "conditional access", hints.CONDITIONAL_ACCESS),
    (exc.TokenStoreError, "token store", hints.TOKEN_STORE_KEYS),
    (exc.ProxyRefused, "proxy", hints.PROXY_REFUSED_OTHER),
    (exc.ProxyUnavailable, "proxy", hints.PROXY_UNREACHABLE),
    (exc.IdentityProviderUnavailable, "identity provider", hints.IDENTITY_PROVIDER_UNREACHABLE),
    (exc.ConnectionConfigError, "connection", hints.FIX_CONNECTION),
    (exc.AuthorizationError, "identity provider", hints.AADSTS_REFERENCE),
]


@dataclass
class Check:
    link: str
    status: str
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _classify(err: BaseException, conn_id: str, *, public_client: bool = False) -> tuple[str, str]:
    for error_type, link, fix in LINK_OF_ERROR:
        if isinstance(err, error_type):
            return link, (hints.for_public_client(fix) if public_client else fix).format(conn_id=conn_id)
    return "unknown", ""


def _check_endpoints(s: O365MailSettings) -> Check:
    url = f"{s.authority}/v2.0/.well-known/openid-configuration"
    try:
        response = IdentityProviderSession(s.ca_bundle, s.timeout, proxy=s.http_proxy).get(url)
    except exc.ProxyRefused as err:
        return Check("proxy", FAIL, str(err), hints.PROXY_REFUSED_OTHER)
    except requests.exceptions.ProxyError as err:
        return Check("proxy", FAIL, str(err), hints.PROXY_UNREACHABLE)
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


def _check_secret_expiry(expires: dt.date | None) -> Check | None:
    if expires is None:
        return None
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


def _check_certificate(s: O365MailSettings) -> Check:
    try:
        info = certificate_info(s)
    except exc.ConnectionConfigError as err:
        return Check("certificate", FAIL, str(err), hints.FIX_CONNECTION)
    detail = (
        f"subject {info.subject}, thumbprint {info.thumbprint_sha1} (x5t#S256 {info.x5t_s256}), "
        f"valid {info.not_before:%Y-%m-%d} to {info.not_after:%Y-%m-%d}"
    )
    renew = "Create a new certificate, upload its public part to the app registration, then update the connection."
    now = dt.datetime.now(dt.UTC)
    if info.not_after <= now:
        return Check("certificate", FAIL, f"the certificate expired on {info.not_after:%Y-%m-%d}: {detail}", renew)
    if info.not_before > now:
        return Check("certificate", FAIL, f"the certificate is not valid yet: {detail}", "Check this host's clock.")
    if info.days_left <= SECRET_EXPIRY_WARNING_DAYS:
        return Check("certificate", WARN, f"the certificate expires in {info.days_left} day(s): {detail}", renew)
    return Check("certificate", OK, detail)


def _check_federated(s: O365MailSettings) -> Check:
    assert s.federated_assertion_file is not None
    try:
        token = FederatedTokenFile(s.federated_assertion_file, s.conn_id)()
        claims = jwt.decode(token, options={"verify_signature": False})
    except exc.ConnectionConfigError as err:
        return Check("federated token", FAIL, str(err), hints.FIX_CONNECTION)
    except jwt.PyJWTError:
        return Check("federated token", FAIL, f"{s.federated_assertion_file} does not hold a JWT", hints.FIX_CONNECTION)
    minutes = (float(claims.get("exp", 0)) - time.time()) / 60
    detail = (
        f"token file {s.federated_assertion_file}: issuer {claims.get('iss')}, subject {claims.get('sub')}, "
        f"audience {claims.get('aud')}, expires in {minutes:.0f} min"
    )
    audiences = claims.get("aud") if isinstance(claims.get("aud"), list) else [claims.get("aud")]
    if minutes <= 0:
        return Check(
            "federated token",
            FAIL,
            f"the federated token has expired: {detail}",
            "The file is not being refreshed: check the workload identity webhook / projected token volume.",
        )
    if FEDERATED_TOKEN_AUDIENCE not in audiences:
        return Check(
            "federated token",
            WARN,
            detail,
            f"Entra ID expects audience {FEDERATED_TOKEN_AUDIENCE} unless the federated credential names another.",
        )
    return Check("federated token", OK, detail + " (issuer, subject and audience must match a federated credential)")


def _check_credential(s: O365MailSettings) -> Check | None:
    if s.credential_type == CREDENTIAL_CERTIFICATE:
        return _check_certificate(s)
    if s.credential_type == CREDENTIAL_FEDERATED:
        return _check_federated(s)
    if s.credential_type == CREDENTIAL_PUBLIC:
        return Check(
            "public client",
            OK,
            "no credential is stored or sent; Entra ID accepts that only while the app registration allows public "
            f"client flows (consent: airflow o365mail authorize --conn-id {s.conn_id} --device-code)",
        )
    return _check_secret_expiry(s.credential_expires_on)


def diagnose(conn_id: str) -> list[Check]:
    """Run the chain; a failed link skips the checks that depend on it."""
    from airflow_provider_o365mail.hooks.o365mail import O365MailHook

    checks: list[Check] = []
    try:
        settings = settings_from_connection(load_connection(conn_id))
    except Exception as err:
        _, fix = _classify(err, conn_id)
        return [Check("connection", FAIL, str(err), fix or hints.CREATE_CONNECTION)]
    checks.append(
        Check(
            "connection",
            OK,
            f"{settings.grant_type} with {settings.credential_type.replace('_', ' ')}, mailbox {settings.mailbox}, "
            f"authority {settings.authority}, "
            f"IMAP {settings.imap_host}:{settings.imap_port}, SMTP {settings.smtp_host}:{settings.smtp_port}, "
            f"transport {settings.transport}" + (f", Graph {settings.graph_url}" if settings.uses_graph else ""),
        )
    )
    checks.append(Check("scopes", OK, scopes_needed(settings)))
    checks.append(_check_watch(settings))  # configuration, not a link: a failure below does not skip it
    later = _later_links(settings)
    endpoints = _check_endpoints(settings)
    checks.append(endpoints)
    credential = _check_credential(settings)
    if credential is not None:
        checks.append(credential)
    if endpoints.status == FAIL:
        return [*checks, *(Check(link, SKIP, "needs the identity provider") for link in ("token", *later))]

    stored: StoredCache | None = None
    store = TokenStore(conn_id)
    try:
        stored = store.load()
        checks.append(_check_store(store, stored))
    except StoreUndecryptable as err:
        fallback = settings.refresh_token or not settings.delegated
        checks.append(
            Check(
                "token store",
                WARN if fallback else FAIL,
                f"{err}"
                + (
                    " Falling back to the connection's own credentials."
                    if fallback
                    else " The connection has no refresh token to fall back to."
                ),
                (
                    "Give every Airflow component the same [core] fernet_key; for a store written before 0.2, put the "
                    "old key back second ([core] fernet_key = new,old) and run 'airflow o365mail rotate-keys'"
                    if store.uses_data_key
                    else "Put the old key back second ([o365mail] token_cache_keys = new,old) and run "
                    "'airflow o365mail rotate-keys'"
                )
                + f"; or 'airflow o365mail authorize --conn-id {conn_id}'.",
            )
        )
        if not fallback:
            return [*checks, *(Check(link, SKIP, "needs the token store") for link in ("token", *later))]
    except exc.TokenStoreError as err:
        link, fix = _classify(err, conn_id)
        checks.append(Check(link, FAIL, str(err), fix))
        return [*checks, *(Check(link, SKIP, "needs the token store") for link in ("token", *later))]

    if settings.delegated:
        checks.append(_check_refresh_token(stored, conn_id, public_client=settings.public_client))
    hook = O365MailHook(conn_id)
    try:
        token = hook.access_token(force_refresh=True)
        what = "refresh token redeemed" if settings.delegated else "client credentials accepted"
        checks.append(Check("token", OK, f"{what}; access token valid for {token.seconds_left / 60:.0f} min"))
    except Exception as err:
        link, fix = _classify(err, conn_id, public_client=settings.public_client)
        if isinstance(err, exc.ClientCredentialError) and settings.credential_type != CREDENTIAL_SECRET:
            link, fix = f"{settings.credential_type} credential", ""  # the message names this credential's fix
        checks.append(Check(link, FAIL, str(err), fix))
        return [*checks, *(Check(link, SKIP, "needs an access token") for link in later)]

    if settings.transport == TRANSPORT_GRAPH:
        checks.append(
            Check(
                "IMAP",
                SKIP,
                "not needed: transport graph reads through Microsoft Graph (a sensor with transport='imap' would "
                "need it)",
            )
        )
    else:
        checks.append(_run("IMAP", lambda: _imap_check(hook), settings))
    if settings.transport == TRANSPORT_GRAPH:
        checks.append(Check("SMTP", SKIP, "not needed: transport graph sends through Microsoft Graph, not SMTP AUTH"))
    else:
        checks.append(_run("SMTP", lambda: _smtp_check(hook), settings))
    if settings.uses_graph:
        checks.extend(_graph_checks(hook, settings))
        _auto_smtp_verdict(checks, settings)
    return checks


# ---------------------------------------------------------------------- scopes and Microsoft Graph
def scopes_needed(s: O365MailSettings) -> str:
    """Which scopes the connection's transport needs, and what its consent asks for (no I/O)."""
    exchange = " ".join(s.scopes)
    graph = " ".join(s.graph_scopes)
    if not s.delegated:
        text = f"app-only: Exchange token {exchange} (IMAP; SMTP needs the application permission SMTP.SendAsApp)"
        if s.uses_graph:
            text += (
                f"; Graph token {graph}: the Microsoft Graph application permissions Mail.Send and Mail.ReadWrite "
                "with admin consent (and any application access policy must include the mailbox)"
            )
        return text + "; no user consent"
    reading = f"Exchange {exchange} ({'IMAP' if s.transport == TRANSPORT_GRAPH else 'IMAP and SMTP'})"
    if s.transport == TRANSPORT_SMTP:
        return f"transport smtp: {reading}; consent asks for these only (Graph is not asked)"
    sends = "Graph only; SMTP is not used" if s.transport == TRANSPORT_GRAPH else "SMTP, Graph when SMTP AUTH is off"
    return (
        f"transport {s.transport} (sends through {sends}): {reading} and Microsoft Graph {graph}; one consent asks "
        "for both (Mail.Send.Shared too in graph_permissions to send from a shared mailbox)"
    )


def _later_links(s: O365MailSettings) -> tuple[str, ...]:
    links: tuple[str, ...] = ("IMAP", "SMTP")
    return (*links, "Graph token", "Graph") if s.uses_graph else links


def _graph_checks(hook: Any, s: O365MailSettings) -> list[Check]:
    """A Graph token with the same grant, then a harmless Graph request (one Sent Items message's id)."""
    try:
        token = hook.graph_access_token(force_refresh=True)
    except exc.ReauthorizationRequired as err:
        if 65001 in err.error_codes:
            fix = hints.GRAPH_CONSENT_MISSING.format(conn_id=s.conn_id, permissions=" ".join(s.graph_permissions))
            return [Check("Graph consent", FAIL, str(err), fix), Check("Graph", SKIP, "needs a Graph token")]
        link, fix = _classify(err, s.conn_id, public_client=s.public_client)
        return [Check(f"Graph {link}", FAIL, str(err), fix), Check("Graph", SKIP, "needs a Graph token")]
    except Exception as err:
        link, fix = _classify(err, s.conn_id, public_client=s.public_client)
        return [Check(f"Graph {link}", FAIL, str(err), fix), Check("Graph", SKIP, "needs a Graph token")]
    granted = _token_permissions(token.token)
    checks = [
        Check(
            "Graph token",
            OK,
            f"{' '.join(s.graph_scopes)}: access token valid for {token.seconds_left / 60:.0f} min"
            + (f", permissions {granted}" if granted else ""),
        )
    ]
    if not hook.graph_can_read():
        checks.append(
            Check(
                "Graph",
                SKIP,
                "graph_permissions have no Mail.Read or Mail.ReadWrite: no harmless request to try (Mail.Send is "
                "used at the first send); large mail and the Sent Items check need Mail.ReadWrite",
            )
        )
        return checks
    who = "me" if s.delegated else mailbox_path(s.mailbox)
    try:
        found = hook.graph_probe()
        checks.append(
            Check(
                "Graph",
                OK,
                f"GET {s.graph_url}/v1.0/{who}/mailFolders/SentItems/messages?$top=1 answered ({found} message id(s))",
            )
        )
    except exc.O365MailError as err:
        checks.append(Check("Graph", FAIL, str(err), "The message names Graph's error code and the fix."))
    except (OSError, TimeoutError) as err:
        checks.append(
            Check("Graph", FAIL, f"cannot reach {s.graph_url}: {type(err).__name__}", "Check network access.")
        )
    return checks


def _token_permissions(token: str) -> str:
    """The delegated ``scp`` or application ``roles`` of an access token (names only; never the token)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return ""
    roles = claims.get("roles")
    return str(claims.get("scp") or (" ".join(roles) if isinstance(roles, list) else ""))


def _auto_smtp_verdict(checks: list[Check], s: O365MailSettings) -> None:
    """transport auto: SMTP AUTH disabled (5.7.139) is fine when Graph works, since auto then sends through Graph."""
    if s.transport != TRANSPORT_AUTO:
        return
    smtp = next((c for c in checks if c.link == "SMTP"), None)
    graph_ok = any(c.link == "Graph token" and c.status == OK for c in checks) and not any(
        c.link == "Graph" and c.status == FAIL for c in checks
    )
    if smtp is not None and smtp.status == FAIL and smtp.fix == hints.SMTP_AUTH_DISABLED and graph_ok:
        smtp.status = WARN
        smtp.detail += " (transport auto: this mailbox's mail goes through Microsoft Graph instead, which works)"
        smtp.fix = "Nothing to do for sending; enable SMTP AUTH for the mailbox only if you want SMTP used."
    imap = next((c for c in checks if c.link == "IMAP"), None)
    graph_reads = any(c.link == "Graph" and c.status == OK for c in checks)
    if imap is not None and imap.status == FAIL and imap.detail.startswith(IMAP_REFUSED) and graph_reads:
        imap.status = WARN
        imap.detail += " (transport auto: sensors read this mailbox through Microsoft Graph instead, which works)"
        imap.fix = "Nothing to do for reading; enable IMAP for the mailbox only if you want IMAP used."


def _check_store(store: TokenStore, stored: StoredCache | None) -> Check:
    """How a readable store is encrypted, and whether Airflow encrypts its data key."""
    detail = "readable" + (f", written {_age(stored.written_at)} ago" if stored else ", empty")
    if not store.uses_data_key:
        detail += "; encrypted with [o365mail] token_cache_keys"
        if stored and stored.stale_key:
            detail += (
                " (an older one: re-encrypted under the newest on the next use, or 'airflow o365mail rotate-keys')"
            )
        return Check("token store", OK, detail)
    state = store.data_key_state()
    if stored and stored.stale_key:
        detail += (
            "; written before 0.2 under a key derived from [core] fernet_key: this check's refresh moves it to its "
            f"data key (Variable {store.data_key})"
        )
    elif stored:
        detail += f"; encrypted with its data key (Variable {store.data_key}"
        detail += ", encrypted by Airflow: 'airflow rotate-fernet-key' rotates it)" if state == "encrypted" else ")"
    if state == "plain":
        return Check(
            "token store",
            WARN,
            f"{detail}; but Airflow stored the data key Variable {store.data_key} unencrypted: the component that "
            "wrote it had no [core] fernet_key",
            "Set the same [core] fernet_key on every Airflow component (the api-server included), then "
            f"'airflow o365mail forget --conn-id {store.conn_id}' and authorize again: the new data key is stored "
            "encrypted.",
        )
    return Check("token store", OK, detail)


def _check_refresh_token(stored: StoredCache | None, conn_id: str, *, public_client: bool = False) -> Check:
    """Last use and expiry of the refresh token as found (before the token check below redeems it)."""
    health = refresh_token_health(stored)
    state = health.state()
    detail = health.sentence()
    if state == "warn":
        return Check(
            "refresh token",
            WARN,
            f"{detail}: inside {REFRESH_TOKEN_WARNING_DAYS} days (this check uses it once more)",
            keepalive_fix(watch_keepalive_days()).format(conn_id=conn_id),
        )
    if state == "expired":  # by the record; the token check below has Microsoft's word on it
        fix = hints.for_public_client(hints.REAUTHORIZE) if public_client else hints.REAUTHORIZE
        return Check("refresh token", WARN, detail, fix.format(conn_id=conn_id))
    return Check("refresh token", OK, detail)


def _check_watch(s: O365MailSettings) -> Check:
    """The credential watch for this connection: on or off, its last check, keep-alive and notification."""
    try:
        config = WatchConfig.configured()
    except WatchConfigError as err:
        return Check("credential watch", WARN, str(err), "Fix the [o365mail] option named.")
    if not config.enabled:
        return Check(
            "credential watch",
            OK,
            "off ([o365mail] credential_watch = False): nothing keeps refresh tokens alive unless something uses "
            "them or 'airflow o365mail refresh' is scheduled; the refresh token line warns "
            f"{REFRESH_TOKEN_WARNING_DAYS} days before it expires",
        )
    try:
        state = watch_status(s.conn_id)
    except Exception as err:  # the Variable cannot be read here: the other checks say why
        return Check("credential watch", WARN, f"its state cannot be read ({type(err).__name__})", "")
    hours = config.interval / 3600
    parts = [
        f"on: the scheduler and triggerer check every {hours:g} h, redeem refresh tokens unused for "
        f"{config.keepalive_after_days:g} days, report credentials {config.warning_days} days before they expire "
        + (f"to {config.notifier}" if config.notifier else "(no credential_notifier: logs, this page and doctor)")
    ]
    if state.checked_at:
        parts.append(f"last check {_stamp(state.checked_at)} by {state.checked_by or 'unknown'}")
    else:
        parts.append("no check recorded yet (a scheduler with this provider installed runs it within minutes)")
    if state.kept_alive_at:
        parts.append(f"last keep-alive {_stamp(state.kept_alive_at)}: {state.keep_alive}")
    if state.notified:
        parts.append(
            "notified: " + ", ".join(f"{key.replace('|', ' ')} on {day}" for key, day in state.notified.items())
        )
    detail = "; ".join(parts)
    if state.notify_error:
        return Check(
            "credential watch",
            WARN,
            f"{detail}; the notifier failed: {state.notify_error}",
            "Check [o365mail] credential_notifier and credential_notifier_kwargs (the scheduler's log has the error).",
        )
    if state.keep_alive and not state.keep_alive.startswith(("ok", "skipped")):
        fix = "" if state.keep_alive.startswith(("reauthorize", "broken")) else "The next check tries again."
        return Check("credential watch", WARN, detail, fix)
    return Check("credential watch", OK, detail)


def _stamp(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _imap_check(hook: Any) -> str:
    with hook.imap_client() as client:
        info = client.select_folder("INBOX", readonly=True)
        return f"login and SELECT INBOX work ({info.get(b'EXISTS', '?')} messages)"


def _smtp_check(hook: Any) -> str:
    with hook.smtp_client() as client:
        return f"STARTTLS and AUTH XOAUTH2 accepted (max message size {client.esmtp_features.get('size', '?')})"


#: How the IMAP check's detail starts when Exchange refused the login (IMAP off, or the token refused).
IMAP_REFUSED = "Exchange refused the IMAP login"


def _run(link: str, check: Callable[[], str], settings: O365MailSettings) -> Check:
    try:
        return Check(link, OK, check())
    except exc.O365MailError as err:
        if link == "IMAP" and isinstance(err, exc.MailAuthenticationError):
            return Check(link, FAIL, f"{IMAP_REFUSED}: {err}", hints.IMAP_CHECK_FAILED)
        if link == "SMTP" and smtp_auth_disabled(err):
            fix = hints.SMTP_AUTH_DISABLED
        elif link == "SMTP":
            fix = hints.SMTP_CHECK_FAILED
        else:
            fix = hints.IMAP_CHECK_FAILED
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
