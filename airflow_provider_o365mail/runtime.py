"""Where this process runs, and how it reaches Airflow's Variables and Connections (no other logic).

Inside a task or the triggerer the Task SDK talks to a supervisor and the ORM is blocked; the CLI,
the api-server plugin and plain Python use the core models (which also read the metadata DB).
``auth/``, ``mail/``, the CLI and the plugin all go through this module, so the choice is made once.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from airflow.sdk import Connection

DEFAULT_VARIABLE_DESCRIPTION = "airflow-provider-o365mail: encrypted, do not edit"


def in_task_runtime() -> bool:
    """True inside a task or the triggerer, where the Task SDK talks to a supervisor."""
    try:
        from airflow.sdk.execution_time import task_runner
    except ImportError:
        return False
    return getattr(task_runner, "SUPERVISOR_COMMS", None) is not None


class VariableBackend(Protocol):
    def get(self, key: str) -> str | None: ...
    def set(self, key: str, value: str, description: str = DEFAULT_VARIABLE_DESCRIPTION) -> None: ...
    def delete(self, key: str) -> None: ...


class TaskSdkVariables:
    """Variables through the Task SDK (tasks, triggerer): the ORM is blocked there."""

    def get(self, key: str) -> str | None:
        from airflow.sdk import Variable

        return Variable.get(key, default=None)

    def set(self, key: str, value: str, description: str = DEFAULT_VARIABLE_DESCRIPTION) -> None:
        from airflow.sdk import Variable

        Variable.set(key, value, description=description)

    def delete(self, key: str) -> None:
        from airflow.sdk import Variable

        Variable.delete(key)


class MetadataDbVariables:
    """Variables through the core model (CLI, api-server plugin, plain Python with a DB)."""

    def get(self, key: str) -> str | None:
        from airflow.models.variable import Variable

        return Variable.get(key, default_var=None)

    def set(self, key: str, value: str, description: str = DEFAULT_VARIABLE_DESCRIPTION) -> None:
        from airflow.models.variable import Variable

        Variable.set(key, value, description=description)

    def delete(self, key: str) -> None:
        from airflow.models.variable import Variable

        Variable.delete(key)

    def stored_state(self, key: str) -> str:
        """How the metadata DB holds ``key``: ``absent``, ``encrypted`` or ``plain`` (Airflow had no
        ``[core] fernet_key`` when it wrote it), or ``unreadable`` (present, but this component's
        ``[core] fernet_key`` does not open it: ``Variable.get`` then returns None as if it were absent)."""
        from airflow.models.variable import Variable
        from airflow.utils.session import create_session

        with create_session() as session:
            row = session.query(Variable).filter(Variable.key == key).one_or_none()
            if row is None:
                return "absent"
            if not row.is_encrypted:
                return "plain"
            return "encrypted" if row.val is not None else "unreadable"


def default_variables() -> VariableBackend:
    """The Variable backend for this process."""
    return TaskSdkVariables() if in_task_runtime() else MetadataDbVariables()


def load_connection(conn_id: str) -> Connection:
    """The connection from wherever Airflow keeps it, in every process.

    Inside a task or the triggerer the Task SDK asks the supervisor (the ORM is blocked there).
    Elsewhere (CLI, api-server plugin, plain Python) the SDK would only see environment variables
    and secrets backends, so the core model is used: it also reads the metadata DB.
    """
    if in_task_runtime():
        from airflow.sdk import BaseHook

        return BaseHook.get_connection(conn_id)
    try:
        from airflow.models.connection import Connection as CoreConnection
    except ImportError:  # a worker image without airflow-core
        from airflow.sdk import BaseHook

        return BaseHook.get_connection(conn_id)
    return CoreConnection.get_connection_from_secrets(conn_id)


def process_running(pid: int) -> bool:
    """True while process ``pid`` of this host runs; a zombie (killed, not yet reaped) does not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rpartition(b")")[2].split()[0]
        return state not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        pass  # no /proc: ask the kernel
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
