"""Test session: an isolated AIRFLOW_HOME with a migrated SQLite DB, and the secret-leak check.

The leak check collects every test's captured output, log records and failure text, plus the
Airflow logs written under AIRFLOW_HOME, and fails the session if any of it contains a secret
the sandbox issued (client secrets, access/ID/refresh tokens).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

for _name in [n for n in os.environ if n.startswith("AIRFLOW__") or n.startswith("AIRFLOW_CONN_")]:
    del os.environ[_name]
AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="o365mail-tests-airflow-"))
os.environ["AIRFLOW_HOME"] = str(AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__FERNET_KEY"] = "sxgU9Vw5J1kPp0mUwNDg2B0xlJ0m4zM2f9YQ6u3qk1Q="
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(AIRFLOW_HOME / "dags")
os.environ["O365MAIL_LOCK_DIR"] = str(AIRFLOW_HOME)
# The credential watch would redeem the aged stores other tests build on purpose, from every scheduler
# and triggerer a test starts; tests/integration/test_credential_watch.py turns it on for its own.
os.environ["AIRFLOW__O365MAIL__CREDENTIAL_WATCH"] = "False"
# The leases (token refresh, connection slots) wait ``settle`` after each claim for other writers'
# writes to show (default 1 s, for API servers behind a load balancer and replicated databases). Every
# process here reads one metadata DB, where a write shows at once: a quarter second saves the suite
# ~7 minutes on 2 cores (pytest 3,330 s -> 2,923 s in CI). The lease's own tests set the settle they
# test (jittery writes: tests/integration/test_security.py; tests/unit/test_security_auth.py); the
# distributed job (scripts/distributed-test.sh) runs its hosts with the default.
os.environ["AIRFLOW__O365MAIL__REFRESH_LEASE_SETTLE_SECONDS"] = "0.25"

_captured: list[tuple[str, str]] = []


@pytest.fixture(scope="session", autouse=True)
def airflow_db() -> Path:
    result = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return AIRFLOW_HOME


@pytest.fixture(autouse=True)
def _each_test_masks_its_own_secrets():
    """Airflow's maskers never forget and recompile every secret on each new one; this one long
    process creates thousands (each test its own grants, and Airflow masks every connection's
    refresh_token extra on load), so late tests spent most of their time compiling. Each test starts
    with empty maskers; the provider registers what it uses again (the leak check still scans all)."""
    yield
    from airflow_provider_o365mail.auth import masking

    masking.reset_all()


@pytest.fixture(autouse=True)
def _each_test_leaves_no_idle_imap_sessions():
    """Each test uses connection ids of its own, and each id has its own pool whose idle sessions
    stay logged in for 60 s: twenty quick tests in a row held Dovecot's 20 connections of the
    mailbox (the Exchange cap the sandbox enforces), and the next login was refused."""
    yield
    from airflow_provider_o365mail.imap.pool import close_idle_pools

    close_idle_pools()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for name, text in report.sections:
        _captured.append((f"{report.nodeid} [{name}]", text))
    if report.longrepr is not None:
        _captured.append((f"{report.nodeid} [failure]", str(report.longrepr)))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from airflow_provider_o365mail.testing.leakcheck import find_leaks, issued_secrets
    from airflow_provider_o365mail.testing.sandbox import DEFAULT_STATE_DIR

    state_dir = Path(session.config.getoption("--o365-sandbox-state-dir") or DEFAULT_STATE_DIR)
    secrets = issued_secrets(state_dir)
    texts = list(_captured)
    for path in AIRFLOW_HOME.rglob("*.log"):
        texts.append((str(path), path.read_text(errors="replace")))
    leaks = find_leaks(texts, secrets)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"secret leak check: {len(secrets)} issued secrets, {len(texts)} captured texts scanned, {len(leaks)} leaks"
        )
        for leak in leaks:
            reporter.write_line(f"LEAK {leak}", red=True)
    if leaks:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
