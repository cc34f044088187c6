"""The ``o365mail`` connection: fields, defaults, cloud presets and validation (no I/O).

One place turns an Airflow Connection into typed settings; the hook, triggers, CLI and plugin
all read connections through :func:`settings_from_connection`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from airflow_provider_o365mail.exceptions import ConnectionConfigError

if TYPE_CHECKING:
    from airflow.sdk import Connection

CONN_TYPE = "o365mail"
DEFAULT_CONN_ID = "o365mail_default"
GRANT_AUTHORIZATION_CODE = "authorization_code"
GRANT_CLIENT_CREDENTIALS = "client_credentials"
GRANT_TYPES = (GRANT_AUTHORIZATION_CODE, GRANT_CLIENT_CREDENTIALS)
#: MSAL adds these itself and raises ValueError when they are passed in.
RESERVED_SCOPES = frozenset({"openid", "profile", "offline_access"})


@dataclass(frozen=True)
class CloudPreset:
    login_host: str
    imap_host: str
    smtp_host: str
    resource: str
    app_only_resource: str


CLOUDS: dict[str, CloudPreset] = {
    "global": CloudPreset(
        "login.microsoftonline.com",
        "outlook.office365.com",
        "smtp.office365.com",
        "https://outlook.office.com",
        "https://outlook.office365.com",
    ),
    "usgov": CloudPreset(
        "login.microsoftonline.us",
        "outlook.office365.us",
        "smtp.office365.us",
        "https://outlook.office365.us",
        "https://outlook.office365.us",
    ),
    "china": CloudPreset(
        "login.partner.microsoftonline.cn",
        "partner.outlook.cn",
        "partner.outlook.cn",
        "https://partner.outlook.cn",
        "https://partner.outlook.cn",
    ),
}
MICROSOFT_LOGIN_HOSTS = frozenset(
    {p.login_host for p in CLOUDS.values()} | {"login.windows.net", "login.microsoft.com", "sts.windows.net"}
)


def default_scopes(cloud: str, grant_type: str) -> tuple[str, ...]:
    preset = CLOUDS[cloud]
    if grant_type == GRANT_CLIENT_CREDENTIALS:
        return (f"{preset.app_only_resource}/.default",)
    return (f"{preset.resource}/IMAP.AccessAsUser.All", f"{preset.resource}/SMTP.Send")


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
    cloud: str = "global"
    ca_bundle: str | None = None
    timeout: float = 30.0

    @property
    def is_microsoft_authority(self) -> bool:
        return (urlsplit(self.authority).hostname or "") in MICROSOFT_LOGIN_HOSTS

    @property
    def delegated(self) -> bool:
        return self.grant_type == GRANT_AUTHORIZATION_CODE


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


def parse_scopes(value: str | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else str(value).replace(",", " ").split()
    return tuple(s for s in (str(i).strip() for i in items) if s and s.lower() not in RESERVED_SCOPES)


def settings_from_fields(
    conn_id: str, login: str | None, password: str | None, extra: dict[str, Any]
) -> O365MailSettings:
    """Validate connection fields; every error names the field and the fix."""
    where = f"connection {conn_id!r}"
    client_id = (login or _text(extra, "client_id") or "").strip()
    if not client_id:
        raise ConnectionConfigError(
            f"{where}: Client ID (login) is empty. Copy the Application (client) ID from Entra ID."
        )
    client_secret = password or _text(extra, "client_secret") or ""
    if not client_secret:
        raise ConnectionConfigError(
            f"{where}: Client secret (password) is empty. Create one in the app's Certificates & secrets and paste its Value."
        )
    cloud = (_text(extra, "cloud") or "global").lower()
    if cloud not in CLOUDS:
        raise ConnectionConfigError(f"{where}: cloud must be one of {', '.join(CLOUDS)}, got {cloud!r}.")
    grant_type = (_text(extra, "grant_type") or GRANT_AUTHORIZATION_CODE).lower()
    if grant_type not in GRANT_TYPES:
        raise ConnectionConfigError(f"{where}: grant_type must be one of {', '.join(GRANT_TYPES)}, got {grant_type!r}.")
    tenant_id = _text(extra, "tenant_id")
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
        imap_port=_integer(extra, "imap_port", 993),
        smtp_host=_text(extra, "smtp_host") or preset.smtp_host,
        smtp_port=_integer(extra, "smtp_port", 587),
        cloud=cloud,
        ca_bundle=_text(extra, "ca_bundle"),
        timeout=_number(extra, "timeout", 30.0),
    )


def settings_from_connection(conn: Connection) -> O365MailSettings:
    extra = conn.extra_dejson if isinstance(conn.extra_dejson, dict) else json.loads(conn.extra or "{}")
    return settings_from_fields(conn.conn_id, conn.login, conn.password, extra)


def load_connection(conn_id: str) -> Connection:
    """The connection from wherever Airflow keeps it, in every process.

    Inside a task or the triggerer the Task SDK asks the supervisor (the ORM is blocked there).
    Elsewhere (CLI, api-server plugin, plain Python) the SDK would only see environment variables
    and secrets backends, so the core model is used: it also reads the metadata DB.
    """
    from airflow_provider_o365mail.auth.store import _in_task_runtime

    if _in_task_runtime():
        from airflow.sdk import BaseHook

        return BaseHook.get_connection(conn_id)
    try:
        from airflow.models.connection import Connection as CoreConnection
    except ImportError:  # a worker image without airflow-core
        from airflow.sdk import BaseHook

        return BaseHook.get_connection(conn_id)
    return CoreConnection.get_connection_from_secrets(conn_id)
