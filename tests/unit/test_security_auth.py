"""Issue #15 / #11 unit regressions in auth/ and tls.py: lease, key rotation, masking, TLS, architecture."""

from __future__ import annotations

import base64
import random
import re
import ssl
import threading
import time
from pathlib import Path

import pytest
import requests
from cryptography.fernet import Fernet

import airflow_provider_o365mail
from airflow_provider_o365mail.auth import crypto
from airflow_provider_o365mail.auth.lease import LeaseTiming, RefreshLease
from airflow_provider_o365mail.auth.store import TokenStore
from airflow_provider_o365mail.exceptions import ConnectionConfigError, TokenStoreError
from airflow_provider_o365mail.tls import IdentityProviderSession, client_ssl_context, is_certificate_error

PACKAGE = Path(airflow_provider_o365mail.__file__).parent  # the installed package (a wheel in the compat job)


class MemoryVariables:
    """A last-writer-wins register per key, with an optional write delay (the API server's latency)."""

    def __init__(self, write_delay: tuple[float, float] = (0.0, 0.0)) -> None:
        self.values: dict[str, str] = {}
        self.write_delay = write_delay
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            return self.values.get(key)

    def set(self, key: str, value: str, description: str = "") -> None:
        time.sleep(random.uniform(*self.write_delay))
        with self._lock:
            self.values[key] = value

    def delete(self, key: str) -> None:
        with self._lock:
            self.values.pop(key, None)


# ---------------------------------------------------------------------- lease
def test_claims_with_slow_writes_never_both_win():
    """Writes land up to 0.3 s late; the settle (0.5 s) is longer, so at most one claimant holds the lease.
    With the old 0.15 s settle both win in most rounds."""
    for _ in range(5):
        backend = MemoryVariables(write_delay=(0.0, 0.3))
        timing = LeaseTiming(ttl=30, settle=0.5)
        leases = [RefreshLease(backend, "c", timing) for _ in range(4)]
        holders: list[RefreshLease] = []
        barrier = threading.Barrier(len(leases))

        def claim(lease: RefreshLease) -> None:
            barrier.wait()
            try:
                if lease.acquire(time.monotonic() + 1.2):
                    holders.append(lease)
            except TokenStoreError:
                pass

        threads = [threading.Thread(target=claim, args=(lease,)) for lease in leases]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            assert len(holders) == 1, [h.owner for h in holders]
        finally:
            for lease in leases:
                lease.release()


def test_a_held_lease_is_renewed_past_its_ttl_and_others_wait():
    backend = MemoryVariables()
    timing = LeaseTiming(ttl=0.8, settle=0.05)
    holder = RefreshLease(backend, "c", timing)
    assert holder.acquire(time.monotonic() + 1)
    time.sleep(2.0)  # 2.5 ttls
    assert holder.still_held(0.3), "renewed while held"
    other = RefreshLease(backend, "c", timing)
    with pytest.raises(TokenStoreError, match="refreshing the token"):
        other.acquire(time.monotonic() + 1.0)
    holder.release()
    assert other.acquire(time.monotonic() + 1.0) and other.fence > holder_fence(backend, other)
    other.release()


def holder_fence(backend: MemoryVariables, lease: RefreshLease) -> int:
    return (lease.fence or 1) - 1


def test_a_lost_lease_is_noticed_before_the_next_request():
    backend = MemoryVariables()
    holder = RefreshLease(backend, "c", LeaseTiming(ttl=0.4, settle=0.0))
    assert holder.acquire(time.monotonic() + 1)
    backend.values[holder.key] = '{"owner": "someone else", "fence": 99, "until": 1e12}'
    time.sleep(0.3)
    assert not holder.still_held()
    holder.release()
    assert backend.values[holder.key].startswith('{"owner": "someone else"'), "release never drops another's lease"


def test_still_held_needs_room_for_the_request():
    holder = RefreshLease(MemoryVariables(), "c", LeaseTiming(ttl=10, settle=0.0))
    assert holder.acquire(time.monotonic() + 1)
    assert holder.still_held(5) and not holder.still_held(11)
    holder.release()


def test_the_ttl_always_outlives_one_request():
    assert LeaseTiming.configured(30.0).ttl >= 60.0
    assert LeaseTiming.configured(45.0).ttl >= 90.0


def test_missing_lock_dir_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("O365MAIL_LOCK_DIR", str(tmp_path / "missing"))
    lock = TokenStore("c", backend=MemoryVariables()).host_lock()
    with pytest.raises(TokenStoreError, match="O365MAIL_LOCK_DIR names a directory that is missing"), lock:
        pass


