"""Facts about the ``o365mail`` connection that several places state: names, defaults, clouds (no imports).

:mod:`.connection` validates connections with them and :mod:`.get_provider_info` builds the
connection form from them, so the form and the code cannot disagree. Airflow imports
``get_provider_info`` while it is itself being imported, so this module must import nothing of ours.
"""

from __future__ import annotations

from dataclasses import dataclass

CONN_TYPE = "o365mail"
DEFAULT_CONN_ID = "o365mail_default"
HOOK_NAME = "Microsoft 365 Mail (OAuth2)"
GRANT_AUTHORIZATION_CODE = "authorization_code"
GRANT_CLIENT_CREDENTIALS = "client_credentials"
GRANT_TYPES = (GRANT_AUTHORIZATION_CODE, GRANT_CLIENT_CREDENTIALS)
#: How the app proves its identity to the token endpoint.
CREDENTIAL_SECRET = "client_secret"
CREDENTIAL_CERTIFICATE = "certificate"
CREDENTIAL_FEDERATED = "federated"
#: No credential at all: a public client ("Allow public client flows" in Entra), delegated only;
#: consent with the device code flow (``airflow o365mail authorize --device-code``).
CREDENTIAL_PUBLIC = "public_client"
CREDENTIAL_TYPES = (CREDENTIAL_SECRET, CREDENTIAL_CERTIFICATE, CREDENTIAL_FEDERATED, CREDENTIAL_PUBLIC)
#: Workload identity federation: the variables AKS workload identity injects into a pod.
ENV_CLIENT_ID = "AZURE_CLIENT_ID"
ENV_TENANT_ID = "AZURE_TENANT_ID"
ENV_FEDERATED_TOKEN_FILE = "AZURE_FEDERATED_TOKEN_FILE"
#: The audience Entra ID expects in a federated token (the federated credential's default).
FEDERATED_TOKEN_AUDIENCE = "api://AzureADTokenExchange"
DEFAULT_CLOUD = "global"
DEFAULT_IMAP_PORT = 993
DEFAULT_SMTP_PORT = 587
DEFAULT_TIMEOUT_SECONDS = 30
#: MSAL adds these itself and raises ValueError when they are passed in.
RESERVED_SCOPES = frozenset({"openid", "profile", "offline_access"})
#: How mail is sent: SMTP AUTH (XOAUTH2), Microsoft Graph, or SMTP with Graph when SMTP AUTH is disabled.
TRANSPORT_SMTP = "smtp"
TRANSPORT_GRAPH = "graph"
TRANSPORT_AUTO = "auto"
TRANSPORTS = (TRANSPORT_SMTP, TRANSPORT_GRAPH, TRANSPORT_AUTO)
DEFAULT_TRANSPORT = TRANSPORT_SMTP
#: Delegated Graph permissions asked at consent when a connection sends through Graph: Mail.Send for
#: sendMail, Mail.ReadWrite for drafts with upload sessions (mail over Graph's 4 MB request limit)
#: and for the Sent Items lookup after an ambiguous outcome.
DEFAULT_GRAPH_PERMISSIONS = ("Mail.Send", "Mail.ReadWrite")


