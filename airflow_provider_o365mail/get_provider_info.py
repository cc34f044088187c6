"""Provider metadata read by Airflow through the ``apache_airflow_provider`` entry point.

Airflow >= 3.2 builds the connection form from ``conn-fields`` / ``ui-field-behaviour`` here; Airflow
3.1 calls the hook's ``get_connection_form_widgets`` / ``get_ui_field_behaviour`` instead, which build
the same fields from the same declaration (``connection_defaults.CONN_FIELDS``).
"""

from __future__ import annotations

from airflow_provider_o365mail import __version__
from airflow_provider_o365mail.connection_defaults import CONN_FIELDS, CONN_TYPE, HOOK_NAME, UI_FIELD_BEHAVIOUR

#: Also pyproject's Project-URL "Documentation", which Airflow >= 3.3 reads instead of this key;
#: older versions read only this one (the providers REST API and ``airflow providers get``).
DOCUMENTATION_URL = "https://o365mail.github.io/airflow-provider-o365mail/"


def get_provider_info() -> dict:
    return {
        "package-name": "airflow-provider-o365mail",
        "name": HOOK_NAME,
        "description": "Send and receive Microsoft 365 (Exchange Online) mail over SMTP and IMAP with OAuth2 (XOAUTH2).",
        "versions": [__version__],
        "documentation-url": DOCUMENTATION_URL,
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
                    "airflow_provider_o365mail.operators.send_mail",
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
        # MessageQueueTrigger(scheme="o365mail") with apache-airflow-providers-common-messaging installed (extra
        # common-messaging); without it Airflow skips the entry (its import names the missing provider).
        "queues": ["airflow_provider_o365mail.queues.o365mail.O365MailMessageQueueProvider"],
        "notifications": ["airflow_provider_o365mail.notifications.email.O365EmailNotifier"],
        "email-backends": ["airflow_provider_o365mail.utils.email.send_email"],
        "connection-types": [
            {
                "connection-type": CONN_TYPE,
                "hook-class-name": "airflow_provider_o365mail.hooks.o365mail.O365MailHook",
                "hook-name": HOOK_NAME,
                "conn-fields": CONN_FIELDS,
                "ui-field-behaviour": UI_FIELD_BEHAVIOUR,
            }
        ],
        "config": {
            "o365mail": {
                "description": "airflow-provider-o365mail: token store encryption, the refresh lease, connection budgets and sending limits per mailbox.",
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
                    },
                    "refresh_lease_seconds": {
                        "description": "How long a claim of the cross-host refresh lease is valid; the holder "
                        "renews it every quarter of that while it refreshes. Raised to at least twice the "
                        "connection's timeout plus four settle times. See docs/token-store.md.",
                        "version_added": "0.2.0",
                        "type": "float",
                        "example": "60",
                        "default": "60",
                    },
                    "refresh_lease_settle_seconds": {
                        "description": "Wait after writing a lease claim before reading it back. Must exceed the "
                        "time a Variable write takes to become visible (API server and database latency).",
                        "version_added": "0.2.0",
                        "type": "float",
                        "example": "1",
                        "default": "1",
                    },
                    "max_imap_connections_per_mailbox": {
                        "description": "IMAP connections per mailbox (and connection id) that one process (a "
                        "triggerer, a worker's task) uses for checks, logged in and reused. Each deferrable sensor's "
                        "folder also shares one IDLE connection per process. Exchange Online allows about 20 per "
                        "mailbox in total: triggerers x (this + watched folders) + poking tasks must stay below it.",
                        "version_added": "0.2.0",
                        "type": "integer",
                        "example": "4",
                        "default": "4",
                    },
                    "max_smtp_sessions_per_mailbox": {
                        "description": "Concurrent SMTP sessions per mailbox (and connection id) in one process. "
                        "Exchange Online allows 3 per mailbox across all processes and answers more with 432 4.3.2 "
                        "(retried); across workers use an Airflow pool (docs/sending.md).",
                        "version_added": "0.2.0",
                        "type": "integer",
                        "example": "3",
                        "default": "3",
                    },
                    "daily_recipient_budget": {
                        "description": "Recipients (To + Cc + Bcc of every message) one mailbox may send to through "
                        "this provider per rolling 24 hours. Exchange Online blocks a mailbox for up to a day past "
                        "10,000; a batch that would cross this budget fails before sending anything. 0 turns the "
                        "count off. Counted in a Variable per mailbox, locked across hosts (a host file lock, then a lease "
                        "in a Variable).",
                        "version_added": "0.2.0",
                        "type": "integer",
                        "example": "5000",
                        "default": "9500",
                    },
                    "credential_watch": {
                        "description": "Run the credential watch in the scheduler and the triggerer: refresh tokens "
                        "unused for credential_watch_keepalive_days are redeemed, and credentials that expire within "
                        "credential_warning_days (or were revoked) are reported to credential_notifier, once per "
                        "period across every host. See docs/token-store.md#credential-watch.",
                        "version_added": "0.2.0",
                        "type": "boolean",
                        "example": "False",
                        "default": "True",
                    },
                    "credential_watch_interval_seconds": {
                        "description": "How often the credential watch checks each o365mail connection (once per "
                        "period across all schedulers and triggerers).",
                        "version_added": "0.2.0",
                        "type": "float",
                        "example": "21600",
                        "default": "21600",
                    },
                    "credential_watch_first_check_seconds": {
                        "description": "After a scheduler or triggerer starts, its first check of the credential "
                        "watch waits between half of this and this (spreads the hosts; capped by the interval).",
                        "version_added": "0.2.0",
                        "type": "float",
                        "example": "120",
                        "default": "120",
                    },
                    "credential_watch_keepalive_days": {
                        "description": "The credential watch redeems a stored refresh token unused for this many "
                        "days (Microsoft expires it after 90), which starts a new 90-day window.",
                        "version_added": "0.2.0",
                        "type": "float",
                        "example": "60",
                        "default": "60",
                    },
                    "credential_warning_days": {
                        "description": "Report a client secret (credential_expires_on), certificate or refresh token "
                        "this many days before it expires: the credential notifier, the Microsoft 365 Mail page and "
                        "'airflow o365mail doctor'.",
                        "version_added": "0.2.0",
                        "type": "integer",
                        "example": "14",
                        "default": "14",
                    },
                    "credential_notifier": {
                        "description": "Dotted path of an Airflow notifier class (a BaseNotifier, e.g. "
                        "airflow_provider_o365mail.notifications.email.O365EmailNotifier or a Slack notifier) the "
                        "credential watch calls with each warning, at most once per credential and day. Its context "
                        "has subject, message, conn_id and o365mail_credential. Empty: warnings go to the logs, the "
                        "page and doctor only.",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "airflow_provider_o365mail.notifications.email.O365EmailNotifier",
                        "default": "",
                    },
                    "credential_notifier_kwargs": {
                        "description": "Keyword arguments of credential_notifier, as a JSON object; templated fields "
                        "are rendered with the warning's context.",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": '{"to": "ops@contoso.com", "subject": "{{ subject }}", "html_content": '
                        '"{{ message }}"}',
                        "default": "",
                    },
                },
            }
        },
    }
