"""Where the encrypted token cache lives: one Airflow Variable per connection.

Tasks and triggers cannot write Connections in Airflow 3, but they can write Variables through
the Task SDK; the CLI, the api-server plugin and plain Python use the core Variable model. The
same key is read and written from everywhere, so a rotated refresh token is seen by all.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from airflow_provider_o365mail.auth import crypto
from airflow_provider_o365mail.exceptions import TokenStoreError

log = logging.getLogger(__name__)

STORE_FORMAT = 1


def store_key(conn_id: str) -> str:
    return f"o365mail_token_cache__{conn_id}"


def lease_key(conn_id: str) -> str:
    return f"o365mail_refresh_lease__{conn_id}"


STORE_DESCRIPTION = "airflow-provider-o365mail: encrypted, do not edit"


class VariableBackend(Protocol):
    def get(self, key: str) -> str | None: ...
    def set(self, key: str, value: str, description: str = STORE_DESCRIPTION) -> None: ...
    def delete(self, key: str) -> None: ...


def _in_task_runtime() -> bool:
    """True inside a task or the triggerer, where the Task SDK talks to a supervisor."""
    try:
        from airflow.sdk.execution_time import task_runner
    except ImportError:
        return False
    return getattr(task_runner, "SUPERVISOR_COMMS", None) is not None


class TaskSdkVariables:
    """Variables through the Task SDK (tasks, triggerer): the ORM is blocked there."""

    def get(self, key: str) -> str | None:
        from airflow.sdk import Variable

        return Variable.get(key, default=None)

    def set(self, key: str, value: str, description: str = STORE_DESCRIPTION) -> None:
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

    def set(self, key: str, value: str, description: str = STORE_DESCRIPTION) -> None:
        from airflow.models.variable import Variable

        Variable.set(key, value, description=description)

    def delete(self, key: str) -> None:
        from airflow.models.variable import Variable

        Variable.delete(key)


def default_backend() -> VariableBackend:
    return TaskSdkVariables() if _in_task_runtime() else MetadataDbVariables()


@dataclass
class StoredCache:
    """What the store holds for one connection (encrypted as a whole)."""

    msal_cache: str
    seed_fingerprint: str | None
    written_at: float


def fingerprint(secret: str | None) -> str | None:
    return hashlib.sha256(secret.encode()).hexdigest()[:32] if secret else None


class TokenStore:
    """Encrypted MSAL token cache of one connection, in a Variable, with a refresh lock."""

    def __init__(self, conn_id: str, backend: VariableBackend | None = None) -> None:
        self.conn_id = conn_id
        self.key = store_key(conn_id)
        self._backend = backend
        self._cipher = None

    def __repr__(self) -> str:
        return f"TokenStore(conn_id={self.conn_id!r}, variable={self.key!r})"

    @property
    def backend(self) -> VariableBackend:
        if self._backend is None:
            self._backend = default_backend()
        return self._backend

    @property
    def cipher(self):
        if self._cipher is None:
            self._cipher = crypto.load_cipher()
        return self._cipher

    def load(self) -> StoredCache | None:
        try:
            raw = self.backend.get(self.key)
        except Exception as err:
            raise TokenStoreError(
                f"Cannot read the token store Variable {self.key!r}: {type(err).__name__}. Check that this "
                "Airflow component can reach the metadata database or the API server."
            ) from err
        if not raw:
            return None
        data = json.loads(crypto.decrypt(self.cipher, raw, f"Variable {self.key!r}"))
        if data.get("format") != STORE_FORMAT:
            raise TokenStoreError(
                f"The token store Variable {self.key!r} has format {data.get('format')!r}, this provider "
                f"reads format {STORE_FORMAT}. Upgrade the provider on every component, or run "
                f"'airflow o365mail forget --conn-id {self.conn_id}' and authorize again."
            )
        return StoredCache(data["msal_cache"], data.get("seed_fingerprint"), data["written_at"])

    def save(self, msal_cache: str, seed_fingerprint: str | None) -> None:
        payload = json.dumps(
            {
                "format": STORE_FORMAT,
                "msal_cache": msal_cache,
                "seed_fingerprint": seed_fingerprint,
                "written_at": time.time(),
            }
        )
        try:
            self.backend.set(self.key, crypto.encrypt(self.cipher, payload.encode()))
        except Exception as err:
            raise TokenStoreError(
                f"Cannot write the token store Variable {self.key!r}: {type(err).__name__}. The new refresh "
                "token is lost for other workers; check the API server / metadata database."
            ) from err

    def forget(self) -> None:
        with contextlib.suppress(Exception):
            self.backend.delete(self.key)

    # ------------------------------------------------------------------ refresh lock
    @contextlib.contextmanager
    def refresh_lock(self, timeout: float = 60.0) -> Iterator[None]:
        """Serialise refreshes of this connection.

        Same host: an exclusive ``flock`` (exact). Across hosts: a lease Variable written, then
        read back after a short pause (best effort: the Variable API has no compare-and-swap).
        """
        lock_dir = Path(os.environ.get("O365MAIL_LOCK_DIR", tempfile.gettempdir()))
        name = hashlib.sha256(self.key.encode()).hexdigest()[:24]
        path = lock_dir / f"airflow-o365mail-{name}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TokenStoreError(
                            f"Waited {timeout:.0f} s for another process refreshing {self.conn_id!r}; "
                            "it may be stuck on the identity provider. Retry the task."
                        ) from None
                    time.sleep(0.05)
            with self._lease(deadline):
                yield
        finally:
            os.close(fd)  # releases the flock

    @contextlib.contextmanager
    def _lease(self, deadline: float, ttl: float = 60.0, settle: float = 0.15) -> Iterator[None]:
        key = lease_key(self.conn_id)
        me = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        held = False
        try:
            while True:
                current = self._read_lease(key)
                if current is None or current.get("until", 0) < time.time():
                    self.backend.set(key, json.dumps({"owner": me, "until": time.time() + ttl}))
                    time.sleep(settle)
                    current = self._read_lease(key)
                    if current is not None and current.get("owner") == me:
                        held = True
                        break
                if time.monotonic() > deadline:
                    log.warning(
                        "Refresh lease for %s still held by %s; refreshing anyway.",
                        self.conn_id,
                        (current or {}).get("owner"),
                    )
                    break
                time.sleep(0.1 + random.random() * 0.2)  # noqa: S311 - jitter, not crypto
            yield
        finally:
            if held:
                with contextlib.suppress(Exception):
                    self.backend.delete(key)

    def _read_lease(self, key: str) -> dict | None:
        try:
            raw = self.backend.get(key)
            return json.loads(raw) if raw else None
        except (ValueError, TypeError):
            return None