# ---------------------------------------------------------------------- key rotation
def test_a_store_read_with_an_older_key_is_reencrypted(monkeypatch):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    backend = MemoryVariables()
    monkeypatch.setenv("AIRFLOW__O365MAIL__TOKEN_CACHE_KEYS", old)
    TokenStore("c", backend=backend).save("{}", "seed", fence=3)
    monkeypatch.setenv("AIRFLOW__O365MAIL__TOKEN_CACHE_KEYS", f"{new},{old}")
    store = TokenStore("c", backend=backend)
    loaded = store.load()
    assert loaded.stale_key and loaded.fence == 3
    assert store.reencrypt() is True and store.reencrypt() is False
    monkeypatch.setenv("AIRFLOW__O365MAIL__TOKEN_CACHE_KEYS", new)
    fresh = TokenStore("c", backend=backend).load()
    assert fresh.seed_fingerprint == "seed" and not fresh.stale_key


def test_the_store_key_is_not_one_airflow_masks_and_the_old_key_moves_over():
    """Airflow masks the value of a Variable whose key has a sensitive word ("token") each time it
    loads it: every stored version would pile up in the api-server's masker. The old key moves over."""
    from airflow._shared.secrets_masker import _secrets_masker

    from airflow_provider_o365mail.auth.store import LEGACY_STORE_PREFIX

    store = TokenStore("c", backend=MemoryVariables())
    assert not _secrets_masker().should_hide_value_for_key(store.key)
    assert _secrets_masker().should_hide_value_for_key(f"{LEGACY_STORE_PREFIX}c"), "why it was renamed"

    backend = MemoryVariables()
    TokenStore("c", backend=backend).save("{}", "seed", fence=2)
    backend.values[f"{LEGACY_STORE_PREFIX}c"] = backend.values.pop(store.key)  # a store written before 0.2
    old = TokenStore("c", backend=backend)
    loaded = old.load()
    assert loaded.seed_fingerprint == "seed" and loaded.fence == 2 and loaded.stale_key, "read, marked to move"
    assert old.reencrypt() is True and set(backend.values) == {store.key, store.data_key}
    moved = TokenStore("c", backend=backend).load()
    assert moved.fence == 2 and not moved.stale_key

    backend.values[f"{LEGACY_STORE_PREFIX}c"] = backend.values.pop(store.key)
    writer = TokenStore("c", backend=backend)
    writer.load()
    writer.save("{}", "seed", fence=3)  # a refresh moves it too
    assert set(backend.values) == {store.key, store.data_key}


def test_an_undecryptable_store_names_the_cause_and_the_command(monkeypatch):
    monkeypatch.setenv("AIRFLOW__O365MAIL__TOKEN_CACHE_KEYS", Fernet.generate_key().decode())
    with pytest.raises(crypto.StoreUndecryptable, match="rotate-keys") as err:
        crypto.decrypt(crypto.load_cipher(), Fernet(Fernet.generate_key()).encrypt(b"x").decode(), "test")
    assert "key was rotated and the old one removed" in str(err.value)


# ---------------------------------------------------------------------- data key (envelope encryption)
FERNET_A, FERNET_B = Fernet.generate_key().decode(), Fernet.generate_key().decode()


@pytest.fixture
def core_fernet_key(monkeypatch):
    """No [o365mail] token_cache_keys: the store's keys come from [core] fernet_key (the default setup)."""
    monkeypatch.delenv("AIRFLOW__O365MAIL__TOKEN_CACHE_KEYS", raising=False)

    def use(*keys: str) -> None:
        monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", ",".join(keys))

    use(FERNET_A)
    return use


class RecordingVariables(MemoryVariables):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def set(self, key: str, value: str, description: str = "") -> None:
        self.writes.append(key)
        super().set(key, value, description)


def test_a_store_opens_with_its_data_key_whatever_the_fernet_key_becomes(core_fernet_key):
    """The data key sits in a Variable Airflow encrypts (and rotate-fernet-key rotates): the store itself
    depends on [core] fernet_key only through Airflow's own layer (absent in this in-memory backend)."""
    backend = RecordingVariables()
    store = TokenStore("c", backend=backend)
    store.save('{"x": 1}', "seed", fence=4)
    raw, data_key = backend.values[store.key], backend.values[store.data_key]
    assert Fernet(data_key.encode()).decrypt(raw.encode()), "sealed with the data key"
    assert crypto.try_decrypt(crypto.load_cipher(), raw) is None, "not with a key derived from the fernet key"
    store.save('{"x": 2}', "seed", fence=5)
    assert backend.writes.count(store.data_key) == 1, "the data key is created once, then reused"
    core_fernet_key(FERNET_B)  # the old fernet key is gone
    loaded = TokenStore("c", backend=backend).load()
    assert loaded.msal_cache == '{"x": 2}' and loaded.fence == 5 and not loaded.stale_key


