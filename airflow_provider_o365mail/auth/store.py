"""Where the encrypted token cache lives: one Airflow Variable per connection.

Tasks and triggers cannot write Connections in Airflow 3, but they can write Variables through
the Task SDK; the CLI, the api-server plugin and plain Python use the core Variable model. The
same key is read and written from everywhere, so a rotated refresh token is seen by all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from airflow_provider_o365mail import locks
from airflow_provider_o365mail.auth import crypto
from airflow_provider_o365mail.auth.lease import LeaseTiming, RefreshLease, lease_key
from airflow_provider_o365mail.exceptions import TokenStoreError
from airflow_provider_o365mail.runtime import VariableBackend, default_variables

log = logging.getLogger(__name__)

STORE_FORMAT = 1
#: No word of Airflow's sensitive-names list ("token", "secret", ...) in the key: Airflow masks the
#: value of such a Variable each time it loads it from the database, and every stored version (it
#: changes with every refresh) would become one more pattern of several kB that the api-server's
#: masker recompiles on every new secret and never forgets. The value is encrypted anyway.
STORE_PREFIX = "o365mail_grant_store__"
#: The key before 0.2: read when the new one is empty, moved on the next write (or by re-encryption).
LEGACY_STORE_PREFIX = "o365mail_token_cache__"
__all__ = ["StoredCache", "TokenStore", "fingerprint", "lease_key", "store_key"]


def store_key(conn_id: str) -> str:
    return f"{STORE_PREFIX}{conn_id}"


@dataclass
class StoredCache:
    """What the store holds for one connection (encrypted as a whole).

    ``fence`` is the lease fence of the refresh that wrote it; ``stale_key`` says that an older key
    than the newest was needed to read it (it should be re-encrypted). ``refresh_token_used_at`` is
    when a token response last came back (a refresh, or the consent that issued the grant): Microsoft
    expires a refresh token after 90 days without use, counted from then. Stores written before it
    was recorded have None.
    """

    msal_cache: str
    seed_fingerprint: str | None
    written_at: float
    fence: int = 0
    stale_key: bool = False
    refresh_token_used_at: float | None = None


def fingerprint(secret: str | None) -> str | None:
    return hashlib.sha256(secret.encode()).hexdigest()[:32] if secret else None


class TokenStore:
    """Encrypted MSAL token cache of one connection, in a Variable, with a refresh lock."""

    def __init__(self, conn_id: str, backend: VariableBackend | None = None) -> None:
        self.conn_id = conn_id
        self.key = store_key(conn_id)
        self.legacy_key = f"{LEGACY_STORE_PREFIX}{conn_id}"
        self._legacy_found = False
        self._backend = backend
        self._cipher = None

    def __repr__(self) -> str:
        return f"TokenStore(conn_id={self.conn_id!r}, variable={self.key!r})"

    @property
    def backend(self) -> VariableBackend:
        if self._backend is None:
            self._backend = default_variables()
        return self._backend

    @property
    def cipher(self):
        if self._cipher is None:
            self._cipher = crypto.load_cipher()
        return self._cipher

    def _read(self) -> tuple[str | None, bool]:
        """The stored value, and whether it came from the legacy key."""
        raw = self.backend.get(self.key)
        if raw:
            return raw, False
        legacy = self.backend.get(self.legacy_key)
        self._legacy_found = bool(legacy)
        return (legacy or None), bool(legacy)

    def load(self) -> StoredCache | None:
        try:
            raw, legacy = self._read()
        except Exception as err:
            raise TokenStoreError(
                f"Cannot read the token store Variable {self.key!r}: {type(err).__name__}. Check that this "
                "Airflow component can reach the metadata database or the API server."
            ) from err
        if not raw:
            return None
        plaintext, stale = crypto.decrypt_stale(self.cipher, raw, f"Variable {self.key!r}")
        stale = stale or legacy  # re-encryption moves it to the new key
        data = json.loads(plaintext)
        if data.get("format") != STORE_FORMAT:
            raise TokenStoreError(
                f"The token store Variable {self.key!r} has format {data.get('format')!r}, this provider "
                f"reads format {STORE_FORMAT}. Upgrade the provider on every component, or run "
                f"'airflow o365mail forget --conn-id {self.conn_id}' and authorize again."
            )
        used_at = data.get("refresh_token_used_at")
        return StoredCache(
            data["msal_cache"],
            data.get("seed_fingerprint"),
            data["written_at"],
            int(data.get("fence") or 0),
            stale,
            float(used_at) if used_at else None,
        )

    def save(
        self, msal_cache: str, seed_fingerprint: str | None, fence: int = 0, *, used_at: float | None = None
    ) -> None:
        """Write the cache; it came from a token response, so the refresh token's last use is now (or ``used_at``)."""
        now = time.time()
        payload = json.dumps(
            {
                "format": STORE_FORMAT,
                "msal_cache": msal_cache,
                "seed_fingerprint": seed_fingerprint,
                "written_at": now,
                "fence": fence,
                "refresh_token_used_at": used_at if used_at is not None else now,
            }
        )
        try:
            self.backend.set(self.key, crypto.encrypt(self.cipher, payload.encode()))
        except Exception as err:
            raise TokenStoreError(
                f"Cannot write the token store Variable {self.key!r}: {type(err).__name__}. The new refresh "
                "token is lost for other workers; check the API server / metadata database."
            ) from err
        if self._legacy_found:
            self._drop_legacy()

    def _drop_legacy(self) -> None:
        with contextlib.suppress(Exception):  # a leftover is read only while the new key is empty
            self.backend.delete(self.legacy_key)
            self._legacy_found = False

    def forget(self) -> None:
        with contextlib.suppress(Exception):
            self.backend.delete(self.key)
        self._drop_legacy()

    def reencrypt(self) -> bool:
        """Write the store again under the newest key if an older one was needed; True if it was.

        Call it holding :meth:`refresh_lock`: it reads, then writes, and must not overwrite a
        refresh that lands in between.
        """
        try:
            raw, legacy = self._read()
        except Exception as err:
            raise TokenStoreError(f"Cannot read the token store Variable {self.key!r}: {type(err).__name__}.") from err
        if not raw:
            return False
        _, stale = crypto.decrypt_stale(self.cipher, raw, f"Variable {self.key!r}")
        if not stale and not legacy:
            return False
        self.backend.set(self.key, crypto.reencrypt(self.cipher, raw) if stale else raw)
        if legacy:
            self._drop_legacy()
            log.info("Token store of %s moved from %s to %s.", self.conn_id, self.legacy_key, self.key)
        if stale:
            log.info("Token store %s re-encrypted with the newest key.", self.key)
        return True

    # ------------------------------------------------------------------ refresh lock
    def lease(self, timing: LeaseTiming | None = None) -> RefreshLease:
        """The cross-host refresh lease of this connection (see :mod:`.lease` for what it guarantees)."""
        return RefreshLease(self.backend, self.conn_id, timing or LeaseTiming.configured(30.0))

    @contextlib.contextmanager
    def host_lock(self, timeout: float = 60.0) -> Iterator[None]:
        """Serialise refreshes of this connection on this host: an exclusive ``flock`` (exact)."""
        with contextlib.ExitStack() as stack:
            try:
                # The lock file keeps the pre-0.2 name: both versions serialise on a host during an upgrade.
                stack.enter_context(locks.host_lock(self.legacy_key, timeout))
            except locks.LockDirError as err:
                raise TokenStoreError(
                    f"Cannot create the refresh lock file in {err.lock_dir} ({err.reason}): "
                    + (
                        "O365MAIL_LOCK_DIR names a directory that is missing or not writable by this user. Create "
                        "it (mode 0700, owned by the Airflow user) or unset O365MAIL_LOCK_DIR to use the temp "
                        "directory."
                        if err.configured
                        else "the temp directory is not writable. Set O365MAIL_LOCK_DIR to a writable directory."
                    )
                ) from None
            except locks.LockTimeout:
                raise TokenStoreError(
                    f"Waited {timeout:.0f} s for another process refreshing {self.conn_id!r}; "
                    "it may be stuck on the identity provider. Retry the task."
                ) from None
            yield

    @contextlib.contextmanager
    def refresh_lock(self, timeout: float = 60.0, timing: LeaseTiming | None = None) -> Iterator[RefreshLease]:
        """Host lock, then the cross-host lease (held and renewed until the block ends)."""
        with self.host_lock(timeout):
            lease = self.lease(timing)
            lease.acquire(time.monotonic() + timeout)
            try:
                yield lease
            finally:
                lease.release()
