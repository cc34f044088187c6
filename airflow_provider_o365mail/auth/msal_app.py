"""The one place an MSAL application is built (token refreshes and consent alike), no I/O of its own.

MSAL fetches the discovery document when the application is constructed, so callers build it only
when a request is due. MSAL also replays an identical error answer for a while from its
``http_cache`` (its throttling): every attempt gets a fresh, empty cache, so a retry really asks
the identity provider again, and nothing about one attempt leaks into the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msal
import requests

from airflow_provider_o365mail.auth.credential import client_credential
from airflow_provider_o365mail.auth.masking import mask_assertion
from airflow_provider_o365mail.connection import O365MailSettings
from airflow_provider_o365mail.exceptions import ConnectionConfigError


@dataclass
class ResponseRecord:
    """Status and ``Retry-After`` of the last response of one attempt (owned by the retry loop)."""

    status: int | None = None
    retry_after: float | None = None

    def observe(self, response: requests.Response) -> None:
        self.status = response.status_code
        raw = response.headers.get("Retry-After")
        try:
            self.retry_after = float(raw) if raw is not None else None
        except ValueError:
            self.retry_after = None


class RecordingHttpClient:
    """MSAL's ``http_client`` for one attempt: the shared session, plus a record of what came back."""

    def __init__(self, session: requests.Session, record: ResponseRecord) -> None:
        self._session = session
        self.record = record

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        data = kwargs.get("data")
        if isinstance(data, dict) and data.get("client_assertion"):
            assertion = data["client_assertion"]
            mask_assertion(
                assertion.decode() if isinstance(assertion, bytes) else str(assertion)
            )  # a bearer credential
        response = self._session.post(url, **kwargs)
        self.record.observe(response)
        return response

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        response = self._session.get(url, **kwargs)
        self.record.observe(response)
        return response

    def close(self) -> None:  # MSAL may close its client; the session outlives the attempt
        return None


def build_app(
    settings: O365MailSettings,
    *,
    cache: msal.SerializableTokenCache,
    http_client: Any,
) -> msal.ClientApplication:
    """The MSAL client for ``settings`` with ``cache``; a fresh ``http_cache`` every time.

    A confidential client, or for ``credential_type`` ``public_client`` a public one (no credential;
    it alone offers the device code flow). The credential (:func:`.credential.client_credential`)
    is read anew for every app, so a rotated certificate file or federated token file is picked up
    by the next token request.

    :raises ConnectionConfigError: the authority serves no OpenID configuration, or the
        certificate or federated token cannot be read.
    """
    credential = client_credential(settings)
    kwargs: dict[str, Any] = {}
    if not settings.is_microsoft_authority:
        kwargs["instance_discovery"] = False
    common = {"authority": settings.authority, "token_cache": cache, "http_client": http_client, "http_cache": {}}
    try:
        if credential is None:
            return msal.PublicClientApplication(settings.client_id, **common, **kwargs)
        return msal.ConfidentialClientApplication(settings.client_id, client_credential=credential, **common, **kwargs)
    except ValueError as err:
        raise ConnectionConfigError(
            f"Connection {settings.conn_id!r}: the authority {settings.authority} does not serve "
            "an OpenID configuration (tenant wrong, or not a V2 authority). Copy the V2 token endpoint "
            "from the app registration's Endpoints page."
        ) from err
