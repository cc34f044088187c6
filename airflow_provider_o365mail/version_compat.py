"""Which Airflow this runs on (features that need a newer Airflow check here)."""

from __future__ import annotations

from packaging.version import Version


def _airflow_version() -> Version:
    from airflow import __version__

    return Version(Version(__version__).base_version)


AIRFLOW_VERSION = _airflow_version()
AIRFLOW_V_3_3_PLUS = Version("3.3.0") <= AIRFLOW_VERSION
