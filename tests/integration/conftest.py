from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_provider_o365mail.testing.airflow_services import (
    AirflowServices,
    DagRunResult,
    start_airflow_services,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


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