def test_a_store_of_the_old_scheme_is_moved_to_a_data_key_on_read(core_fernet_key):
    """Stores written before 0.2 were sealed with a key derived (HKDF) from [core] fernet_key."""
    import json

    backend = RecordingVariables()
    store = TokenStore("c", backend=backend)
    payload = {"format": 1, "msal_cache": "{}", "seed_fingerprint": "seed", "written_at": 1.0, "fence": 7}
    backend.values[store.key] = crypto.encrypt(crypto.load_cipher(), json.dumps(payload).encode())
    core_fernet_key(FERNET_B, FERNET_A)  # mid-rotation: the old key second
    loaded = store.load()
    assert loaded.fence == 7 and loaded.stale_key and store.data_key not in backend.values, "read, nothing created"
    with store.refresh_lock(timeout=5, timing=LeaseTiming(ttl=30, settle=0.0)):
        assert store.reencrypt() is True
    assert store.reencrypt() is False, "moved once"
    raw = backend.values[store.key]
    assert Fernet(backend.values[store.data_key].encode()).decrypt(raw.encode())
    core_fernet_key(FERNET_B)  # the old key removed
    moved = TokenStore("c", backend=backend).load()
    assert moved.fence == 7 and moved.seed_fingerprint == "seed" and not moved.stale_key


def test_concurrent_first_writes_under_the_refresh_lock_create_one_data_key(core_fernet_key):
    backend = RecordingVariables()
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def first_write(index: int) -> None:
        store = TokenStore("c", backend=backend)
        barrier.wait()
        try:
            with store.refresh_lock(timeout=30, timing=LeaseTiming(ttl=30, settle=0.05)) as lease:
                store.save(f'{{"writer": {index}}}', "seed", fence=lease.fence or 0)
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=first_write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert backend.writes.count("o365mail_store_secret__c") == 1
    assert TokenStore("c", backend=backend).load() is not None


def test_the_data_key_variable_is_redacted_by_airflow_and_masked_once_read(core_fernet_key):
    from airflow._shared.secrets_masker import _secrets_masker
    from airflow._shared.secrets_masker import redact as core_redact
    from airflow.api_fastapi.core_api.datamodels.variables import VariableResponse
    from airflow.sdk._shared.secrets_masker import redact as sdk_redact

    from airflow_provider_o365mail.auth.store import STORE_PREFIX

    backend = MemoryVariables()
    writer = TokenStore("c", backend=backend)
    writer.save("{}", "seed")
    assert _secrets_masker().should_hide_value_for_key(writer.data_key), "a sensitive word in the name"
    assert not writer.data_key.startswith(STORE_PREFIX[:-1]), "rotate_all lists stores by prefix"
    value = backend.values[writer.data_key]
    shown = VariableResponse(key=writer.data_key, value=value, description=None, is_encrypted=True, team_name=None)
    assert shown.val == "***", "what Airflow's API and UI return for it"
    TokenStore("c", backend=backend).load()
    for redact in (sdk_redact, core_redact):
        assert value not in redact(f"a log line with {value} in it")


def test_forget_deletes_the_data_key_and_a_new_grant_gets_a_new_one(core_fernet_key):
    backend = MemoryVariables()
    store = TokenStore("c", backend=backend)
    store.save("{}", "seed")
    first = backend.values[store.data_key]
    store.forget()
    assert store.key not in backend.values and store.data_key not in backend.values
    other = TokenStore("c", backend=backend)
    other.save("{}", "seed2")
    assert backend.values[store.data_key] != first
    assert store.load().seed_fingerprint == "seed2", "a process holding the old data key re-reads the new one"


def test_a_data_key_this_component_cannot_decrypt_is_never_replaced(core_fernet_key):
    """Airflow's Variable.get returns None when its fernet key does not open the row: creating a new data
    key then would make the store unreadable for every other component."""

    class WrongFernetKey(MemoryVariables):
        def get(self, key: str) -> str | None:
            return None if key.startswith("o365mail_store_secret__") else super().get(key)

        def stored_state(self, key: str) -> str:
            return "unreadable" if key in self.values else "absent"

    backend = WrongFernetKey()
    backend.values["o365mail_store_secret__c"] = "ciphertext Airflow cannot open here"
    store = TokenStore("c", backend=backend)
    with pytest.raises(TokenStoreError, match="same \\[core\\] fernet_key"):
        store.prepare_write()
    with pytest.raises(TokenStoreError, match="cannot decrypt"):
        store.save("{}", "seed")
    assert backend.values == {"o365mail_store_secret__c": "ciphertext Airflow cannot open here"}


