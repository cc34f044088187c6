"""Real Airflow components for integration tests and benchmarks: api-server, triggerer, scheduler...

``start_airflow_services(home)`` starts an api-server and a triggerer on 127.0.0.1 for an
``AIRFLOW_HOME`` with a migrated DB; ``services.start("scheduler")`` adds more. Processes run in
their own sessions and are stopped (or killed, to test crashes) by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ADMIN_PASSWORD = "o365mail-tests-admin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class DagRunResult:
    returncode: int
    output: str
    dag_id: str

    def run_state(self) -> str | None:
        from airflow.models import DagRun
        from airflow.utils.session import create_session

        with create_session() as session:
            run = session.query(DagRun).filter(DagRun.dag_id == self.dag_id).order_by(DagRun.id.desc()).first()
            return str(run.state) if run is not None else None

    def task_states(self) -> dict[str, tuple[str, int]]:
        """``{task_id: (state, try_number)}`` of the latest run, read from the metadata DB."""
        from airflow.models import DagRun, TaskInstance
        from airflow.utils.session import create_session

        with create_session() as session:
            run = session.query(DagRun).filter(DagRun.dag_id == self.dag_id).order_by(DagRun.id.desc()).first()
            assert run is not None, f"no run of {self.dag_id}"
            tis = session.query(TaskInstance).filter(
                TaskInstance.dag_id == self.dag_id, TaskInstance.run_id == run.run_id
            )
            return {ti.task_id: (str(ti.state), ti.try_number) for ti in tis}


@dataclass
class AirflowServices:
    """Airflow components started for one ``AIRFLOW_HOME`` (see :func:`start_airflow_services`)."""

    api_url: str
    env: dict[str, str]
    logs: Path
    admin_password: str = ADMIN_PASSWORD
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str) -> None:
        """Start ``airflow <name>`` (api-server, triggerer, scheduler, dag-processor) unless it runs."""
        running = self.processes.get(name)
        if running is not None and running.poll() is None:
            return
        log = (self.logs / f"{name}.log").open("a")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "airflow", name],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Not the repository: its *.egg-info would make the provider's entry points appear twice.
            cwd=self.env["AIRFLOW_HOME"],
        )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.processes.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.kill(name, signal.SIGTERM)

    def wait_healthy(self, component: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        health: dict = {}
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"{self.api_url}/api/v2/monitor/health", timeout=2).json()
                if health.get(component.replace("-", "_"), {}).get("status") == "healthy":
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        raise RuntimeError(f"{component} did not become healthy: {health}; logs in {self.logs}")

    def log_text(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def admin_token(self, username: str = "admin") -> str:
        """A JWT for ``admin`` or ``operator2`` (admin role), ``viewer1`` (viewer) or ``op1`` (op)."""
        response = httpx.post(
            f"{self.api_url}/auth/token", json={"username": username, "password": self.admin_password}, timeout=30
        )
        response.raise_for_status()
        return response.json()["access_token"]

    def dags_test_with_executor(self, dag_id: str, source: str, timeout: float = 300) -> DagRunResult:
        """Run a DAG through the real executor path (LocalExecutor, Task SDK over HTTP, the triggerer)."""
        dags = Path(self.env["AIRFLOW__CORE__DAGS_FOLDER"])
        dags.mkdir(parents=True, exist_ok=True)
        (dags / f"{dag_id}.py").write_text(textwrap.dedent(source))
        # LocalExecutor workers outlive `dags test` and would hold a pipe open: log to a file and
        # end the whole process group afterwards.
        output = self.logs / f"dags-test-{dag_id}.log"
        with output.open("w") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "airflow", "dags", "test", dag_id, "--use-executor"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                cwd=self.env["AIRFLOW_HOME"],
            )
            result = DagRunResult(0, "", dag_id)
            deadline = time.monotonic() + timeout
            finished_at = None
            try:
                while process.poll() is None and time.monotonic() < deadline:
                    time.sleep(1)
                    # `dags test --use-executor` can wait forever in LocalExecutor's shutdown after
                    # the run ended: give it a grace period once the run is final.
                    if finished_at is None and result.run_state() in ("success", "failed"):
                        finished_at = time.monotonic()
                    if finished_at is not None and time.monotonic() - finished_at > 10:
                        break
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        returncode = process.returncode if finished_at is None else (0 if result.run_state() == "success" else 1)
        return DagRunResult(returncode, output.read_text(errors="replace"), dag_id)

    def trigger_logs(self, dag_id: str) -> str:
        root = Path(self.env["AIRFLOW_HOME"]) / "logs" / f"dag_id={dag_id}"
        return "\n".join(p.read_text(errors="replace") for p in sorted(root.rglob("*.log")))


def start_airflow_services(
    home: Path, extra_env: dict[str, str] | None = None, components: tuple[str, ...] = ("api-server", "triggerer")
) -> AirflowServices:
    """Start an api-server and a triggerer for ``home`` (DB migrated) and wait until both are healthy.

    ``components=("api-server",)`` starts an api-server alone (one more for the same DB, with its own
    environment and logs folder), ready once it answers with a healthy metadata DB.
    """
    # A known password for SimpleAuthManager's users (it generates only missing ones).
    (home / "simple_auth_manager_passwords.json.generated").write_text(
        json.dumps({name: ADMIN_PASSWORD for name in ("admin", "operator2", "viewer1", "op1")})
    )
    port = free_port()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        # Service output goes to log files that tests read while the service runs: no block buffering.
        "PYTHONUNBUFFERED": "1",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__API_AUTH__JWT_SECRET": "o365mail-tests-local-jwt-secret-0123456789abcdef",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,operator2:admin,viewer1:viewer,op1:op",
        # For the scheduler and dag-processor some tests start: new DAG files run at once.
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
    }
    env.update(extra_env or {})
    logs = home / ("service-logs" if "triggerer" in components else f"service-logs-{port}")
    logs.mkdir(exist_ok=True)
    services = AirflowServices(api_url=f"http://127.0.0.1:{port}", env=env, logs=logs)
    for component in components:
        services.start(component)
    try:
        services.wait_healthy("triggerer" if "triggerer" in components else "metadatabase")
    except RuntimeError:
        services.stop_all()
        raise
    return services


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    """Poll ``predicate`` until it returns something truthy; return that, or raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
