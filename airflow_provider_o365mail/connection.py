"""The ``o365mail`` connection: fields, defaults, cloud presets and validation (no I/O).

One place turns an Airflow Connection into typed settings; the hook, triggers, CLI and plugin
all read connections through :func:`settings_from_connection`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from airflow_provider_o365mail.connection_defaults import (
    CLOUDS,
    CONN_TYPE,
    CREDENTIAL_CERTIFICATE,
    CREDENTIAL_FEDERATED,
    CREDENTIAL_PUBLIC,
    CREDENTIAL_SECRET,
    CREDENTIAL_TYPES,
    DEFAULT_CLOUD,
    DEFAULT_CONN_ID,
    DEFAULT_GRAPH_PERMISSIONS,
    DEFAULT_IMAP_PORT,
    DEFAULT_SMTP_PORT,
    DEFAULT_TIMEOUT_SECONDS,
    DEFAULT_TRANSPORT,
    ENV_CLIENT_ID,
    ENV_FEDERATED_TOKEN_FILE,
    ENV_TENANT_ID,
    GRANT_AUTHORIZATION_CODE,
    GRANT_CLIENT_CREDENTIALS,
    GRANT_TYPES,
    HOOK_NAME,
    MICROSOFT_LOGIN_HOSTS,
    RESERVED_SCOPES,
    TRANSPORT_SMTP,
    TRANSPORTS,
    CloudPreset,
    default_scopes,
    graph_scopes,
)
from airflow_provider_o365mail.exceptions import ConnectionConfigError
from airflow_provider_o365mail.tls import HttpProxy, parse_proxy

__all__ = [
    "CLOUDS",
    "CONN_TYPE",
    "DEFAULT_CONN_ID",
    "GRANT_AUTHORIZATION_CODE",
    "GRANT_CLIENT_CREDENTIALS",
    "GRANT_TYPES",
    "HOOK_NAME",
    "CloudPreset",
    "O365MailSettings",
    "default_scopes",
    "normalise_authority",
    "parse_scopes",
    "settings_from_connection",
    "settings_from_fields",
]

if TYPE_CHECKING:
    from airflow.sdk import Connection


@dataclass(frozen=True)
class O365MailSettings:
    """Typed view of one ``o365mail`` connection. Secrets are left out of ``repr``."""

    conn_id: str
    client_id: str
    client_secret: str = field(repr=False)
    tenant_id: str
    authority: str
    grant_type: str
    mailbox: str
    refresh_token: str | None = field(repr=False)
    scopes: tuple[str, ...]
    imap_host: str
    imap_port: int
    smtp_host: str
    smtp_port: int
    cloud: str = DEFAULT_CLOUD
    ca_bundle: str | None = None
    timeout: float = float(DEFAULT_TIMEOUT_SECONDS)
    #: The client secret's expiry date as recorded in the connection (``doctor`` warns ahead of it).
    credential_expires_on: dt.date | None = None
    #: ``client_secret``, ``certificate``, ``federated`` or ``public_client`` (:data:`CREDENTIAL_TYPES`).
    credential_type: str = CREDENTIAL_SECRET
    #: Certificate credential: PEM values inline, or paths to PEM files (read on every token request).
    certificate_key: str | None = field(default=None, repr=False)
    certificate_key_path: str | None = None
    certificate: str | None = field(default=None, repr=False)
    certificate_path: str | None = None
    certificate_passphrase: str | None = field(default=None, repr=False)
    #: Send the SHA-1 thumbprint (``x5t``, RS256) instead of ``x5t#S256`` (PS256), for authorities that need it.
    certificate_sha1: bool = False
    #: Workload identity federation: the file holding the federated token (read on every token request).
    federated_assertion_file: str | None = None

    #: ``http://[user:password@]host:port``: token requests, IMAP and SMTP go through this CONNECT
    #: proxy. Without it token requests follow ``HTTPS_PROXY``/``NO_PROXY`` and mail goes direct.
    proxy: str | None = field(default=None, repr=False)
    #: ``smtp``, ``graph`` or ``auto`` (:data:`TRANSPORTS`): how this connection sends mail.
    transport: str = DEFAULT_TRANSPORT
    #: Where Graph requests go (default: the cloud's Graph; the sandbox sets its stand-in).
    graph_url: str = "https://graph.microsoft.com"
    #: Delegated Graph permissions (consent and Graph token requests); app-only uses ``.default``.
    graph_permissions: tuple[str, ...] = DEFAULT_GRAPH_PERMISSIONS

    @property
    def graph_scopes(self) -> tuple[str, ...]:
        """The scopes of a Graph token request (one resource: never mixed with Exchange's). The resource is
        the cloud's Graph, whatever :attr:`graph_url` the requests go to (a proxy, the sandbox)."""
        return graph_scopes(CLOUDS[self.cloud].graph_url, self.grant_type, self.graph_permissions)

    @property
    def uses_graph(self) -> bool:
        return self.transport != TRANSPORT_SMTP

    @property
    def consent_scopes(self) -> tuple[str, ...]:
        """What the consent asks for: Exchange's scopes, and Graph's when the connection may send through
        Graph (``/authorize`` may span resources; the code is redeemed for :attr:`scopes` only)."""
        if not (self.delegated and self.uses_graph):
            return self.scopes
        return tuple(dict.fromkeys((*self.scopes, *self.graph_scopes)))

    @property
    def http_proxy(self) -> HttpProxy | None:
        """The connection's proxy, parsed (validated when the settings were built)."""
        return parse_proxy(self.proxy, where=f"connection {self.conn_id!r}: proxy") if self.proxy else None

    @property
    def is_microsoft_authority(self) -> bool:
        return (urlsplit(self.authority).hostname or "") in MICROSOFT_LOGIN_HOSTS

    @property
    def delegated(self) -> bool:
        return self.grant_type == GRANT_AUTHORIZATION_CODE

    @property
    def public_client(self) -> bool:
        """No credential: MSAL's public client (device code consent, refreshes without a secret)."""
        return self.credential_type == CREDENTIAL_PUBLIC


def normalise_authority(value: str) -> tuple[str, str]:
    """Return ``(authority, tenant)`` from an authority URL or a V2 endpoint URL.

    Accepts ``https://host/<tenant>``, ``https://host/<tenant>/v2.0`` and the V2 endpoints
    ``https://host/<tenant>/oauth2/v2.0/authorize|token`` copied from the app's Endpoints page.
    """
    parts = urlsplit(value.strip())
    if parts.scheme != "https" or not parts.netloc:
        raise ConnectionConfigError(
            f"authority {value!r} is not an https URL. Paste the OAuth 2.0 token endpoint (v2) from the "
            "app registration's Endpoints page, e.g. https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token."
        )
    segments = [s for s in parts.path.split("/") if s]
    if not segments:
        raise ConnectionConfigError(
            f"authority {value!r} names no tenant: use https://{parts.netloc}/<tenant ID or domain>."
        )
    tenant, rest = segments[0], [s.lower() for s in segments[1:]]
    if rest in ([], ["v2.0"], ["oauth2", "v2.0", "authorize"], ["oauth2", "v2.0", "token"]):
        return f"https://{parts.netloc}/{tenant}", tenant
    if rest in (["oauth2", "authorize"], ["oauth2", "token"]):
        raise ConnectionConfigError(
            f"{value!r} is a V1 endpoint. Copy the V2 endpoints from the app registration's Endpoints page "
            f"(https://{parts.netloc}/{tenant}/oauth2/v2.0/authorize or .../oauth2/v2.0/token)."
        )
    raise ConnectionConfigError(
        f"authority {value!r} is not an authority or a V2 authorize/token endpoint: expected "
        f"https://{parts.netloc}/{tenant} or https://{parts.netloc}/{tenant}/oauth2/v2.0/token."
    )


def _text(extra: dict[str, Any], key: str) -> str | None:
    value = extra.get(key)
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def _integer(extra: dict[str, Any], key: str, default: int) -> int:
    value = _text(extra, key)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConnectionConfigError(f"extra {key!r} must be a whole number, got {value!r}") from None


def _number(extra: dict[str, Any], key: str, default: float) -> float:
    value = _text(extra, key)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise ConnectionConfigError(f"extra {key!r} must be a number of seconds, got {value!r}") from None


def _date(extra: dict[str, Any], key: str) -> dt.date | None:
    value = _text(extra, key)
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value[:10])
    except ValueError:
        raise ConnectionConfigError(f"extra {key!r} must be a date (YYYY-MM-DD), got {value!r}") from None