def test_a_store_no_key_opens_says_which_key_is_missing(core_fernet_key):
    backend = MemoryVariables()
    TokenStore("c", backend=backend).save("{}", "seed")
    del backend.values["o365mail_store_secret__c"]
    with pytest.raises(crypto.StoreUndecryptable, match="is missing") as err:
        TokenStore("c", backend=backend).load()
    assert "rotate-keys" in str(err.value) and "forget --conn-id c" in str(err.value)


def test_token_cache_keys_keep_their_own_scheme_without_a_data_key(monkeypatch):
    monkeypatch.setenv("AIRFLOW__O365MAIL__TOKEN_CACHE_KEYS", FERNET_A)
    backend = MemoryVariables()
    store = TokenStore("c", backend=backend)
    store.save("{}", "seed")
    assert set(backend.values) == {store.key} and not store.uses_data_key
    assert Fernet(FERNET_A.encode()).decrypt(backend.values[store.key].encode())


# ---------------------------------------------------------------------- masking
def test_every_form_of_a_secret_is_masked():
    from urllib.parse import quote

    from airflow._shared.secrets_masker import redact as core_redact
    from airflow.sdk._shared.secrets_masker import redact as sdk_redact

    from airflow_provider_o365mail.auth.masking import mask
    from airflow_provider_o365mail.auth.xoauth2 import xoauth2_string

    secret = "1.AgA/secret+refresh=token-" + "x" * 20
    mask(secret)
    token = "eyJ0eXAi.eyJhdWQiOiJ4In0.sig" + "y" * 20
    sasl = xoauth2_string("someone@example.com", token)
    forms = [
        secret,
        quote(secret, safe=""),
        base64.b64encode(secret.encode()).decode(),
        base64.b64encode(sasl.encode()).decode(),
    ]
    for form in forms:
        for redact in (sdk_redact, core_redact):
            assert form not in redact(f"log line {form} end"), form[:10]


def test_the_maskers_forget_expired_access_tokens_and_stay_small():
    """Airflow's masker recompiles every secret it holds on each new one: a long-lived triggerer that
    registered every hourly token for months would spend seconds per refresh. Expired ones go."""
    import secrets as random_secrets

    from airflow._shared.secrets_masker import _secrets_masker as core_masker
    from airflow._shared.secrets_masker import redact as core_redact
    from airflow.sdk._shared.secrets_masker import _secrets_masker as sdk_masker
    from airflow.sdk._shared.secrets_masker import redact as sdk_redact

    from airflow_provider_o365mail.auth import masking

    before = {name: len(m().patterns) for name, m in (("sdk", sdk_masker), ("core", core_masker))}
    expired = [random_secrets.token_urlsafe(900) for _ in range(150)]
    for token in expired:
        masking.mask_access_token(token, time.time() - 3600, "someone@example.com")
    live = random_secrets.token_urlsafe(900)
    masking.mask_access_token(live, time.time() + 3600, "someone@example.com")
    secret = random_secrets.token_urlsafe(40)
    masking.mask(secret)
    for name, masker in (("sdk", sdk_masker), ("core", core_masker)):
        # the live token's forms (value, base64, XOAUTH2 and its base64), the secret's: no expired ones
        assert len(masker().patterns) - before[name] <= 8, name
    for redact in (sdk_redact, core_redact):
        assert live not in redact(f"x {live} y") and secret not in redact(f"x {secret} y")
        assert expired[0] in redact(f"x {expired[0]} y"), "an expired token is no longer held"
    masking.mask_refresh_token(rotated := random_secrets.token_urlsafe(60))
    assert rotated not in sdk_redact(f"x {rotated} y"), "a refresh token is held while it is seen"


def test_forgetting_never_removes_a_mask_airflow_added_itself():
    import secrets as random_secrets

    from airflow._shared.secrets_masker import _secrets_masker as core_masker
    from airflow._shared.secrets_masker import redact as core_redact
    from airflow.sdk._shared.secrets_masker import _secrets_masker as sdk_masker
    from airflow.sdk._shared.secrets_masker import redact as sdk_redact

    from airflow_provider_o365mail.auth import masking

    airflows = random_secrets.token_urlsafe(300)
    sdk_masker().add_mask(airflows)
    core_masker().add_mask(airflows)
    masking.mask_access_token(airflows, time.time() - 3600)  # the provider's copy, already expired
    masking.mask_access_token(random_secrets.token_urlsafe(300), time.time() + 3600)  # forgets it
    for redact in (sdk_redact, core_redact):
        assert airflows not in redact(f"x {airflows} y")


