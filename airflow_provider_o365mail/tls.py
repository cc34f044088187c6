"""TLS contexts for the identity provider and the mail servers: always verifying (no I/O)."""

from __future__ import annotations

import ssl

import requests
from requests.adapters import HTTPAdapter


def client_ssl_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """System trust store plus ``ca_bundle``; hostname checking and verification always on."""
    context = ssl.create_default_context()
    if ca_bundle:
        context.load_verify_locations(cafile=ca_bundle)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class _ContextAdapter(HTTPAdapter):
    def __init__(self, context: ssl.SSLContext, **kwargs) -> None:
        self._context = context
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        kwargs["ssl_context"] = self._context
        return super().init_poolmanager(*args, **kwargs)


class IdentityProviderSession(requests.Session):
    """HTTP session for MSAL: explicit timeout, our CA list, no environment overrides.

    ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` would otherwise replace MSAL's ``verify`` silently.
    The last response's status and ``Retry-After`` are kept for the retry policy.
    """

    def __init__(self, ca_bundle: str | None, timeout: float) -> None:
        super().__init__()
        self.trust_env = False
        self.timeout = timeout
        self.last_status: int | None = None
        self.last_retry_after: float | None = None
        self.mount("https://", _ContextAdapter(client_ssl_context(ca_bundle)))

    def request(self, method, url, *args, **kwargs):  # type: ignore[override]
        kwargs.setdefault("timeout", self.timeout)
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        response = super().request(method, url, *args, **kwargs)
        self.last_status = response.status_code
        retry_after = response.headers.get("Retry-After")
        try:
            self.last_retry_after = float(retry_after) if retry_after is not None else None
        except ValueError:
            self.last_retry_after = None
        return response
