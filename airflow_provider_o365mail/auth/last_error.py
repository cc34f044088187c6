"""The last permanent token error of a connection, for the UI page (no secrets: our messages carry none)."""

from __future__ import annotations

import contextlib
import json
import logging
import time

from airflow_provider_o365mail.auth.store import default_backend

log = logging.getLogger(__name__)
DESCRIPTION = "airflow-provider-o365mail: last permanent token error of the connection"


def _key(conn_id: str) -> str:
    return f"o365mail_last_error__{conn_id}"


def record_last_error(conn_id: str, error: BaseException) -> None:
    """Best effort: a failure to record must never hide the error itself."""
    payload = json.dumps({"at": time.time(), "error": type(error).__name__, "message": str(error)[:1000]})
    try:
        default_backend().set(_key(conn_id), payload, description=DESCRIPTION)
    except Exception as err:
        log.debug("Could not record the last error of %s: %s", conn_id, err)


def read_last_error(conn_id: str) -> str | None:
    try:
        raw = default_backend().get(_key(conn_id))
    except Exception:
        return None
    if not raw:
        return None
    data = json.loads(raw)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(data.get("at", 0)))
    return f"{when}: {data.get('error')}: {data.get('message')}"


def clear_last_error(conn_id: str) -> None:
    with contextlib.suppress(Exception):
        default_backend().delete(_key(conn_id))
