"""Where the encrypted token cache lives: one Airflow Variable per connection.

Tasks and triggers cannot write Connections in Airflow 3, but they can write Variables through
the Task SDK; the CLI, the api-server plugin and plain Python use the core Variable model. The
same key is read and written from everywhere, so a rotated refresh token is seen by all.

Encryption (see :mod:`.crypto`): without ``[o365mail] token_cache_keys`` each store is encrypted
with a data key of its own, a random Fernet key in the Variable ``o365mail_store_secret__<conn_id>``
that Airflow encrypts with ``[core] fernet_key`` (so ``airflow rotate-fernet-key`` rotates it) and
redacts in its UI and API ("secret" in the name). The data key is created only while holding the
connection's refresh lock and read back, so there is one per connection; it never changes until
``forget`` deletes it. A store written before 0.2 (keys derived from ``[core] fernet_key``) still
opens and is moved to the data key on the next write or re-encryption.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography.fernet import Fernet

from airflow_provider_o365mail import locks
from airflow_provider_o365mail.auth import crypto
from airflow_provider_o365mail.auth.lease import LeaseTiming, RefreshLease, lease_key
from airflow_provider_o365mail.auth.masking import mask
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
#: The data key of a store. "secret" is on Airflow's sensitive-names list on purpose: the API and UI
#: show its value as ``***`` and every process that loads it masks it (one short value that never
#: changes). Not a prefix of the store's key either: a LIKE 'o365mail_grant_store__%' must not match it.
DATA_KEY_PREFIX = "o365mail_store_secret__"
DATA_KEY_DESCRIPTION = (
    "airflow-provider-o365mail: data key of the token store {store} (encrypted by Airflow, rotated by "
    "'airflow rotate-fernet-key'). Do not edit or delete: the store could not be read any more."
)
__all__ = ["StoredCache", "TokenStore", "data_key_name", "fingerprint", "lease_key", "store_key"]


def store_key(conn_id: str) -> str:
    return f"{STORE_PREFIX}{conn_id}"


def data_key_name(conn_id: str) -> str:
    return f"{DATA_KEY_PREFIX}{conn_id}"


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
        self.data_key = data_key_name(conn_id)
        self._legacy_found = False
        self._backend = backend
        self._cipher = None
        self._data_fernet: Fernet | None = None  # the data key as last read (it changes only on forget)

    def __repr__(self) -> str:
        return f"TokenStore(conn_id={self.conn_id!r}, variable={self.key!r})"

    @property
    def backend(self) -> VariableBackend:
        if self._backend is None:
            self._backend = default_variables()
        return self._backend

    @property
    def cipher(self):
        """The configured keys: ``token_cache_keys``, or those derived from ``[core] fernet_key``
        (then they only open stores written before 0.2); a TokenStoreError if neither is set."""
        if self._cipher is None:
            self._cipher = crypto.load_cipher()
        return self._cipher

    @property
    def uses_data_key(self) -> bool:
        """True unless ``[o365mail] token_cache_keys`` is set (the user manages the store's keys)."""
        return bool(getattr(self.cipher, "derived", False))

    # ------------------------------------------------------------------ data key
    def _fetch_data_key(self) -> tuple[Fernet | None, str]:
        """The data key as stored now, or None and why (``missing`` or ``invalid``)."""
        try:
            value = self.backend.get(self.data_key)
        except Exception as err:
            raise TokenStoreError(
                f"Cannot read the token store's data key Variable {self.data_key!r}: {type(err).__name__}. Check "
                "that this Airflow component can reach the metadata database or the API server."
            ) from err
        if not value:
            return None, "missing"
        mask(value.strip())
        fernet = crypto.data_key_cipher(value)
        if fernet is None:
            return None, "invalid"
        self._data_fernet = fernet
        return fernet, ""

    def _writable_data_key(self) -> Fernet:
        """The data key, created if there is none. Call it holding :meth:`refresh_lock` (one key per store)."""
        fernet, why = self._fetch_data_key()
        if fernet is not None:
            return fernet
        stored_state = getattr(self.backend, "stored_state", None)
        if why == "missing" and stored_state is not None and stored_state(self.data_key) == "unreadable":
            raise TokenStoreError(
                f"The token store's data key Variable {self.data_key!r} exists but this component cannot decrypt "
                "it: its [core] fernet_key does not include the key Airflow encrypted it with. Give every Airflow "
                "component the same [core] fernet_key (during a rotation: new,old). Not replacing the data key, "
                "which would make the store unreadable for every other component."
            )
        if why == "invalid":
            log.warning(
                "The data key Variable %s is not a Fernet key (edited by hand?); replacing it. The store it "
                "encrypted cannot be read any more.",
                self.data_key,
            )
        try:
            self.backend.set(
                self.data_key, crypto.new_data_key(), description=DATA_KEY_DESCRIPTION.format(store=self.key)
            )
            fernet, why = self._fetch_data_key()  # what every other process will read
        except TokenStoreError:
            raise
        except Exception as err:
            raise TokenStoreError(
                f"Cannot write the token store's data key Variable {self.data_key!r}: {type(err).__name__}. Check "
                "the API server / metadata database."
            ) from err
        if fernet is None:
            raise TokenStoreError(
                f"Wrote the token store's data key Variable {self.data_key!r} but read back {why} (a secrets "
                "backend or an AIRFLOW_VAR_ environment variable shadows it?). Remove what shadows it."
            )
        log.info("Created the data key of the token store of %s (Variable %s).", self.conn_id, self.data_key)
        return fernet

    def prepare_write(self) -> None:
        """Make sure :meth:`save` will have a key, before a token request whose answer it must keep.

        Call it holding :meth:`refresh_lock`. A data key that cannot be created (this component cannot
        decrypt the existing one, a Variable shadows it) fails here, before a refresh token is redeemed.
        """
        if self.uses_data_key:
            self._writable_data_key()

    def data_key_state(self) -> str:
        """How the metadata DB holds the data key (``absent``, ``encrypted``, ``plain``, ``unreadable``),
        or ``unknown`` where this process cannot tell (Task SDK) or ``[o365mail] token_cache_keys`` is set."""
        stored_state = getattr(self.backend, "stored_state", None)
        if not self.uses_data_key or stored_state is None:
            return "unknown"
        return stored_state(self.data_key)

    def _open(self, raw: str) -> tuple[bytes, bool]:
        """The plaintext of ``raw``, and whether it must be written again (under the data key or the newest key)."""
        where = f"Variable {self.key!r}"
        if not self.uses_data_key:
            return crypto.decrypt_stale(self.cipher, raw, where)
        cached = self._data_fernet
        if cached is not None and (plaintext := crypto.try_decrypt(cached, raw)) is not None:
            return plaintext, False
        fernet, why = self._fetch_data_key()  # none yet, or replaced since (forget, then a new consent)
        if fernet is not None and (plaintext := crypto.try_decrypt(fernet, raw)) is not None:
            return plaintext, False
        plaintext = crypto.try_decrypt(self.cipher, raw)  # written before 0.2: keys derived from the fernet key
        if plaintext is not None:
            return plaintext, True
        raise crypto.StoreUndecryptable(self._undecryptable(why))

    def _undecryptable(self, why: str) -> str:
        cause = {
            "": f"its data key (Variable {self.data_key!r}) does not open it (the data key was replaced, or the "
            "store edited)",
            "invalid": f"its data key Variable {self.data_key!r} does not hold a Fernet key (edited by hand?)",
            "missing": f"its data key Variable {self.data_key!r} is missing (deleted, or this component's "
            '[core] fernet_key does not decrypt it: Airflow logs "Can\'t decrypt _val")',
        }[why]
        return (
            f"The token store Variable {self.key!r} cannot be decrypted: {cause}, and no key derived from "
            "[core] fernet_key opens it either (those open stores written before 0.2). Give every Airflow "
            "component the same [core] fernet_key. A store written before 0.2 whose key was removed: put the old "
            "key back second ([core] fernet_key = new,old) and run 'airflow o365mail rotate-keys'. Otherwise the "
            "connection's own refresh token is used, or run "
            f"'airflow o365mail forget --conn-id {self.conn_id}' and authorize again."
        )

    def _seal(self, plaintext: bytes) -> str:
        """``plaintext`` encrypted for the store: under the data key, or the newest ``token_cache_keys``."""
        if self.uses_data_key:
            return self._writable_data_key().encrypt(plaintext).decode()
        return crypto.encrypt(self.cipher, plaintext)

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
        plaintext, stale = self._open(raw)
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
        """Write the cache; it came from a token response, so the refresh token's last use is now (or ``used_at``).

        Call it holding :meth:`refresh_lock`: the first write creates the data key.
        """
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
        sealed = self._seal(payload.encode())
        try:
            self.backend.set(self.key, sealed)
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
        """Delete the store, then its data key (the next consent or refresh creates a new one)."""
        with contextlib.suppress(Exception):
            self.backend.delete(self.key)
        self._drop_legacy()
        with contextlib.suppress(Exception):
            self.backend.delete(self.data_key)
        self._data_fernet = None

    def reencrypt(self) -> bool:
        """Write the store again under its data key (or the newest ``token_cache_keys``) if it was
        written under an older key, or sits under the pre-0.2 Variable name; True if it was.

        Call it holding :meth:`refresh_lock`: it reads, then writes, and must not overwrite a
        refresh that lands in between.
        """
        try:
            raw, legacy = self._read()
        except Exception as err:
            raise TokenStoreError(f"Cannot read the token store Variable {self.key!r}: {type(err).__name__}.") from err
        if not raw:
            return False
        plaintext, stale = self._open(raw)
        if not stale and not legacy:
            return False
        if stale:
            raw = self._seal(plaintext) if self.uses_data_key else crypto.reencrypt(self.cipher, raw)
        self.backend.set(self.key, raw)
        if legacy:
            self._drop_legacy()
            log.info("Token store of %s moved from %s to %s.", self.conn_id, self.legacy_key, self.key)
        if stale:
            log.info(
                "Token store %s re-encrypted %s.",
                self.key,
                f"under its data key ({self.data_key})" if self.uses_data_key else "with the newest key",
            )
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
