from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from airflow_provider_o365mail.hooks import fallback
from airflow_provider_o365mail.testing.airflow_services import (
    AirflowServices,
    DagRunResult,
    start_airflow_services,
)


def _airflow_services_phase(item: pytest.Item) -> int:
    """0: no Airflow services; 1: api-server/triggerer only; 2: with a scheduler (``examples_deployed``,
    the kill harness's ``scheduled``); 3: the event tests.

    The session's Airflow services keep running (and use CPU) once started, and a scheduler picks up
    every run in the DB: tests that need none run first, those that run ``dags test --use-executor``
    before any scheduler starts, and the event tests (their watchers stay in the triggerer) last.
    """
    if "airflow_services" not in getattr(item, "fixturenames", ()):
        return 0
    if "event_airflow" in item.fixturenames:
        return 3
    return 2 if {"examples_deployed", "scheduled"} & set(item.fixturenames) else 1


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
    items.sort(key=_airflow_services_phase)  # stable: file order within each phase


@pytest.fixture
def run_dag(airflow_db):
    """Write a DAG file into the test DAGs folder and run it with ``airflow dags test``."""

    def run(dag_id: str, source: str, *, env: dict[str, str] | None = None, timeout: float = 300) -> DagRunResult:
        dags = Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
        dags.mkdir(parents=True, exist_ok=True)
        (dags / f"{dag_id}.py").write_text(textwrap.dedent(source))
        result = subprocess.run(
            [sys.executable, "-m", "airflow", "dags", "test", dag_id],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
            check=False,
            cwd=os.environ["AIRFLOW_HOME"],
        )
        return DagRunResult(result.returncode, result.stdout + result.stderr, dag_id)

    return run


@pytest.fixture(scope="session")
def airflow_services(airflow_db) -> Iterator[AirflowServices]:
    services = start_airflow_services(airflow_db)
    yield services
    services.stop_all()


@pytest.fixture
def db_connection(airflow_db):
    """Store a connection in the metadata DB (seen by the api-server, the triggerer and tasks)."""
    created = []

    def create(conn_id: str, connection_json: str) -> str:
        from airflow.models import Connection
        from airflow.utils.session import create_session

        data = json.loads(connection_json)
        with create_session() as session:
            session.query(Connection).filter(Connection.conn_id == conn_id).delete()
            session.add(
                Connection(
                    conn_id=conn_id,
                    conn_type=data["conn_type"],
                    login=data.get("login"),
                    password=data.get("password"),
                    extra=json.dumps(data.get("extra") or {}),
                )
            )
        created.append(conn_id)
        return conn_id

    yield create
    from airflow.models import Connection
    from airflow.utils.session import create_session

    with create_session() as session:
        session.query(Connection).filter(Connection.conn_id.in_(created)).delete()


@pytest.fixture
def unauthorized_db_conn(db_connection, o365_sandbox) -> str:
    """A connection in the metadata DB that was never authorized: no refresh token, empty token store."""
    conn_id = f"o365mail_new_{uuid.uuid4().hex[:8]}"
    extra = o365_sandbox.connection_extra()
    del extra["refresh_token"]
    connection = {"conn_type": "o365mail", "login": o365_sandbox.client_id, "password": o365_sandbox.client_secret}
    return db_connection(conn_id, json.dumps({**connection, "extra": extra}))


# ---------------------------------------------------------------------- a real browser (Playwright + Chromium)
BROWSER_ARTIFACTS = (
    Path(os.environ.get("O365MAIL_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")) / "browser"
)
CHROMIUM = os.environ.get("O365MAIL_CHROMIUM", "/usr/bin/chromium")


def spki_hash(cert_file: Path) -> str:
    """Chromium's --ignore-certificate-errors-spki-list value: trust exactly the sandbox's server key."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


@pytest.fixture
def browser(o365_sandbox):
    """Headless Chromium trusting the sandbox's TLS key (Debian's build, else Playwright's own)."""
    from playwright.sync_api import sync_playwright

    BROWSER_ARTIFACTS.mkdir(parents=True, exist_ok=True)
    server_cert = Path(o365_sandbox.ca_file).parent / "server.pem"
    with sync_playwright() as p:
        launched = p.chromium.launch(
            executable_path=CHROMIUM if Path(CHROMIUM).exists() else None,
            args=[
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--ignore-certificate-errors-spki-list={spki_hash(server_cert)}",
            ],
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def browser_page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1200})
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        yield page
    finally:
        context.close()


@pytest.fixture
def graph_conn(o365_sandbox, o365_admin, monkeypatch):
    """A connection with transport graph (fresh grant, empty token store); Graph back to its defaults."""
    assert o365_sandbox.graph_url, "the sandbox has no Graph stand-in"
    o365_admin.graph_reset()
    conn_id = f"o365mail_{uuid.uuid4().hex[:10]}"

    def make(**overrides) -> str:
        extra = {"transport": "graph", "graph_url": o365_sandbox.graph_url, **overrides}
        monkeypatch.setenv(
            f"AIRFLOW_CONN_{conn_id.upper()}",
            o365_sandbox.connection_json(refresh_token=o365_sandbox.new_refresh_token(), **extra),
        )
        return conn_id

    yield make
    fallback.forget_disabled()
    o365_admin.graph_reset()
