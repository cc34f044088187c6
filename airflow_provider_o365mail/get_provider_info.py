"""Provider metadata read by Airflow through the ``apache_airflow_provider`` entry point.

Airflow >= 3.3 builds the connection form only from ``conn-fields`` / ``ui-field-behaviour`` here.
Keys whose names contain ``token`` or ``secret`` are masked by Airflow; the others stay readable.
"""

from __future__ import annotations

from airflow_provider_o365mail import __version__


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
        "authorization_code: a user consents once (delegated). client_credentials: app-only.",
        default="authorization_code",
        enum=["authorization_code", "client_credentials"],
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
        "Space-separated. Default: https://outlook.office.com/IMAP.AccessAsUser.All "
        "https://outlook.office.com/SMTP.Send (app-only: https://outlook.office365.com/.default).",
    ),
    "imap_host": _text("IMAP host", "Default: outlook.office365.com (per cloud)."),
    "imap_port": _integer("IMAP port", "Implicit TLS.", 993),
    "smtp_host": _text("SMTP host", "Default: smtp.office365.com (per cloud)."),
    "smtp_port": _integer("SMTP port", "STARTTLS submission.", 587),
    "cloud": _text(
        "Cloud",
        "global, usgov (GCC High) or china: sets login, IMAP and SMTP hosts and scopes.",
        default="global",
        enum=["global", "usgov", "china"],
    ),
    "ca_bundle": _text(
        "Extra CA bundle", "Path to extra trusted CA certificates (PEM), e.g. for a TLS-inspecting proxy."
    ),
    "timeout": _integer("Timeout (s)", "Network timeout for the identity provider, IMAP and SMTP.", 30),
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


def get_provider_info() -> dict:
    return {
        "package-name": "airflow-provider-o365mail",
        "name": "Microsoft 365 Mail (OAuth2)",
        "description": "Send and receive Microsoft 365 (Exchange Online) mail over SMTP and IMAP with OAuth2 (XOAUTH2).",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "Microsoft 365 Mail",
                "external-doc-url": "https://learn.microsoft.com/exchange/client-developer/legacy-protocols/how-to-authenticate-an-imap-pop-smtp-application-by-using-oauth",
                "tags": ["protocol"],
            }
        ],
        "operators": [
            {
                "integration-name": "Microsoft 365 Mail",
                "python-modules": [
                    "airflow_provider_o365mail.operators.smtp",
                    "airflow_provider_o365mail.operators.imap_attachments",
                ],
            }
        ],
        "sensors": [
            {"integration-name": "Microsoft 365 Mail", "python-modules": ["airflow_provider_o365mail.sensors.imap"]}
        ],
        "triggers": [
            {
                "integration-name": "Microsoft 365 Mail",
                "python-modules": [
                    "airflow_provider_o365mail.triggers.imap",
                    "airflow_provider_o365mail.triggers.imap_events",
                ],
            }
        ],
        "hooks": [
            {"integration-name": "Microsoft 365 Mail", "python-modules": ["airflow_provider_o365mail.hooks.o365mail"]}
        ],
        "plugins": [{"name": "o365mail", "plugin-class": "airflow_provider_o365mail.plugins.o365mail.O365MailPlugin"}],
        "cli": ["airflow_provider_o365mail.cli.definition.get_o365mail_cli_commands"],
        "notifications": ["airflow_provider_o365mail.notifications.email.O365EmailNotifier"],
        "email-backends": ["airflow_provider_o365mail.utils.email.send_email"],
        "connection-types": [
            {
                "connection-type": "o365mail",
                "hook-class-name": "airflow_provider_o365mail.hooks.o365mail.O365MailHook",
                "hook-name": "Microsoft 365 Mail (OAuth2)",
                "conn-fields": CONN_FIELDS,
                "ui-field-behaviour": UI_FIELD_BEHAVIOUR,
            }
        ],
        "config": {
            "o365mail": {
                "description": "airflow-provider-o365mail: token store encryption.",
                "options": {
                    "token_cache_keys": {
                        "description": "Comma-separated Fernet keys for the encrypted token store; the first encrypts, "
                        "all decrypt (rotation). Empty: keys derived from [core] fernet_key. Must be the same on "
                        "every component.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "<Fernet key>",
                        "default": "",
                        "sensitive": True,
                    }
                },
            }
        },
    }
