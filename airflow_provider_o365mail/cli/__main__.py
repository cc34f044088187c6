"""``python -m airflow_provider_o365mail.cli COMMAND ...``: the ``airflow o365mail`` commands on any Airflow.

Airflow >= 3.2 adds ``airflow o365mail`` to its own CLI from the provider info's ``cli`` entry. Airflow
3.1 has no provider CLI commands (its ``providers_manager`` reads no ``cli`` key), so there this entry
runs the same commands, declared once in :mod:`.definition`, with the same arguments and exit codes.
It works on 3.2+ as well. Like ``airflow``, it reads ``AIRFLOW_HOME`` and the Airflow configuration.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from airflow_provider_o365mail.cli.definition import GROUP_HELP, O365MAIL_COMMANDS

PROG = "python -m airflow_provider_o365mail.cli"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=f"{GROUP_HELP}. The same commands as 'airflow o365mail' (Airflow >= 3.2)."
    )
    commands = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
    for command in sorted(O365MAIL_COMMANDS, key=lambda c: c.name):
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        for arg in command.args:
            arg.add_to_parser(sub)
        sub.set_defaults(func=command.func)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
