"""``python -m airflow_provider_o365mail.testing up|down|status --env-file PATH``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from airflow_provider_o365mail.testing.sandbox import DEFAULT_STATE_DIR, Sandbox, read_env_file


def _state_dir_of(env_file: Path | None) -> Path | None:
    """The sandbox an env file describes: ``down --env-file X`` stops that one, not the default."""
    if env_file is None or not env_file.exists():
        return None
    recorded = read_env_file(env_file).get("O365_SANDBOX_STATE_DIR")
    return Path(recorded) if recorded else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m airflow_provider_o365mail.testing",
        description="Local Microsoft 365 sandbox: Entra ID and Microsoft Graph stand-ins, Dovecot IMAP, Postfix submission.",
    )
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--env-file", type=Path, help="where 'up' writes KEY=value lines (shell- and Python-readable)")
    parser.add_argument(
        "--state-dir",
        type=Path,
        help=f"default: the one the env file names (down, status), else {DEFAULT_STATE_DIR}",
    )
    parser.add_argument("--purge", action="store_true", help="with 'down': also delete the state directory")
    args = parser.parse_args(argv)
    sandbox = Sandbox(args.state_dir or _state_dir_of(args.env_file) or DEFAULT_STATE_DIR)
    if args.command == "up":
        started = time.monotonic()
        info = sandbox.up(args.env_file)
        print(
            f"sandbox up in {time.monotonic() - started:.1f} s: Entra ID {info.idp_url}, "
            f"IMAP 127.0.0.1:{info.imap_port}, SMTP 127.0.0.1:{info.smtp_port}, Graph {info.graph_url}, user {info.user}"
            + (f"; env file {args.env_file}" if args.env_file else "")
        )
    elif args.command == "down":
        sandbox.down(purge=args.purge)
        if args.env_file and args.env_file.exists():
            args.env_file.unlink()
        print("sandbox down")
    else:
        print(json.dumps(sandbox.running()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
