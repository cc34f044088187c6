"""``python -m airflow_provider_o365mail.cli``: the ``airflow o365mail`` commands where Airflow has no provider CLI (3.1)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from airflow_provider_o365mail.cli.__main__ import build_parser
from airflow_provider_o365mail.cli.definition import O365MAIL_COMMANDS
from airflow_provider_o365mail.version_compat import AIRFLOW_V_3_2_PLUS, AIRFLOW_VERSION


def _options(parser) -> set[str]:
    """Option flags and positional names (``dest``), as ``Arg.flags`` declares them."""
    flags = {flag for action in parser._actions for flag in action.option_strings} - {"-h", "--help"}
    return flags | {action.dest for action in parser._actions if not action.option_strings}


def test_module_entry_has_every_command_with_the_declared_arguments():
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if a.dest == "subcommand"]
    assert set(subparsers.choices) == {c.name for c in O365MAIL_COMMANDS}
    for command in O365MAIL_COMMANDS:
        declared = {flag for arg in command.args for flag in arg.flags}
        assert _options(subparsers.choices[command.name]) == declared, command.name
    args = parser.parse_args(["doctor", "--conn-id", "mine", "-o", "json"])
    assert (args.conn_id, args.output, args.func.__name__) == ("mine", "json", "doctor")
    assert parser.parse_args(["authorize"]).conn_id == "o365mail_default"


def test_module_entry_runs_a_command_against_the_metadata_db(airflow_db):
    done = subprocess.run(
        [sys.executable, "-m", "airflow_provider_o365mail.cli", "forget", "--conn-id", "o365mail_cli_entry"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Dropped the cached tokens of 'o365mail_cli_entry'" in done.stdout


def _airflow_o365mail_help() -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "airflow", "o365mail", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.skipif(
    not AIRFLOW_V_3_2_PLUS, reason=f"provider CLI commands need Airflow >= 3.2; this is {AIRFLOW_VERSION}"
)
def test_airflow_registers_the_same_commands_from_the_provider_info():
    done = _airflow_o365mail_help()
    assert done.returncode == 0, done.stderr[-3000:]
    for command in O365MAIL_COMMANDS:
        assert command.name in done.stdout


@pytest.mark.skipif(
    AIRFLOW_V_3_2_PLUS, reason="Airflow >= 3.2 registers 'airflow o365mail' (scripts/compat-test.sh runs 3.1)"
)
def test_airflow_3_1_has_no_provider_cli_so_the_module_entry_is_the_way():
    done = _airflow_o365mail_help()
    assert done.returncode != 0
    assert "invalid choice: 'o365mail'" in done.stdout + done.stderr