@pytest.mark.parametrize(("supervisor", "rotating_sent"), [("TriggerCommsDecoder", False), ("CommsDecoder", True)])
def test_only_a_task_supervisor_is_told_the_rotating_tokens(monkeypatch, supervisor, rotating_sent):
    """The triggerer's main process lives for months and Airflow's masker there never forgets."""
    import secrets as random_secrets

    from airflow.sdk.execution_time import task_runner

    from airflow_provider_o365mail.auth import masking

    sent: list[str] = []
    comms = type(supervisor, (), {"send": lambda self, message: sent.append(message.value)})()
    monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", comms, raising=False)
    token, secret = random_secrets.token_urlsafe(300), random_secrets.token_urlsafe(40)
    masking.mask_access_token(token, time.time() + 3600)
    masking.mask(secret)
    assert (token in sent) is rotating_sent
    assert secret in sent, "the client secret goes to every supervisor"


def test_leak_scan_finds_base64_and_url_encoded_forms():
    from urllib.parse import quote

    from airflow_provider_o365mail.testing.leakcheck import find_leaks

    secret = "eyJhbGciOi.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
    refresh = "1.AgAAAA/BBBB+CCCC=DDDDEEEE"
    for user in ("a@b.c", "ab@b.c", "abc@b.c"):
        sasl = base64.b64encode(f"user={user}\x01auth=Bearer {secret}\x01\x01".encode()).decode()
        assert find_leaks([("smtp", f"AUTH XOAUTH2 {sasl}")], {secret})
    assert find_leaks([("form", f"refresh_token={quote(refresh, safe='')}")], {refresh})
    assert find_leaks([("b64", base64.b64encode(refresh.encode()).decode())], {refresh})
    assert not find_leaks([("clean", "nothing secret here at all, 12345678901234567890")], {secret, refresh})


# ---------------------------------------------------------------------- TLS
def test_a_missing_ca_bundle_is_a_connection_error(tmp_path):
    with pytest.raises(ConnectionConfigError, match="ca_bundle .* cannot be loaded"):
        client_ssl_context(str(tmp_path / "missing.pem"))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConnectionConfigError, match="PEM"):
        client_ssl_context(str(tmp_path / "junk.pem"))


def test_certificate_failures_are_told_from_other_tls_errors():
    verify = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    wrapped = requests.exceptions.SSLError(verify)
    assert is_certificate_error(wrapped)
    assert not is_certificate_error(requests.exceptions.SSLError(ssl.SSLEOFError(8, "EOF occurred")))
    assert not is_certificate_error(requests.exceptions.ConnectionError("reset"))


# ---------------------------------------------------------------------- architecture (#11)
def test_the_identity_provider_session_keeps_no_response_state():
    session = IdentityProviderSession(None, 5.0)
    assert not {"last_status", "last_retry_after"} & set(vars(session))


def test_token_refresh_and_consent_build_msal_through_one_function(monkeypatch):
    from airflow_provider_o365mail.auth import consent, msal_app, tokens

    assert consent.build_app is msal_app.build_app and tokens.build_app is msal_app.build_app
    for module in ("tokens.py", "consent.py"):
        assert "ConfidentialClientApplication(" not in (PACKAGE / "auth" / module).read_text()


def test_token_retries_use_the_shared_backoff():
    from airflow_provider_o365mail.auth import tokens
    from airflow_provider_o365mail.retry import Backoff

    assert isinstance(tokens.TOKEN_BACKOFF, Backoff)
    assert (tokens.TOKEN_BACKOFF.attempts, tokens.TOKEN_BACKOFF.first, tokens.TOKEN_BACKOFF.maximum) == (4, 1.0, 30.0)
    assert tokens.TOKEN_BACKOFF.delay(1, retry_after=45) == 45  # a server's Retry-After, as it is
    assert tokens.TOKEN_BACKOFF.delay(1, retry_after=600) == 60.0  # capped in one place
    assert "random" not in (PACKAGE / "auth" / "tokens.py").read_text()


def test_auth_imports_nothing_above_it():
    forbidden = re.compile(r"from airflow_provider_o365mail\.(hooks|operators|sensors|triggers|plugins|cli)")
    offenders = [p.name for p in (PACKAGE / "auth").glob("*.py") if forbidden.search(p.read_text())]
    assert offenders == []