@dataclass(frozen=True)
class CloudPreset:
    login_host: str
    imap_host: str
    smtp_host: str
    resource: str
    app_only_resource: str
    #: Microsoft Graph's root for this cloud (national clouds have their own).
    graph_url: str = "https://graph.microsoft.com"


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
        "https://graph.microsoft.us",
    ),
    "china": CloudPreset(
        "login.partner.microsoftonline.cn",
        "partner.outlook.cn",
        "partner.outlook.cn",
        "https://partner.outlook.cn",
        "https://partner.outlook.cn",
        "https://microsoftgraph.chinacloudapi.cn",
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


def graph_scopes(
    graph_resource: str, grant_type: str, permissions: tuple[str, ...] = DEFAULT_GRAPH_PERMISSIONS
) -> tuple[str, ...]:
    """Fully qualified Graph scopes (one resource per token request; never mixed with Exchange's)."""
    root = graph_resource.rstrip("/")
    if grant_type == GRANT_CLIENT_CREDENTIALS:
        return (f"{root}/.default",)
    return tuple(p if "://" in p else f"{root}/{p}" for p in permissions)


# ---------------------------------------------------------------- the connection form
# One declaration for every Airflow: 3.2+ reads it as ``conn-fields`` / ``ui-field-behaviour`` in the
# provider info; on 3.1 the hook's ``get_connection_form_widgets`` / ``get_ui_field_behaviour`` turn it
# into the form fields that version reads. Keys whose names contain ``token`` or ``secret`` are masked
# by Airflow; the others stay readable.
_GLOBAL = CLOUDS[DEFAULT_CLOUD]


def _text(label: str, description: str, default: str | None = None, **schema: object) -> dict:
    spec: dict = {"type": ["string", "null"], **schema}
    if default is not None:
        spec["default"] = default
    return {"label": label, "description": description, "schema": spec}


def _integer(label: str, description: str, default: int) -> dict:
    return {"label": label, "description": description, "schema": {"type": ["integer", "null"], "default": default}}


CONN_FIELDS = {
    "tenant_id": _text("Tenant ID", "Directory (tenant) ID from the app registration's Overview page."),
    "authority": _text(
        "Authority or V2 endpoint URL",
        "Optional. The OAuth 2.0 token (v2) or authorization (v2) endpoint from the Endpoints page, or "
        "https://<login host>/<tenant>. Empty: derived from Cloud and Tenant ID. V1 endpoints are refused.",
        format="url",
    ),
    "grant_type": _text(
        "Grant type",
        f"{GRANT_AUTHORIZATION_CODE}: a user consents once (delegated). {GRANT_CLIENT_CREDENTIALS}: app-only.",
        default=GRANT_AUTHORIZATION_CODE,
        enum=list(GRANT_TYPES),
    ),
    "mailbox": _text("Mailbox", "Address to sign in to IMAP/SMTP as, and default sender.", format="email"),
    "refresh_token": _text(
        "Refresh token",
        "Filled in by the Authorize flow (UI or 'airflow o365mail authorize'). The newest one lives in the "
        "encrypted token store.",
        format="password",
    ),
    "scopes": _text(
        "Scopes",
        f"Space-separated. Default: {' '.join(default_scopes(DEFAULT_CLOUD, GRANT_AUTHORIZATION_CODE))} "
        f"(app-only: {' '.join(default_scopes(DEFAULT_CLOUD, GRANT_CLIENT_CREDENTIALS))}).",
    ),
    "transport": _text(
        "Send through",
        f"{TRANSPORT_SMTP}: SMTP AUTH (XOAUTH2), and sensors read over IMAP. {TRANSPORT_GRAPH}: Microsoft Graph for "
        f"sending and reading (for tenants with SMTP AUTH or IMAP off; mail up to 150 MB). {TRANSPORT_AUTO}: SMTP "
        "and IMAP, and Graph when Exchange answers that SMTP AUTH is disabled (535 5.7.139) or refuses the IMAP "
        "login. A sensor's own transport= wins. Graph needs its own consent: Authorize again after changing this.",
        default=DEFAULT_TRANSPORT,
        enum=list(TRANSPORTS),
    ),
    "graph_permissions": _text(
        "Graph permissions",
        f"Delegated Graph permissions asked at consent and in Graph token requests. Default: "
        f"{' '.join(DEFAULT_GRAPH_PERMISSIONS)} (Mail.ReadWrite: large mail and the Sent Items check). Add "
        "Mail.Send.Shared to send from a shared mailbox. App-only uses .default.",
    ),
    "graph_url": _text("Graph URL", f"Default: {_GLOBAL.graph_url} (per cloud).", format="url"),
    "imap_host": _text("IMAP host", f"Default: {_GLOBAL.imap_host} (per cloud)."),
    "imap_port": _integer("IMAP port", "Implicit TLS.", DEFAULT_IMAP_PORT),
    "smtp_host": _text("SMTP host", f"Default: {_GLOBAL.smtp_host} (per cloud)."),
    "smtp_port": _integer("SMTP port", "STARTTLS submission.", DEFAULT_SMTP_PORT),
    "cloud": _text(
        "Cloud",
        f"{', '.join(CLOUDS)} (usgov: GCC High): sets login, IMAP and SMTP hosts and scopes.",
        default=DEFAULT_CLOUD,
        enum=list(CLOUDS),
    ),
    "ca_bundle": _text(
        "Extra CA bundle", "Path to extra trusted CA certificates (PEM), e.g. for a TLS-inspecting proxy."
    ),
    "proxy": _text(
        "HTTPS proxy",
        "Optional. http://[user:password@]host:port of a CONNECT proxy for token requests, IMAP and SMTP "
        "(TLS stays end to end). Empty: token requests follow HTTPS_PROXY/NO_PROXY, mail goes direct.",
    ),
    "timeout": _integer(
        "Timeout (s)", "Network timeout for the identity provider, IMAP and SMTP.", DEFAULT_TIMEOUT_SECONDS
    ),
    "credential_type": _text(
        "Credential",
        f"{CREDENTIAL_SECRET}: the Client secret field. {CREDENTIAL_CERTIFICATE}: a certificate uploaded to the app "
        f"registration. {CREDENTIAL_FEDERATED}: a federated token file (workload identity, no stored secret). "
        f"{CREDENTIAL_PUBLIC}: none (public client flows allowed on the app; consent with the device code). "
        "Empty: implied by the fields that are set.",
        enum=list(CREDENTIAL_TYPES),
    ),
    "certificate_path": _text(
        "Certificate file",
        "Certificate credential: path to the PEM certificate (may also hold the private key and the chain).",
    ),
    "certificate": _text(
        "Certificate (PEM)",
        "Certificate credential: the PEM text instead of a file (e.g. from a secrets backend).",
        format="multiline",
    ),
    "certificate_key_path": _text("Private key file", "Certificate credential: path to the PEM private key."),
    "certificate_private_key": _text(
        "Private key (PEM)", "Certificate credential: the PEM private key text instead of a file.", format="password"
    ),
    "certificate_passphrase": _text("Private key passphrase", "Only for an encrypted private key.", format="password"),
    "certificate_sha1": {
        "label": "Send SHA-1 thumbprint",
        "description": "Sign with RS256 and the SHA-1 thumbprint (x5t) instead of PS256 and x5t#S256 (default off).",
        "schema": {"type": ["boolean", "null"], "default": False},
    },
    "federated_assertion_file": _text(
        "Federated token file",
        f"Federated credential: the file holding the federated token (audience {FEDERATED_TOKEN_AUDIENCE}), read on "
        f"every token request. Empty: {ENV_FEDERATED_TOKEN_FILE} (AKS workload identity).",
    ),
    "credential_expires_on": _text(
        "Client secret expires on",
        "Optional. The secret's expiry date from Entra ID (YYYY-MM-DD): 'airflow o365mail doctor' warns 30 days ahead.",
        format="date",
    ),
}

UI_FIELD_BEHAVIOUR = {
    "hidden-fields": ["host", "schema", "port"],
    "relabeling": {"login": "Client ID", "password": "Client secret"},
    "placeholders": {
        "login": "Application (client) ID",
        "password": "Client secret Value (not its ID)",
        "tenant_id": "00000000-0000-0000-0000-000000000000",
        "mailbox": "reports@contoso.com",
    },
}
