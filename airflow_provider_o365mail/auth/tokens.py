"""The token lifecycle: one module that turns connection settings into access tokens.

Used by the hook, the triggers, the CLI and the plugin alike.

- A warm store answers without any request to the identity provider: the access token is read
  straight from the decrypted MSAL cache, and MSAL (whose construction fetches the discovery
  document) is only built when a refresh is due.
- Refreshes are single-flight per connection: a ``flock`` on this host, then the cross-host lease
  (:mod:`.lease`: renewed while held, fenced). The store is re-checked after each step, so a
  process that waited finds the token another one fetched. The cache is persisted only when MSAL
  changed it, and never over a store written under a higher fence.
- Permanent refusals raise an :class:`AuthorizationError` at once, and so does a failed TLS
  certificate check; network errors, 5xx and 429 are retried with :data:`TOKEN_BACKOFF`
  (``Retry-After`` honoured up to 60 s). After a timed-out request (which the identity provider
  may still have processed) the store is read again before the retry.
- The store is encrypted with a data key that Airflow's ``airflow rotate-fernet-key`` rotates
  (:mod:`.store`), so rotating ``[core] fernet_key`` as Airflow documents it keeps it readable. A
  store that no key opens (its data key deleted, components with different fernet keys, an older
  store whose key was removed, ``token_cache_keys`` rotated too early) is not fatal: the
  connection's own refresh token is used, with a warning, and the store is rewritten.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property

import msal
import requests

from airflow_provider_o365mail import hints
from airflow_provider_o365mail.auth.crypto import StoreUndecryptable
from airflow_provider_o365mail.auth.errors import authorization_error, transient_refusal
from airflow_provider_o365mail.auth.last_error import record_last_error
from airflow_provider_o365mail.auth.lease import LeaseTiming, RefreshLease
from airflow_provider_o365mail.auth.masking import (
    mask,
    mask_access_token,
    mask_cache,
    mask_pem,
    mask_proxies,
    mask_result,
)
from airflow_provider_o365mail.auth.msal_app import RecordingHttpClient, ResponseRecord, build_app
from airflow_provider_o365mail.auth.store import TokenStore, fingerprint
from airflow_provider_o365mail.connection import CLOUDS, O365MailSettings
from airflow_provider_o365mail.exceptions import (
    AuthorizationError,
    ConnectionConfigError,
    IdentityProviderUnavailable,
    ReauthorizationRequired,
)
from airflow_provider_o365mail.retry import Backoff
from airflow_provider_o365mail.tls import IdentityProviderSession, is_certificate_error

log = logging.getLogger(__name__)

#: A cached access token with less left than this is refreshed (MSAL uses the same 5 minutes).
REFRESH_MARGIN = 300
#: Token requests: 4 attempts, waits of about 1, 2, 4 s (at most 30 s); a ``Retry-After`` up to 60 s.
TOKEN_BACKOFF = Backoff(first=1.0, maximum=30.0, attempts=4, jitter=(0.75, 1.25), max_retry_after=60.0)
MAX_ATTEMPTS = TOKEN_BACKOFF.attempts
TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error"})

__all__ = ["AccessToken", "TokenManager", "mask"]


@dataclass(frozen=True)
class AccessToken:
    """An access token and its expiry; ``repr`` and ``str`` never show the token."""

    token: str = field(repr=False)
    expires_on: float
    source: str

    @property
    def seconds_left(self) -> float:
        return self.expires_on - time.time()

    def __str__(self) -> str:
        return f"<access token, {self.seconds_left:.0f} s left, from {self.source}>"


@dataclass
class _Loaded:
    """The MSAL cache to work from, and where it came from."""

    cache: msal.SerializableTokenCache
    seed: str | None
    fence: int = 0
    stale_key: bool = False


class TokenManager:
    """Access tokens for one ``o365mail`` connection."""

    def __init__(
        self,
        settings: O365MailSettings,
        store: TokenStore | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        lease_timing: LeaseTiming | None = None,
    ) -> None:
        self.settings = settings
        self.store = store or TokenStore(settings.conn_id)
        self._sleep = sleep
        self._lease_timing = lease_timing
        self._last: AccessToken | None = None
        self._store_unreadable = False
        mask(settings.client_secret, settings.refresh_token, settings.certificate_passphrase)
        if settings.certificate_key:
            mask_pem(settings.certificate_key)
        mask_proxies(settings.proxy)

    def __repr__(self) -> str:
        return f"TokenManager(conn_id={self.settings.conn_id!r})"

    # ------------------------------------------------------------------ public
    def get(self, *, force_refresh: bool = False) -> AccessToken:
        """A valid access token; ``force_refresh`` after a server refused the last one."""
        try:
            return self._get(force_refresh=force_refresh)
        except AuthorizationError as err:
            record_last_error(self.settings.conn_id, err)
            raise

    def _get(self, *, force_refresh: bool) -> AccessToken:
        rejected = self._last.token if force_refresh and self._last else None
        if not force_refresh:
            loaded = self._load_cache()
            cached = self._cached_access_token(loaded.cache)
            if cached is not None:
                if loaded.stale_key:
                    self._reencrypt_store()
                return self._remember(cached)
        wait = max(60.0, 4 * self.settings.timeout)
        with self.store.host_lock(timeout=wait):
            fresh = self._fresh_in_store(force_refresh, rejected)
            if fresh is not None:
                return self._remember(fresh)  # another process on this host refreshed while we waited
            lease = self.store.lease(self.lease_timing)
            found: list[AccessToken] = []

            def someone_else_refreshed() -> bool:
                token = self._fresh_in_store(force_refresh, rejected)
                if token is not None:
                    found.append(token)
                return token is not None

            if not lease.acquire(time.monotonic() + wait, min_fence=self._stored_fence(), done=someone_else_refreshed):
                return self._remember(found[0])  # another host refreshed while we waited
            try:
                fresh = self._fresh_in_store(force_refresh, rejected)
                if fresh is not None:
                    return self._remember(fresh)
                token = self._refresh(lease, rejected)
            finally:
                lease.release()
        return self._remember(token)

    @property
    def lease_timing(self) -> LeaseTiming:
        return self._lease_timing or LeaseTiming.configured(self.settings.timeout)

    def _fresh_in_store(self, force_refresh: bool, rejected: str | None) -> AccessToken | None:
        """A valid token in the store that is not the one a server just refused."""
        cached = self._cached_access_token(self._load_cache().cache)
        if cached is None or (force_refresh and (rejected is None or cached.token == rejected)):
            return None
        return cached

    def _stored_fence(self) -> int:
        try:
            stored = self.store.load()
        except StoreUndecryptable:
            return 0
        return stored.fence if stored else 0

    def _refresh(self, lease: RefreshLease, rejected: str | None) -> AccessToken:
        """Redeem, holding ``lease``; persist the rotated cache unless a newer refresh stored its own."""
        self.store.prepare_write()  # a store that cannot be written fails before the refresh token is redeemed
        loaded = self._load_cache()
        self._drop_access_tokens(loaded.cache)
        outcome = self._with_retries(loaded, lease, rejected)
        if isinstance(outcome, AccessToken):
            return outcome
        result, loaded = outcome
        if loaded.cache.has_state_changed:
            newest = self._stored_fence()
            if lease.fence is not None and newest > lease.fence:
                log.warning(
                    "The token store of %s was written by a newer refresh (fence %d > %d); not overwriting it.",
                    self.settings.conn_id,
                    newest,
                    lease.fence,
                )
            else:
                self.store.save(loaded.cache.serialize(), loaded.seed, fence=lease.fence or 0)
        return AccessToken(
            token=result["access_token"],
            expires_on=time.time() + int(result.get("expires_in", 3600)),
            source="identity_provider",
        )

    def _reencrypt_store(self) -> None:
        """The store was read with an older key: write it again under its data key or the newest key (holding the lock)."""
        try:
            with self.store.refresh_lock(timeout=max(60.0, 4 * self.settings.timeout), timing=self.lease_timing):
                self.store.reencrypt()
        except Exception as err:  # the next refresh rewrites it anyway
            log.warning("Could not re-encrypt the token store of %s: %s", self.settings.conn_id, err)

    def forget(self) -> None:
        """Drop the stored tokens of this connection (the connection's refresh token is kept)."""
        self.store.forget()
        self._last = None

    # ------------------------------------------------------------------ cache
    def _load_cache(self) -> _Loaded:
        """The stored MSAL cache, unless the connection carries a refresh token it was not seeded from.

        A store that no key opens falls back to the connection's refresh token (with a warning): the
        next refresh rewrites the store under the current key.
        """
        cache = msal.SerializableTokenCache()
        seed = fingerprint(self.settings.refresh_token) if self.settings.delegated else None
        try:
            stored = self.store.load()
        except StoreUndecryptable as err:
            if self.settings.delegated and not self.settings.refresh_token:
                raise
            if self._store_unreadable:
                return _Loaded(cache, seed)
            self._store_unreadable = True
            log.warning(
                "%s Using the connection's own %s instead.",
                err,
                "refresh token" if self.settings.delegated else "client credentials",
            )
            return _Loaded(cache, seed)
        if stored is None:
            return _Loaded(cache, seed)
        if self.settings.delegated and seed is not None and stored.seed_fingerprint != seed:
            log.info(
                "Connection %s carries a refresh token the token store was not seeded from (re-authorized); "
                "starting from it.",
                self.settings.conn_id,
            )
            return _Loaded(cache, seed, stored.fence)
        cache.deserialize(stored.msal_cache)
        mask_cache(cache)
        return _Loaded(cache, stored.seed_fingerprint, stored.fence, stored.stale_key)

    def _matching_access_tokens(self, cache: msal.SerializableTokenCache) -> list[dict]:
        """The cached access tokens granted for (at least) the connection's scopes.

        Compared as full names: Entra answers a Graph token request with the scopes' short names
        (``Mail.Send``, Graph being its default resource) and MSAL stores that answer, so a search for
        ``https://graph.microsoft.com/Mail.Send`` alone never found the token and every Graph request
        redeemed the refresh token again.
        """
        default_resource = CLOUDS[self.settings.cloud].graph_url
        wanted = _full_scope_names(self.settings.scopes, default_resource)
        return [
            item
            for item in cache.search(
                msal.TokenCache.CredentialType.ACCESS_TOKEN, query={"client_id": self.settings.client_id}
            )
            if wanted <= _full_scope_names(str(item.get("target") or "").split(), default_resource)
        ]

    def _cached_access_token(self, cache: msal.SerializableTokenCache) -> AccessToken | None:
        now = time.time()
        best = None
        for item in self._matching_access_tokens(cache):
            expires_on = float(item.get("expires_on", 0))
            if expires_on - now > REFRESH_MARGIN and (best is None or expires_on > best.expires_on):
                best = AccessToken(token=item["secret"], expires_on=expires_on, source="store")
        return best

    def _drop_access_tokens(self, cache: msal.SerializableTokenCache) -> None:
        for item in self._matching_access_tokens(cache):
            cache.remove_at(item)

    def _remember(self, token: AccessToken) -> AccessToken:
        mask_access_token(token.token, token.expires_on, self.settings.mailbox or None)
        self._last = token
        return token

    # ------------------------------------------------------------------ MSAL
    @cached_property
    def _http(self) -> IdentityProviderSession:
        return IdentityProviderSession(self.settings.ca_bundle, self.settings.timeout, proxy=self.settings.http_proxy)

    def _acquire(self, cache: msal.SerializableTokenCache, record: ResponseRecord) -> dict:
        """One attempt; the app (discovery included) is built for it with a fresh throttle cache."""
        app = build_app(self.settings, cache=cache, http_client=RecordingHttpClient(self._http, record))
        scopes = list(self.settings.scopes)
        if not self.settings.delegated:
            return app.acquire_token_for_client(scopes)
        accounts = app.get_accounts()
        result = None
        if accounts:
            result = app.acquire_token_silent_with_error(scopes, accounts[0], force_refresh=True)
        if result is None:
            if not self.settings.refresh_token:
                raise ReauthorizationRequired(
                    f"Connection {self.settings.conn_id!r} has never been authorized: it has no refresh token and "
                    "the token store is empty. "
                    + (hints.NEVER_AUTHORIZED_PUBLIC if self.settings.public_client else hints.NEVER_AUTHORIZED).format(
                        conn_id=self.settings.conn_id
                    ),
                    conn_id=self.settings.conn_id,
                )
            result = app.acquire_token_by_refresh_token(self.settings.refresh_token, scopes)
        return result

    def _certificate_error(self, err: BaseException) -> ConnectionConfigError:
        where = f"ca_bundle {self.settings.ca_bundle!r}" if self.settings.ca_bundle else "the system trust store"
        return ConnectionConfigError(
            f"Connection {self.settings.conn_id!r}: the TLS certificate of the identity provider at "
            f"{self.settings.authority} is not trusted by {where} ({type(err).__name__}: certificate verify "
            "failed). Set the connection's ca_bundle to the CA that issued the server's certificate (or remove a "
            "wrong one); behind a TLS-intercepting proxy, use the proxy's CA. Retrying will not help."
        )

    def _with_retries(
        self, loaded: _Loaded, lease: RefreshLease, rejected: str | None
    ) -> tuple[dict, _Loaded] | AccessToken:
        """Token requests with :data:`TOKEN_BACKOFF`; each one only while ``lease`` is safely held."""
        conn_id = self.settings.conn_id
        reason = ""
        need = self.settings.timeout + self.lease_timing.settle
        for attempt in range(1, (TOKEN_BACKOFF.attempts or 1) + 1):
            if not (lease.still_held(need) and lease.confirm()):
                raise IdentityProviderUnavailable(
                    f"Token request for connection {conn_id!r} not sent: this process no longer safely holds the "
                    "refresh lease (renewals failed or another process took it over), and a second redemption of "
                    "the refresh token could revoke the grant. The task can be retried."
                )
            record = ResponseRecord()
            timed_out = False
            try:
                result = self._acquire(loaded.cache, record)
            except requests.exceptions.SSLError as err:
                if is_certificate_error(err):
                    raise self._certificate_error(err) from None
                reason = f"TLS error ({type(err).__name__})"
            except requests.exceptions.ProxyError as err:
                reason = str(err)  # names the proxy, never its credentials (tls.IdentityProviderSession)
            except (requests.ConnectionError, requests.Timeout) as err:
                timed_out = isinstance(err, requests.Timeout)
                reason = f"network error ({type(err).__name__})"
            except (msal.exceptions.MsalServiceError, requests.HTTPError):
                reason = f"HTTP {record.status or 'error'}"
            else:
                mask_result(result)
                status = record.status or 0
                if "error" not in result:
                    return result, loaded
                transient = transient_refusal(result)
                if status != 429 and status < 500 and result.get("error") not in TRANSIENT_ERRORS and not transient:
                    raise authorization_error(result, conn_id, public_client=self.settings.public_client)
                reason = f"HTTP {status} {result.get('error')}"
                if transient:
                    reason += f" ({transient}: temporary, the grant is not revoked)"
            if TOKEN_BACKOFF.gives_up_after(attempt):
                break
            delay = TOKEN_BACKOFF.delay(attempt, record.retry_after)
            log.warning(
                "Token request for %s failed (%s), attempt %d/%d; retrying in %.1f s.",
                conn_id,
                reason,
                attempt,
                TOKEN_BACKOFF.attempts,
                delay,
            )
            self._sleep(delay)
            if timed_out:
                # The identity provider may have processed the request and rotated the refresh token:
                # start again from what the store holds now, in case the rotation reached it.
                loaded = self._load_cache()
                cached = self._cached_access_token(loaded.cache)
                if cached is not None and cached.token != rejected:
                    return cached
                self._drop_access_tokens(loaded.cache)
        raise IdentityProviderUnavailable(
            f"Token request for connection {conn_id!r} failed {TOKEN_BACKOFF.attempts} times, last: {reason}. The "
            f"identity provider at {self.settings.authority} is unreachable or overloaded; the task can be retried."
        )


def _full_scope_names(scopes: Iterable[str], default_resource: str) -> set[str]:
    """Scopes with their resource, lower case (scope names are case-insensitive); a name without one
    (``Mail.Send``) is of Entra's default resource, Microsoft Graph."""
    root = default_resource.rstrip("/")
    return {(s if "://" in s else f"{root}/{s}").lower() for s in scopes}