def _flag(extra: dict[str, Any], key: str) -> bool:
    value = _text(extra, key)
    if value is None:
        return False
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConnectionConfigError(f"extra {key!r} must be true or false, got {value!r}")


def _credential_type(extra: dict[str, Any], secret: str, env: Mapping[str, str], where: str) -> str:
    """The explicit ``credential_type``, or the one the fields imply (secret before the environment)."""
    explicit = _text(extra, "credential_type")
    if explicit:
        value = explicit.lower()
        if value not in CREDENTIAL_TYPES:
            raise ConnectionConfigError(
                f"{where}: credential_type must be one of {', '.join(CREDENTIAL_TYPES)}, got {explicit!r}."
            )
        return value
    if any(
        _text(extra, k) for k in ("certificate", "certificate_path", "certificate_private_key", "certificate_key_path")
    ):
        return CREDENTIAL_CERTIFICATE
    if _text(extra, "federated_assertion_file"):
        return CREDENTIAL_FEDERATED
    if secret:
        return CREDENTIAL_SECRET
    if env.get(ENV_FEDERATED_TOKEN_FILE):
        return CREDENTIAL_FEDERATED
    return CREDENTIAL_SECRET


def parse_scopes(value: str | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else str(value).replace(",", " ").split()
    return tuple(s for s in (str(i).strip() for i in items) if s and s.lower() not in RESERVED_SCOPES)


def settings_from_fields(
    conn_id: str,
    login: str | None,
    password: str | None,
    extra: dict[str, Any],
    environ: Mapping[str, str] | None = None,
) -> O365MailSettings:
    """Validate connection fields; every error names the field and the fix.

    A federated connection may take its Client ID, tenant and token file from the variables AKS
    workload identity sets (``AZURE_CLIENT_ID``, ``AZURE_TENANT_ID``, ``AZURE_FEDERATED_TOKEN_FILE``;
    read from ``environ``, default ``os.environ``); the connection's own fields win.
    """
    where = f"connection {conn_id!r}"
    env = os.environ if environ is None else environ
    client_secret = password or _text(extra, "client_secret") or ""
    credential_type = _credential_type(extra, client_secret, env, where)
    federated = credential_type == CREDENTIAL_FEDERATED
    client_id = (login or _text(extra, "client_id") or (env.get(ENV_CLIENT_ID, "") if federated else "")).strip()
    if not client_id:
        raise ConnectionConfigError(
            f"{where}: Client ID (login) is empty. Copy the Application (client) ID from Entra ID"
            + (f" (or set {ENV_CLIENT_ID})." if federated else ".")
        )
    federated_assertion_file = _text(extra, "federated_assertion_file") or (env.get(ENV_FEDERATED_TOKEN_FILE) or None)
    if credential_type == CREDENTIAL_SECRET and not client_secret:
        raise ConnectionConfigError(
            f"{where}: Client secret (password) is empty. Create one in the app's Certificates & secrets and paste "
            "its Value, or use a certificate (certificate_path / certificate) or a federated token "
            "(federated_assertion_file) instead; or set credential_type public_client for an app that allows public "
            "client flows (consent with airflow o365mail authorize --device-code)."
        )
    if credential_type == CREDENTIAL_CERTIFICATE:
        if not (_text(extra, "certificate") or _text(extra, "certificate_path")):
            raise ConnectionConfigError(
                f"{where}: the certificate credential needs the certificate (PEM): set certificate_path to its file "
                "or certificate to its PEM text. The private key may sit in the same PEM or in "
                "certificate_key_path / certificate_private_key."
            )
        if client_secret:
            raise ConnectionConfigError(
                f"{where}: credential_type is certificate but the connection also has a client secret (password). "
                "Remove one: a connection uses one credential."
            )
    if credential_type == CREDENTIAL_PUBLIC and client_secret:
        raise ConnectionConfigError(
            f"{where}: credential_type is public_client but the connection also has a client secret (password). "
            "Remove the secret (a public client sends none; Entra refuses one with AADSTS700025), or use "
            "credential_type client_secret."
        )
    if federated:
        if not federated_assertion_file:
            raise ConnectionConfigError(
                f"{where}: the federated credential needs the token file: set federated_assertion_file, or run where "
                f"{ENV_FEDERATED_TOKEN_FILE} is set (AKS workload identity)."
            )
        if client_secret:
            raise ConnectionConfigError(
                f"{where}: credential_type is federated but the connection also has a client secret (password). "
                "Remove the secret: a federated connection stores none."
            )
    cloud = (_text(extra, "cloud") or DEFAULT_CLOUD).lower()
    if cloud not in CLOUDS:
        raise ConnectionConfigError(f"{where}: cloud must be one of {', '.join(CLOUDS)}, got {cloud!r}.")
    grant_type = (_text(extra, "grant_type") or GRANT_AUTHORIZATION_CODE).lower()
    if grant_type not in GRANT_TYPES:
        raise ConnectionConfigError(f"{where}: grant_type must be one of {', '.join(GRANT_TYPES)}, got {grant_type!r}.")
    tenant_id = _text(extra, "tenant_id") or (env.get(ENV_TENANT_ID) or None if federated else None)
    authority_value = _text(extra, "authority")
    if authority_value:
        authority, tenant_in_url = normalise_authority(authority_value)
        if tenant_id and tenant_id.lower() != tenant_in_url.lower():
            raise ConnectionConfigError(
                f"{where}: tenant_id {tenant_id!r} differs from the tenant in the authority URL "
                f"({tenant_in_url!r}). Use the same Directory (tenant) ID in both, or leave tenant_id empty."
            )
        tenant_id = tenant_in_url
    elif tenant_id:
        authority = f"https://{CLOUDS[cloud].login_host}/{tenant_id}"
    else:
        raise ConnectionConfigError(
            f"{where}: set tenant_id (Directory (tenant) ID) or authority (the V2 token endpoint URL)."
        )
    if grant_type == GRANT_CLIENT_CREDENTIALS and credential_type == CREDENTIAL_PUBLIC:
        raise ConnectionConfigError(
            f"{where}: client credentials (app-only) need a confidential client: a client secret, a certificate or "
            "a federated token. A public client can only act for a signed-in user (grant_type authorization_code)."
        )
    if grant_type == GRANT_CLIENT_CREDENTIALS and tenant_id.lower() in ("common", "organizations", "consumers"):
        raise ConnectionConfigError(
            f"{where}: client credentials need a tenant-specific authority, not {tenant_id!r}: "
            "use the Directory (tenant) ID."
        )
    mailbox = _text(extra, "mailbox")
    if not mailbox:
        raise ConnectionConfigError(
            f"{where}: mailbox is empty. Set the address to sign in to IMAP/SMTP as (and send from)."
        )
    scopes = parse_scopes(extra.get("scopes")) or default_scopes(cloud, grant_type)
    if grant_type == GRANT_CLIENT_CREDENTIALS and not all(s.endswith("/.default") for s in scopes):
        raise ConnectionConfigError(
            f"{where}: client credentials need a '/.default' scope, e.g. {default_scopes(cloud, grant_type)[0]}."
        )
    preset = CLOUDS[cloud]
    transport = (_text(extra, "transport") or DEFAULT_TRANSPORT).lower()
    if transport not in TRANSPORTS:
        raise ConnectionConfigError(f"{where}: transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}.")
    graph_url = (_text(extra, "graph_url") or preset.graph_url).rstrip("/")
    if not graph_url.startswith("https://"):
        raise ConnectionConfigError(f"{where}: graph_url must be an https:// URL (Graph's root), got {graph_url!r}.")
    graph_permissions = parse_scopes(extra.get("graph_permissions")) or DEFAULT_GRAPH_PERMISSIONS
    if any(p.endswith("/.default") for p in graph_permissions):
        raise ConnectionConfigError(
            f"{where}: graph_permissions lists delegated permissions (e.g. Mail.Send Mail.ReadWrite); app-only "
            "connections use .default without setting it."
        )
    proxy = _text(extra, "proxy")
    if proxy:
        parse_proxy(proxy, where=f"{where}: proxy")
    return O365MailSettings(
        conn_id=conn_id,
        client_id=client_id,
        client_secret=client_secret,
        tenant_id=tenant_id,
        authority=authority,
        grant_type=grant_type,
        mailbox=mailbox,
        refresh_token=_text(extra, "refresh_token"),
        scopes=scopes,
        imap_host=_text(extra, "imap_host") or preset.imap_host,
        imap_port=_integer(extra, "imap_port", DEFAULT_IMAP_PORT),
        smtp_host=_text(extra, "smtp_host") or preset.smtp_host,
        smtp_port=_integer(extra, "smtp_port", DEFAULT_SMTP_PORT),
        cloud=cloud,
        ca_bundle=_text(extra, "ca_bundle"),
        timeout=_number(extra, "timeout", float(DEFAULT_TIMEOUT_SECONDS)),
        credential_expires_on=_date(extra, "credential_expires_on"),
        credential_type=credential_type,
        certificate_key=_text(extra, "certificate_private_key"),
        certificate_key_path=_text(extra, "certificate_key_path"),
        certificate=_text(extra, "certificate"),
        certificate_path=_text(extra, "certificate_path"),
        certificate_passphrase=_text(extra, "certificate_passphrase"),
        certificate_sha1=_flag(extra, "certificate_sha1"),
        federated_assertion_file=federated_assertion_file if federated else None,
        proxy=proxy,
        transport=transport,
        graph_url=graph_url,
        graph_permissions=graph_permissions,
    )


def settings_from_connection(conn: Connection) -> O365MailSettings:
    extra = conn.extra_dejson if isinstance(conn.extra_dejson, dict) else json.loads(conn.extra or "{}")
    return settings_from_fields(conn.conn_id, conn.login, conn.password, extra)
