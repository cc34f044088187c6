"""``airflow o365mail ...``: declared here (cheap to import), implemented in :mod:`.commands`.

Airflow >= 3.2 registers them through the provider info's ``cli`` entry; on Airflow 3.1, which has no
provider CLI commands, ``python -m airflow_provider_o365mail.cli`` (:mod:`.__main__`) runs the same ones.
"""

from __future__ import annotations

from airflow.cli.cli_config import ActionCommand, Arg, GroupCommand, lazy_load_command

ARG_CONN_ID = Arg(("--conn-id",), help="The o365mail connection id", default="o365mail_default")
ARG_PASTE = Arg(
    ("--paste",),
    help="Headless terminals: print the sign-in link, then paste the URL the browser was redirected to",
    action="store_true",
)
ARG_DEVICE_CODE = Arg(
    ("--device-code",),
    help="Public-client connections (no secret): print a code and a URL to sign in with on any device, and wait",
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
ARG_TIMEOUT = Arg(
    ("--timeout",),
    help="Seconds to wait for the sign-in (default 300; with --device-code, until the code expires)",
    type=float,
    default=None,
)
ARG_CONN_IDS = Arg(
    ("conn_ids",),
    help="o365mail connection ids (default: every o365mail connection in the metadata database)",
    nargs="*",
    metavar="conn_id",
)
ARG_OUTPUT = Arg(("-o", "--output"), help="Output format", choices=("text", "json"), default="text")

GROUP_HELP = "Microsoft 365 mail (airflow-provider-o365mail): consent, diagnostics, token store"

O365MAIL_COMMANDS = (
    ActionCommand(
        name="authorize",
        help="Sign in and consent for a connection; stores the refresh token and seeds the token store",
        func=lazy_load_command("airflow_provider_o365mail.cli.commands.authorize"),
        args=(ARG_CONN_ID, ARG_PASTE, ARG_DEVICE_CODE, ARG_PORT, ARG_NO_BROWSER, ARG_REDIRECT_URI, ARG_TIMEOUT),
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
        name="refresh",
        help="Keep-alive: redeem each connection's refresh token now and store the rotated one (an unused refresh "
        "token expires after 90 days); schedule it for rarely used connections",
        func=lazy_load_command("airflow_provider_o365mail.cli.commands.refresh"),
        args=(ARG_CONN_IDS, ARG_OUTPUT),
    ),
    ActionCommand(
        name="forget",
        help="Drop the cached tokens of a connection (its refresh token field is kept)",
        func=lazy_load_command("airflow_provider_o365mail.cli.commands.forget"),
        args=(ARG_CONN_ID,),
    ),
    ActionCommand(
        name="rotate-keys",
        help="Re-encrypt every token store under its data key (stores written before 0.2) or the newest "
        "[o365mail] token_cache_keys, and the consent flows in progress; 'airflow rotate-fernet-key' alone is "
        "enough for [core] fernet_key",
        func=lazy_load_command("airflow_provider_o365mail.cli.commands.rotate_keys"),
        args=(),
    ),
)


def get_o365mail_cli_commands() -> list[GroupCommand]:
    return [
        GroupCommand(
            name="o365mail",
            help=GROUP_HELP,
            subcommands=O365MAIL_COMMANDS,
        )
    ]
