"""A CeleryExecutor deployment on one machine, each component a "host" of its own (issue #24).

Hosts are network namespaces on a bridge (``o365br``, 10.77.0.0/24): the root namespace is the
database host (PostgreSQL and Redis on 10.77.0.1), ``api`` runs the api-server (10.77.0.10:8080),
``sched`` the scheduler and the dag-processor, ``w1``/``w2`` a Celery worker each, ``t1``/``t2`` a
triggerer each. Every host process also runs in a mount and UTS namespace of its own: its own
hostname, and its own ``/tmp`` (a per-host directory bind-mounted over ``/tmp``), so the provider's
per-host ``flock`` locks (``O365MAIL_LOCK_DIR`` unset: ``/tmp``) are per host, as on real machines.
The deployment's state directory is bind-mounted into each host's ``/tmp`` at the same path (the
shared "network drive": the DAGs folder and the sandbox's CA file).

The sandbox and the tests' counting proxies stay on the root namespace's 127.0.0.1;
``nsforward.py`` makes those ports appear on every host's own 127.0.0.1, so the connection's
hosts (127.0.0.1) and the sandbox certificate need no change.

What every host shares, as in a real deployment: the metadata DB, the broker, the Fernet key, the
JWT secret of the execution API, the ``[o365mail]`` options, the DAG files.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BRIDGE = "o365br"
SUBNET = "10.77.0"
DB_HOST = f"{SUBNET}.1"
API_PORT = 8080
HOSTS = {"api": 10, "sched": 11, "w1": 21, "w2": 22, "t1": 31, "t2": 32}
COMPONENTS = [
    ("api", ["api-server"]),
    ("sched", ["scheduler"]),
    ("sched", ["dag-processor"]),
    ("w1", ["celery", "worker"]),
    ("w2", ["celery", "worker"]),
    ("t1", ["triggerer"]),
    ("t2", ["triggerer"]),
]
PG_BIN = Path("/usr/lib/postgresql/15/bin")
FERNET_KEY = "Wm1hZWFrZXlmb3J0aGVkaXN0cmlidXRlZHRlc3RzMDA="
JWT_SECRET = "o365mail-distributed-jwt-secret-0123456789abcdef"


def run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


def netns_name(host: str) -> str:
    return f"o365-{host}"


def host_ip(host: str) -> str:
    return f"{SUBNET}.{HOSTS[host]}"


@dataclass
class Deployment:
    state: Path
    venv_python: str = sys.executable
    env_extra: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    worker_concurrency: int = 16

    # ------------------------------------------------------------------ network
    def network_up(self) -> None:
        self.network_down()
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{DB_HOST}/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        for host in HOSTS:
            ns = netns_name(host)
            run("ip", "netns", "add", ns)
            run("ip", "link", "add", f"v-{host}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            run("ip", "link", "set", f"v-{host}", "master", BRIDGE)
            run("ip", "link", "set", f"v-{host}", "up")
            run("ip", "-n", ns, "addr", "add", f"{host_ip(host)}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")

    @staticmethod
    def network_down() -> None:
        for host in HOSTS:
            run("ip", "netns", "del", netns_name(host), check=False)
            run("ip", "link", "del", f"v-{host}", check=False)
        run("ip", "link", "del", BRIDGE, check=False)

    def forward(self, ports: list[int]) -> None:
        """The root namespace's 127.0.0.1:<port> on every host's 127.0.0.1 (nsforward.py)."""
        args = [self.venv_python, str(Path(__file__).with_name("nsforward.py"))]
        for host in HOSTS:
            args += ["--netns", netns_name(host)]
        for port in ports:
            args += ["--port", str(port)]
        log = (self.state / "nsforward.log").open("a")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes["nsforward"] = proc
        _wait(lambda: "ready" in (self.state / "nsforward.log").read_text(), 30, "the namespace forwarder")

    # ------------------------------------------------------------------ database host (root namespace)
    def databases_up(self) -> None:
        pg = self.state / "pg"
        if not (pg / "PG_VERSION").exists():
            pg.mkdir(parents=True, exist_ok=True)
            shutil.chown(pg, "postgres", "postgres")
            run(
                "runuser",
                "-u",
                "postgres",
                "--",
                str(PG_BIN / "initdb"),
                "-D",
                str(pg),
                "-A",
                "trust",
                "-U",
                "postgres",
            )
            with (pg / "pg_hba.conf").open("a") as hba:
                hba.write(f"host all all {SUBNET}.0/24 trust\n")
        sock_dir = self.state / "pg-sock"
        sock_dir.mkdir(exist_ok=True)
        shutil.chown(sock_dir, "postgres", "postgres")
        log = (self.state / "postgres.log").open("a")
        self.processes["postgres"] = subprocess.Popen(
            ["runuser", "-u", "postgres", "--", str(PG_BIN / "postgres"), "-D", str(pg), "-k", str(sock_dir),
             "-h", DB_HOST, "-p", "5432", "-c", "max_connections=400", "-c", "fsync=off",
             "-c", "synchronous_commit=off"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        _wait(lambda: run(str(PG_BIN / "pg_isready"), "-h", DB_HOST, check=False).returncode == 0, 60, "PostgreSQL")
        exists = run(str(PG_BIN / "psql"), "-h", DB_HOST, "-U", "postgres", "-tAc",
                     "select 1 from pg_database where datname='airflow'").stdout.strip()  # fmt: skip
        if exists != "1":
            run(str(PG_BIN / "createdb"), "-h", DB_HOST, "-U", "postgres", "airflow")
        log = (self.state / "redis.log").open("a")
        self.processes["redis"] = subprocess.Popen(
            ["redis-server", "--bind", DB_HOST, "--port", "6379", "--save", "", "--appendonly", "no",
             "--protected-mode", "no", "--dir", str(self.state)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        _wait(lambda: run("redis-cli", "-h", DB_HOST, "ping", check=False).stdout.strip() == "PONG", 60, "Redis")

    # ------------------------------------------------------------------ Airflow
    @property
    def dags(self) -> Path:
        return self.state / "dags"

    def env(self) -> dict[str, str]:
        """The configuration every host shares (and the tests' own process, for the metadata DB)."""
        env = {
            # O365MAIL_LOCK_DIR unset: the provider's per-host locks live in each host's own /tmp.
            **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "O365MAIL_LOCK_DIR", "TMPDIR"))},
            "PYTHONUNBUFFERED": "1",
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://postgres@{DB_HOST}:5432/airflow",
            "AIRFLOW__CELERY__BROKER_URL": f"redis://{DB_HOST}:6379/0",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql+psycopg2://postgres@{DB_HOST}:5432/airflow",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.worker_concurrency),
            "AIRFLOW__CORE__FERNET_KEY": FERNET_KEY,
            "AIRFLOW__API_AUTH__JWT_SECRET": JWT_SECRET,
            "AIRFLOW__API__HOST": "0.0.0.0",
            "AIRFLOW__API__PORT": str(API_PORT),
            "AIRFLOW__API__WORKERS": "2",
            "AIRFLOW__API__BASE_URL": f"http://{host_ip('api')}:{API_PORT}",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{host_ip('api')}:{API_PORT}/execution/",
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__PARALLELISM": "256",
            "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "256",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "1800",
            "AIRFLOW__TRIGGERER__CAPACITY": "1000",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        }
        env.update(self.env_extra)
        return env

    def airflow_up(self) -> None:
        self.dags.mkdir(parents=True, exist_ok=True)
        home = self.state / "migrate-home"
        home.mkdir(exist_ok=True)
        env = {**self.env(), "AIRFLOW_HOME": str(home)}
        out = subprocess.run([self.venv_python, "-m", "airflow", "db", "migrate"], env=env, capture_output=True,
                             text=True, cwd=home)  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        for host, component in COMPONENTS:
            self.start(host, component)
        self.wait_healthy()

    def host_command(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` on ``host``: its network namespace, then a mount and UTS namespace of its own."""
        host_tmp = self.state / "hosts" / host / "tmp"
        host_tmp.mkdir(parents=True, exist_ok=True)
        binds = []
        # What stays visible at its path inside the new /tmp (the "network drive"): the job's directory
        # (DAGs, the sandbox's CA file) and the virtualenv.
        for path in self.shared_paths():
            if path.is_relative_to("/tmp"):
                inside = host_tmp / path.relative_to("/tmp")
                inside.mkdir(parents=True, exist_ok=True)
                binds.append(f"mount --bind {shlex.quote(str(path))} {shlex.quote(str(inside))}")
        binds.append(f"mount --rbind {shlex.quote(str(host_tmp))} /tmp")
        script = " && ".join([*binds, f"hostname {host}", "mkdir -p /tmp/airflow", 'exec "$@"'])
        return ["ip", "netns", "exec", netns_name(host), "unshare", "--mount", "--uts", "--propagation", "private",
                "sh", "-c", script, "sh", *argv]  # fmt: skip

    def shared_paths(self) -> list[Path]:
        venv = Path(self.venv_python).parents[1]
        job = Path(os.environ.get("O365MAIL_DIST_STATE") or self.state)
        return [venv, job] if not (job.is_relative_to(venv) or venv.is_relative_to(job)) else [min(venv, job)]

    def start(self, host: str, component: list[str]) -> None:
        name = f"{host}-{'-'.join(component)}"
        log = (self.state / f"{name}.log").open("a")
        argv = [self.venv_python, "-m", "airflow", *component]
        if component[:2] == ["celery", "worker"]:
            argv += ["--celery-hostname", f"{host}@{host}"]
        env = {**self.env(), "AIRFLOW_HOME": "/tmp/airflow"}
        self.processes[name] = subprocess.Popen(
            self.host_command(host, argv), env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd="/",
        )  # fmt: skip

    def api_url(self) -> str:
        return f"http://{host_ip('api')}:{API_PORT}"

    def wait_healthy(self, timeout: float = 300) -> None:
        def healthy() -> bool:
            try:
                health = httpx.get(f"{self.api_url()}/api/v2/monitor/health", timeout=3).json()
            except (httpx.HTTPError, ValueError):
                return False
            return all(health.get(c, {}).get("status") == "healthy" for c in ("metadatabase", "scheduler", "triggerer"))

        _wait(healthy, timeout, f"the deployment (logs in {self.state})")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.processes.pop(name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def down(self) -> None:
        # Airflow first (TERM, then KILL), the databases after, the network last.
        for name in [n for n in self.processes if n not in ("postgres", "redis", "nsforward")]:
            self.kill(name, signal.SIGTERM)
        for name in ("nsforward", "redis", "postgres"):
            self.kill(name, signal.SIGTERM)
        self.network_down()

    def log(self, name: str) -> str:
        path = self.state / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(1)
    raise RuntimeError(f"timed out waiting for {what}")
