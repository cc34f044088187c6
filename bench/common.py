"""Shared set-up of the benchmarks: an isolated AIRFLOW_HOME and a fresh connection on the sandbox."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile

from airflow_provider_o365mail.testing.sandbox import SandboxInfo, read_env_file

BENCH_CONN_ID = "o365mail_bench"


def bench_environment(env_file: str) -> SandboxInfo:
    """Point Airflow at a throw-away home and export ``o365mail_bench`` backed by a fresh grant."""
    sbx = SandboxInfo.from_env(read_env_file(env_file))
    home = tempfile.mkdtemp(prefix="o365-bench-")
    os.environ.update(
        AIRFLOW_HOME=home,
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        O365MAIL_LOCK_DIR=home,
        AIRFLOW__CORE__FERNET_KEY="sxgU9Vw5J1kPp0mUwNDg2B0xlJ0m4zM2f9YQ6u3qk1Q=",
    )
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)
    os.environ[f"AIRFLOW_CONN_{BENCH_CONN_ID.upper()}"] = sbx.connection_json(refresh_token=sbx.new_refresh_token())
    return sbx


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000
