"""``airflow o365mail ...``: declared here (cheap to import), implemented in :mod:`.commands`."""

from __future__ import annotations

from airflow.cli.cli_config import ActionCommand, Arg, GroupCommand, lazy_load_command

ARG_CONN_ID = Arg(("--conn-id",), help="The o365mail connection id", default="o365mail_default")
ARG_PASTE = Arg(
    ("--paste",),
    help="Headless terminals: print the sign-in link, then paste the URL the browser was redirected to",
    action="store_true",
)
ARG_PORT = Arg(("--port",), help="Port of the local callback listener (default: a free port)", type=int, default=0)
ARG_NO_BROWSER = Arg(("--no-browser",), help="Do not try to open a browser; print the link", action="store_true")
ARG_REDIRECT_URI = Arg(
    ("--redirect-uri",),
    help="Redirect URI registered for the app (default http://localhost/o365mail/callback; the port of a "
    "localhost URI is ignored by Entra ID)",
    default=None,
)
ARG_TIMEOUT = Arg(("--timeout",), help="Seconds to wait for the sign-in", type=float, default=300.0)
ARG_OUTPUT = Arg(("-o", "--output"), help="Output format", choices=("text", "json"), default="text")

O365MAIL_COMMANDS = (
    ActionCommand(
        name="authorize",
        help="Sign in and consent for a connection; stores the refresh token and seeds the token store",
        func=lazy_load_command("airflow_provider_o365mail.cli.commands.authorize"),
        args=(ARG_CONN_ID, ARG_PASTE, ARG_PORT, ARG_NO_BROWSER, ARG_REDIRECT_URI, ARG_TIMEOUT),
    ),
    ActionCommand(
        name="doctor",
        help="Check every link of a connection (endpoints, tenant, secret, consent, token store, IMAP, SMTP)",
        func=lazy_load_command("airflow_provider_o365mail.cli.commands.doctor"),
        args=(ARG_CONN_ID, ARG_OUTPUT),
    ),
    ActionCommand(
        name="token-status",
        help="Who is signed in, scopes, access-token expiry and refresh-token age (no secrets shown)",
        func=lazy_load_command("airflow_provider_o365mail.cli.commands.token_status"),
        args=(ARG_CONN_ID, ARG_OUTPUT),
    ),
    ActionCommand(
        name="forget",
        help="Drop the cached tokens of a connection (its refresh token field is kept)",
        func=lazy_load_command("airflow_provider_o365mail.cli.commands.forget"),
        args=(ARG_CONN_ID,),
    ),
)


def get_o365mail_cli_commands() -> list[GroupCommand]:
    return [
        GroupCommand(
            name="o365mail",
            help="Microsoft 365 mail (airflow-provider-o365mail): consent, diagnostics, token store",
            subcommands=O365MAIL_COMMANDS,
        )
    ]
