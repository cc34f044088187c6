"""Encryption of the token store at rest (Fernet / MultiFernet from ``cryptography``).

Two schemes, chosen by configuration:

1. ``[core] fernet_key`` only (the default): **envelope encryption**. Each connection's store is
   encrypted with its own random data key (a Fernet key) kept in an Airflow Variable of its own
   (``auth/store.py``). Airflow encrypts that Variable with ``[core] fernet_key`` like any other, so
   Airflow's own ``airflow rotate-fernet-key`` re-encrypts the data key and the store needs nothing
   else: the documented procedure (``new,old``, ``airflow rotate-fernet-key``, drop ``old``) leaves it
   readable. Keys derived (HKDF-SHA256) from the ``[core] fernet_key`` list are what stores written
   before 0.2 used: they still open those (:func:`load_cipher`), which then move to a data key.
2. ``[o365mail] token_cache_keys``: comma-separated Fernet keys the user manages
   (``AIRFLOW__O365MAIL__TOKEN_CACHE_KEYS``); generate one with
   ``python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"``.
   The first encrypts, all decrypt; a ciphertext that only an older key opens is reported as stale
   by :func:`decrypt_stale`, :func:`reencrypt` writes it again under the newest key
   (``MultiFernet.rotate``): the token store does that on read, ``airflow o365mail rotate-keys`` for
   every store.

Consent flows in progress (ten minutes at most) are encrypted with :func:`load_cipher`: keys
derived from ``[core] fernet_key``, or ``token_cache_keys``.
"""

from __future__ import annotations

import base64

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from airflow_provider_o365mail.exceptions import TokenStoreError

HKDF_INFO = b"airflow-provider-o365mail token store v1"


class StoreUndecryptable(TokenStoreError):
    """No configured key opens the ciphertext (key rotated and the old one removed, or keys differ)."""


def _derive(fernet_key: str) -> bytes:
    material = base64.urlsafe_b64decode(fernet_key.encode())
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=HKDF_INFO).derive(material)
    return base64.urlsafe_b64encode(derived)


def _configured(section: str, key: str) -> str:
    from airflow_provider_o365mail.version_compat import conf

    return (conf.get(section, key, fallback="") or "").strip()


def load_cipher() -> MultiFernet:
    """The MultiFernet for the token store, or a TokenStoreError that says how to configure one."""
    own = [k.strip() for k in _configured("o365mail", "token_cache_keys").split(",") if k.strip()]
    try:
        if own:
            return StoreCipher([Fernet(k) for k in own])
        core = [k.strip() for k in _configured("core", "fernet_key").split(",") if k.strip()]
        if core:
            return StoreCipher([Fernet(_derive(k)) for k in core], derived=True)
    except (ValueError, TypeError) as err:
        raise TokenStoreError(
            "A token store key is not a valid Fernet key (32 url-safe base64-encoded bytes). Check "
            "[o365mail] token_cache_keys or [core] fernet_key."
        ) from err
    raise TokenStoreError(
        "No key to encrypt the token store: set [o365mail] token_cache_keys "
        "(AIRFLOW__O365MAIL__TOKEN_CACHE_KEYS) or [core] fernet_key to the same value on every Airflow "
        "component (workers, triggerer, api-server, scheduler)."
    )


def encrypt(cipher: MultiFernet, plaintext: bytes) -> str:
    return cipher.encrypt(plaintext).decode()


class StoreCipher(MultiFernet):
    """A MultiFernet that also knows its newest key (to tell a stale ciphertext).

    ``derived``: its keys are derived from ``[core] fernet_key`` (no ``token_cache_keys``): the token
    store then encrypts with a data key of its own and uses these only to open older stores.
    """

    def __init__(self, fernets: list[Fernet], *, derived: bool = False) -> None:
        super().__init__(fernets)
        self.primary = fernets[0]
        self.key_count = len(fernets)
        self.derived = derived


def new_data_key() -> str:
    """A random Fernet key for one connection's store (32 random bytes, url-safe base64)."""
    return Fernet.generate_key().decode()


def data_key_cipher(value: str) -> Fernet | None:
    """The Fernet for a stored data key, or None if ``value`` is not a Fernet key (edited by hand)."""
    try:
        return Fernet(value.strip().encode())
    except (ValueError, TypeError):
        return None


def try_decrypt(cipher: Fernet | MultiFernet, token: str) -> bytes | None:
    """The plaintext, or None if ``cipher`` does not open ``token``."""
    try:
        return cipher.decrypt(token.encode())
    except InvalidToken:
        return None


def decrypt_stale(cipher: MultiFernet, token: str, where: str) -> tuple[bytes, bool]:
    """The plaintext, and whether an older key than the newest was needed (re-encrypt it)."""
    plaintext = decrypt(cipher, token, where)
    primary = getattr(cipher, "primary", None)
    if primary is None:
        return plaintext, False
    try:
        primary.decrypt(token.encode())
    except InvalidToken:
        return plaintext, True
    return plaintext, False


def reencrypt(cipher: MultiFernet, token: str) -> str:
    """``token`` under the newest key (its timestamp kept); raises like :func:`decrypt`."""
    try:
        return cipher.rotate(token.encode()).decode()
    except InvalidToken:
        raise StoreUndecryptable("The token store cannot be decrypted with the configured keys.") from None


def decrypt(cipher: MultiFernet, token: str, where: str) -> bytes:
    try:
        return cipher.decrypt(token.encode())
    except InvalidToken:
        raise StoreUndecryptable(
            f"The token store {where} cannot be decrypted with the configured keys: it was written under a key "
            "this component does not have (the key was rotated and the old one removed before "
            "'airflow o365mail rotate-keys' ran, or components are configured with different keys). To keep the "
            "newest refresh token, put the old key back second ([o365mail] token_cache_keys = new,old) and run "
            "'airflow o365mail rotate-keys'. Without it the connection's own refresh token is used, or run "
            "'airflow o365mail forget' and authorize again."
        ) from None
