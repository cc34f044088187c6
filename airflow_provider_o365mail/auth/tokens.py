"""The token lifecycle: one module that turns connection settings into access tokens.

Used by the hook, the triggers, the CLI and the plugin alike.

- A warm store answers without any request to the identity provider: the access token is read
  straight from the decrypted MSAL cache, and MSAL (whose construction fetches the discovery
  document) is only built when a refresh is due.
- Refreshes are serialised per connection (see :meth:`TokenStore.refresh_lock`), re-check the
  store after taking the lock, and persist the cache only when MSAL changed it.
- Permanent refusals raise an :class:`AuthorizationError` at once; network errors, 5xx and 429
  are retried with bounded backoff (``Retry-After`` honoured).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import msal
import requests

from airflow_provider_o365mail.auth.errors import authorization_error
from airflow_provider_o365mail.auth.last_error import record_last_error
from airflow_provider_o365mail.auth.store import TokenStore, fingerprint
from airflow_provider_o365mail.connection import O365MailSettings
from airflow_provider_o365mail.exceptions import (
    AuthorizationError,
    ConnectionConfigError,
    IdentityProviderUnavailable,
    ReauthorizationRequired,
)
from airflow_provider_o365mail.tls import IdentityProviderSession

log = logging.getLogger(__name__)

#: A cached access token with less left than this is refreshed (MSAL uses the same 5 minutes).
REFRESH_MARGIN = 300
MAX_ATTEMPTS = 4
MAX_BACKOFF = 30.0
MAX_RETRY_AFTER = 60.0
TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error"})


def mask(value: str | None) -> None:
    """Register a secret with Airflow's masker (logs of tasks, triggerer and supervisor)."""
    if not value:
        return
    try:
        from airflow.sdk.log import mask_secret

        mask_secret(value)
    except Exception:  # noqa: S110 - masking must never break token acquisition
        pass


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


class TokenManager:
    """Access tokens for one ``o365mail`` connection."""

    def __init__(
        self,
        settings: O365MailSettings,
        store: TokenStore | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.store = store or TokenStore(settings.conn_id)
        self._sleep = sleep
        self._http_cache: dict = {}
        self._last: AccessToken | None = None
        mask(settings.client_secret)
        mask(settings.refresh_token)

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
            cache, _ = self._load_cache()
            cached = self._cached_access_token(cache)
            if cached is not None:
                return self._remember(cached)
        with self.store.refresh_lock(timeout=max(60.0, 4 * self.settings.timeout)):
            cache, seed = self._load_cache()
            cached = self._cached_access_token(cache)
            if cached is not None and (not force_refresh or (rejected and cached.token != rejected)):
                return self._remember(cached)  # another process refreshed while we waited
            self._drop_access_tokens(cache)
            result = self._with_retries(lambda: self._acquire(cache))
            if cache.has_state_changed:
                self.store.save(cache.serialize(), seed)
        token = AccessToken(
            token=result["access_token"],
            expires_on=time.time() + int(result.get("expires_in", 3600)),
            source="identity_provider",
        )
        return self._remember(token)

    def forget(self) -> None:
        """Drop the stored tokens of this connection (the connection's refresh token is kept)."""
        self.store.forget()
        self._last = None

    # ------------------------------------------------------------------ cache
    def _load_cache(self) -> tuple[msal.SerializableTokenCache, str | None]:
        """The stored MSAL cache, unless the connection carries a refresh token it was not seeded from."""
        cache = msal.SerializableTokenCache()
        seed = fingerprint(self.settings.refresh_token) if self.settings.delegated else None
        stored = self.store.load()
        if stored is None:
            return cache, seed
        if self.settings.delegated and seed is not None and stored.seed_fingerprint != seed:
            log.info(
                "Connection %s carries a refresh token the token store was not seeded from (re-authorized); "
                "starting from it.",
                self.settings.conn_id,
            )
            return cache, seed
        cache.deserialize(stored.msal_cache)
        return cache, stored.seed_fingerprint

    def _matching_access_tokens(self, cache: msal.SerializableTokenCache) -> list[dict]:
        return list(
            cache.search(
                msal.TokenCache.CredentialType.ACCESS_TOKEN,
                target=list(self.settings.scopes),
                query={"client_id": self.settings.client_id},
            )
        )

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
        mask(token.token)
        self._last = token
        return token

    # ------------------------------------------------------------------ MSAL
    @cached_property
    def _http(self) -> IdentityProviderSession:
        return IdentityProviderSession(self.settings.ca_bundle, self.settings.timeout)

    def _app(self, cache: msal.SerializableTokenCache) -> msal.ConfidentialClientApplication:
        """Built only when a refresh is due: construction fetches the discovery document."""
        kwargs: dict[str, Any] = {}
        if not self.settings.is_microsoft_authority:
            kwargs["instance_discovery"] = False
        try:
            return msal.ConfidentialClientApplication(
                self.settings.client_id,
                client_credential=self.settings.client_secret,
                authority=self.settings.authority,
                token_cache=cache,
                http_client=self._http,
                http_cache=self._http_cache,
                **kwargs,
            )
        except ValueError as err:
            raise ConnectionConfigError(
                f"Connection {self.settings.conn_id!r}: the authority {self.settings.authority} does not serve "
                "an OpenID configuration (tenant wrong, or not a V2 authority). Copy the V2 token endpoint "
                "from the app registration's Endpoints page."
            ) from err

    def _acquire(self, cache: msal.SerializableTokenCache) -> dict:
        app = self._app(cache)
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
                    f"the token store is empty. Run 'airflow o365mail authorize --conn-id {self.settings.conn_id}' "
                    "or use the Authorize button on the Airflow UI page Microsoft 365 Mail.",
                    conn_id=self.settings.conn_id,
                )
            result = app.acquire_token_by_refresh_token(self.settings.refresh_token, scopes)
        return result

    def _with_retries(self, operation: Callable[[], dict]) -> dict:
        conn_id = self.settings.conn_id
        reason = ""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            self._http.last_status = self._http.last_retry_after = None
            try:
                result = operation()
            except (requests.ConnectionError, requests.Timeout) as err:
                reason = f"network error ({type(err).__name__})"
            except (msal.exceptions.MsalServiceError, requests.HTTPError):
                reason = f"HTTP {self._http.last_status or 'error'}"
            else:
                status = self._http.last_status or 0
                if "error" not in result:
                    return result
                if status != 429 and status < 500 and result.get("error") not in TRANSIENT_ERRORS:
                    raise authorization_error(result, conn_id)
                reason = f"HTTP {status} {result.get('error')}"
            if attempt == MAX_ATTEMPTS:
                break
            delay = self._http.last_retry_after
            if delay is None:
                delay = min(MAX_BACKOFF, 2 ** (attempt - 1)) * (0.75 + random.random() / 2)  # noqa: S311
            delay = min(delay, MAX_RETRY_AFTER)
            log.warning(
                "Token request for %s failed (%s), attempt %d/%d; retrying in %.1f s.",
                conn_id,
                reason,
                attempt,
                MAX_ATTEMPTS,
                delay,
            )
            self._http_cache.clear()  # MSAL would otherwise replay the throttled answer
            self._sleep(delay)
        raise IdentityProviderUnavailable(
            f"Token request for connection {conn_id!r} failed {MAX_ATTEMPTS} times, last: {reason}. The identity "
            f"provider at {self.settings.authority} is unreachable or overloaded; the task can be retried."
        )
