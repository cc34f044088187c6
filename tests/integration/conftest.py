from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@dataclass
class DagRunResult:
    returncode: int
    output: str
    dag_id: str

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
        )
        return DagRunResult(result.returncode, result.stdout + result.stderr, dag_id)

    return run
