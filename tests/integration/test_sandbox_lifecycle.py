"""`up` from nothing, `up` again, `down`: in a state directory of its own, through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from airflow_provider_o365mail.testing.sandbox import Sandbox, read_env_file


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "airflow_provider_o365mail.testing", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_up_refuses_a_state_dir_the_daemons_cannot_reach(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    result = cli("up", "--state-dir", str(private / "sandbox"))
    assert result.returncode != 0 and "not searchable by other users" in result.stderr


def test_up_is_idempotent_and_down_leaves_no_process(tmp_path):
    top = Path(tempfile.mkdtemp(prefix="o365-lifecycle-"))  # /tmp itself is searchable by the daemons
    top.chmod(0o755)
    state = top / "sandbox"
    env_file = tmp_path / "sandbox.env"
    first = cli("up", "--state-dir", str(state), "--env-file", str(env_file))
    assert first.returncode == 0, first.stderr[-3000:]
    pids = Sandbox(state).running()
    assert all(pids.values()), pids
    env = read_env_file(env_file)
    for key in (
        "O365_SANDBOX_TENANT",
        "O365_SANDBOX_AUTH_ENDPOINT",
        "O365_SANDBOX_TOKEN_ENDPOINT",
        "O365_SANDBOX_CLIENT_ID",
        "O365_SANDBOX_CLIENT_SECRET",
        "O365_SANDBOX_USER",
        "O365_SANDBOX_IMAP_HOST",
        "O365_SANDBOX_IMAP_PORT",
        "O365_SANDBOX_SMTP_HOST",
        "O365_SANDBOX_SMTP_PORT",
        "O365_SANDBOX_CA_FILE",
        "AIRFLOW_CONN_O365MAIL_DEFAULT",
    ):
        assert env.get(key), key
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    shell = subprocess.run(
        ["bash", "-c", f"set -a; . {env_file}; echo $O365_SANDBOX_USER"], capture_output=True, text=True, check=True
    )
    assert shell.stdout.strip() == env["O365_SANDBOX_USER"]

    again = cli("up", "--state-dir", str(state), "--env-file", str(env_file))
    assert again.returncode == 0, again.stderr[-3000:]
    assert Sandbox(state).running() == pids, "a second up must reuse the running processes"

    down = cli("down", "--state-dir", str(state))
    assert down.returncode == 0, down.stderr
    for pid in pids.values():
        assert not os.path.exists(f"/proc/{pid}"), f"process {pid} survived down"
    leftover = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True, check=False)
    assert leftover.stdout.strip() == "", leftover.stdout
    Sandbox(state).down(purge=True)
