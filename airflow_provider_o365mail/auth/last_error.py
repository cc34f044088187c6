"""The last permanent token error of a connection, for the UI page (no secrets: our messages carry none)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any

from airflow_provider_o365mail.runtime import default_variables

log = logging.getLogger(__name__)
DESCRIPTION = "airflow-provider-o365mail: last permanent token error of the connection"


def _key(conn_id: str) -> str:
    return f"o365mail_last_error__{conn_id}"


def record_last_error(conn_id: str, error: BaseException) -> None:
    """Best effort: a failure to record must never hide the error itself."""
    payload = json.dumps({"at": time.time(), "error": type(error).__name__, "message": str(error)[:1000]})
    try:
        default_variables().set(_key(conn_id), payload, description=DESCRIPTION)
    except Exception as err:
        log.debug("Could not record the last error of %s: %s", conn_id, err)


def last_error_record(conn_id: str) -> dict[str, Any] | None:
    """``{"at": epoch seconds, "error": class name, "message": ...}``, or None if none is recorded."""
    try:
        raw = default_variables().get(_key(conn_id))
    except Exception:
        return None
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def read_last_error(conn_id: str) -> str | None:
    data = last_error_record(conn_id)
    if data is None:
        return None
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(data.get("at", 0)))
    return f"{when}: {data.get('error')}: {data.get('message')}"


def clear_last_error(conn_id: str) -> None:
    with contextlib.suppress(Exception):
        default_variables().delete(_key(conn_id))
