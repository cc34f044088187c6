"""Which Airflow this runs on, and the few Airflow names that moved between 3.1 and 3.3 (one place).

Everything the provider imports from Airflow that differs between the supported versions
(3.1, 3.2, 3.3) is resolved here; the rest of the provider imports these names from this module::

    name                    Airflow 3.1                          Airflow >= 3.2
    AirflowException        airflow.sdk.exceptions               airflow.sdk.exceptions
    AirflowFailException    airflow.exceptions                   airflow.sdk.exceptions
    conf                    airflow.configuration                airflow.sdk

Features that need a newer Airflow check the flags below and refuse with a message naming the
version they need: provider CLI commands (``airflow o365mail``) arrived in
3.2 (``python -m airflow_provider_o365mail.cli`` works on every version); the event trigger needs
3.3's shared trigger streams and asset state store. ``docs/compatibility.md`` has the whole table.
"""

from __future__ import annotations

from airflow import __version__ as _airflow_version_string
from packaging.version import Version

try:  # Airflow >= 3.2 (task-sdk >= 1.2)
    from airflow.sdk import conf
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
except ImportError:  # Airflow 3.1: the Task SDK has neither yet
    from airflow.configuration import conf  # type: ignore[no-redef]
    from airflow.exceptions import AirflowException, AirflowFailException  # type: ignore[no-redef]

AIRFLOW_VERSION = Version(Version(_airflow_version_string).base_version)
AIRFLOW_V_3_2_PLUS = Version("3.2.0") <= AIRFLOW_VERSION
AIRFLOW_V_3_3_PLUS = Version("3.3.0") <= AIRFLOW_VERSION
__all__ = [
    "AIRFLOW_VERSION",
    "AIRFLOW_V_3_2_PLUS",
    "AIRFLOW_V_3_3_PLUS",
    "AirflowException",
    "AirflowFailException",
    "conf",
]
