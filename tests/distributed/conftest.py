"""The distributed deployment (deployment.py) for the tests of this folder: started once per session.

Run through scripts/distributed-test.sh (root; it exports the shared Airflow settings for this
process, which reads the metadata DB). IMAP and SMTP of every connection go through two counting
proxies on the root namespace's loopback (testing/fault_proxy.py): their peak of concurrent
connections is what the server saw from every host together.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from airflow_provider_o365mail.testing.fault_proxy import FaultProxy

sys.path.insert(0, str(Path(__file__).parent))
from deployment import Deployment

# The defaults of [o365mail] shared_imap_connections_per_mailbox / shared_smtp_sessions_per_mailbox.
SHARED_IMAP_BUDGET = int(os.environ.get("O365MAIL_DIST_IMAP_BUDGET", "10"))
SHARED_SMTP_BUDGET = 3
WITHOUT_SHARED = os.environ.get("O365MAIL_DIST_WITHOUT_SHARED_BUDGET") == "1"


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.distributed)


@pytest.fixture(scope="session")
def proxies(o365_sandbox):
    with (
        FaultProxy(("127.0.0.1", o365_sandbox.imap_port)) as imap,
        FaultProxy(("127.0.0.1", o365_sandbox.smtp_port)) as smtp,
    ):
        yield {"imap": imap, "smtp": smtp}


@pytest.fixture(scope="session")
def deployment(o365_sandbox, proxies):
    if os.geteuid() != 0 or not os.environ.get("O365MAIL_DIST_STATE"):
        pytest.skip("the distributed deployment needs root and scripts/distributed-test.sh")
    state = Path(os.environ["O365MAIL_DIST_STATE"]) / "deploy"
    state.mkdir(parents=True, exist_ok=True)
    dep = Deployment(
        state,
        env_extra={
            # The provider's settings, the same on every host.
            # O365MAIL_DIST_WITHOUT_SHARED_BUDGET=1 turns the shared budgets off (0) while the tests still
            # assert them: how to see the budget test fail (per-process budgets only).
            "AIRFLOW__O365MAIL__SHARED_IMAP_CONNECTIONS_PER_MAILBOX": "0"
            if WITHOUT_SHARED
            else str(SHARED_IMAP_BUDGET),
            "AIRFLOW__O365MAIL__SHARED_SMTP_SESSIONS_PER_MAILBOX": "0" if WITHOUT_SHARED else str(SHARED_SMTP_BUDGET),
            # A killed worker's task is noticed within a minute, not five.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
        },
    )
    try:
        dep.network_up()
        dep.databases_up()
        sbx = o365_sandbox
        dep.forward([sbx.idp_port, sbx.imap_port, sbx.smtp_port, proxies["imap"].port, proxies["smtp"].port])
        dep.airflow_up()
        yield dep
    finally:
        dep.down()


def airflow_cli(dep: Deployment, *args: str, timeout: float = 300) -> str:
    home = dep.state / "cli-home"
    home.mkdir(exist_ok=True)
    out = subprocess.run([dep.venv_python, "-m", "airflow", *args], env={**dep.env(), "AIRFLOW_HOME": str(home)},
                         capture_output=True, text=True, timeout=timeout, cwd=home)  # fmt: skip
    assert out.returncode == 0, f"airflow {' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="session")
def add_connection(deployment):
    def add(conn_id: str, conn_json: str) -> str:
        airflow_cli(deployment, "connections", "add", conn_id, "--conn-json", conn_json)
        return conn_id

    return add


def in_deployment(dep: Deployment, code: str, timeout: float = 300) -> str:
    """Run Python as a client of the deployment (its metadata DB and Variables; this test process has
    the suite's own SQLite Airflow, tests/conftest.py); returns the last line it printed."""
    home = dep.state / "cli-home"
    home.mkdir(exist_ok=True)
    out = subprocess.run([dep.venv_python, "-c", textwrap.dedent(code)], env={**dep.env(), "AIRFLOW_HOME": str(home)},
                         capture_output=True, text=True, timeout=timeout, cwd=home)  # fmt: skip
    assert out.returncode == 0, f"{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def write_dag(dep: Deployment, dag_id: str, source: str) -> None:
    (dep.dags / f"{dag_id}.py").write_text(textwrap.dedent(source))


def sql(dep: Deployment, query: str) -> list[list[str]]:
    out = subprocess.run(["/usr/lib/postgresql/15/bin/psql", "-h", "10.77.0.1", "-U", "postgres", "airflow", "-tAF",
                          "\t", "-c", query], capture_output=True, text=True, check=True)  # fmt: skip
    return [line.split("\t") for line in out.stdout.splitlines() if line]


def trigger(dep: Deployment, dag_id: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while not sql(dep, f"select 1 from dag where dag_id = '{dag_id}'"):
        assert time.monotonic() < deadline, f"{dag_id} was not parsed by the dag-processor"
        time.sleep(2)
    run_id = f"dist__{int(time.time())}"
    airflow_cli(dep, "dags", "trigger", dag_id, "--run-id", run_id)
    return run_id


def wait_run(dep: Deployment, dag_id: str, run_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = sql(dep, f"select state from dag_run where dag_id = '{dag_id}' and run_id = '{run_id}'")
        if rows and rows[0][0] in ("success", "failed"):
            return rows[0][0]
        time.sleep(3)
    raise AssertionError(f"{dag_id} {run_id} did not finish within {timeout} s")


def task_rows(dep: Deployment, dag_id: str, run_id: str) -> list[dict]:
    rows = sql(dep, "select task_id, state, try_number, hostname from task_instance "
                    f"where dag_id = '{dag_id}' and run_id = '{run_id}'")  # fmt: skip
    return [dict(zip(("task_id", "state", "try_number", "hostname"), r, strict=False)) for r in rows]


def dumps(value) -> str:
    return json.dumps(value, sort_keys=True)
