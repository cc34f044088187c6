"""Consent with the device code flow, for a connection without a credential (a public client).

``airflow o365mail authorize --device-code`` prints a code and a URL; someone opens the URL on any
device, enters the code and signs in as the mailbox user, while this side polls the token endpoint
(MSAL's ``acquire_token_by_device_flow``: it waits ``interval`` seconds between polls, adds 5 s on
``slow_down`` and stops when the code expires). The result is stored like any consent
(:func:`.consent.store_consent`). Entra ID allows the flow only for an app registration with
"Allow public client flows" on; later refreshes of the grant send no secret either.

One resource only: unlike the authorization code (redeemed for a subset of what ``/authorize``
asked), a device code is redeemed without a scope parameter, so it carries the scopes it was
issued for, and Entra refuses a device code spanning Exchange and Graph (AADSTS28000/70011). It
asks Exchange's scopes (:attr:`O365MailSettings.scopes`); a connection that sends through Graph
then needs Graph consent given otherwise (a browser consent, which asks for both, or admin
consent): ``airflow o365mail authorize --device-code`` checks for it and says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msal
import requests

from airflow_provider_o365mail.auth.consent import ConsentResult, consent_result
from airflow_provider_o365mail.auth.errors import authorization_error
from airflow_provider_o365mail.auth.masking import mask, mask_result
from airflow_provider_o365mail.auth.msal_app import build_app
from airflow_provider_o365mail.connection import O365MailSettings
from airflow_provider_o365mail.exceptions import ConnectionConfigError, IdentityProviderUnavailable
from airflow_provider_o365mail.tls import IdentityProviderSession


@dataclass(frozen=True)
class DeviceCode:
    """What the person signing in needs (``message`` says it in Entra's words), and the flow to poll."""

    user_code: str
    verification_uri: str
    message: str
    expires_at: float
    flow: dict[str, Any] = field(repr=False)  # holds the device code, a bearer secret until redeemed


class DeviceCodeConsent:
    """Start the device code flow for one public-client connection and wait for its sign-in."""

    def __init__(self, settings: O365MailSettings) -> None:
        if not settings.delegated:
            raise ConnectionConfigError(
                f"Connection {settings.conn_id!r} uses client_credentials (app-only): there is nothing to consent "
                "to. An administrator grants application permissions in Entra ID instead."
            )
        if not settings.public_client:
            raise ConnectionConfigError(
                f"Connection {settings.conn_id!r} has a {settings.credential_type.replace('_', ' ')} credential: the "
                "device code flow is for public clients. Set credential_type to public_client (and remove the "
                "secret or certificate) on an app that allows public client flows, or authorize without "
                "--device-code."
            )
        self.settings = settings
        self._cache = msal.SerializableTokenCache()
        self._app: msal.PublicClientApplication | None = self._build()

    def _build(self) -> msal.PublicClientApplication:
        s = self.settings
        http = IdentityProviderSession(s.ca_bundle, s.timeout, proxy=s.http_proxy)
        return build_app(s, cache=self._cache, http_client=http)  # type: ignore[return-value]

    def start(self) -> DeviceCode:
        """Ask for a device code (Exchange's scopes: one resource, see the module docstring);
        :class:`AuthorizationError` (with the fix) when the request is refused."""
        assert self._app is not None
        try:
            flow = self._app.initiate_device_flow(scopes=list(self.settings.scopes))
        except (msal.exceptions.MsalServiceError, requests.RequestException) as err:
            raise IdentityProviderUnavailable(
                f"Device code request for {self.settings.conn_id!r} failed ({type(err).__name__}); nothing was "
                "started. Check network access to the login host and run the command again."
            ) from None
        if "user_code" not in flow:
            mask_result(flow)
            raise authorization_error(flow, self.settings.conn_id, public_client=True)
        mask(str(flow.get("device_code") or ""))
        return DeviceCode(
            user_code=str(flow["user_code"]),
            verification_uri=str(flow.get("verification_uri") or flow.get("verification_url") or ""),
            message=str(flow.get("message") or ""),
            expires_at=float(flow["expires_at"]),
            flow=flow,
        )

    def wait(self, code: DeviceCode, *, until: Callable[[], bool] | None = None) -> ConsentResult:
        """Poll until someone signs in with ``code``, it is declined, or it expires.

        One poll at a time through MSAL (which adds 5 s to the interval on ``slow_down``); a poll
        that fails on the way (5xx, network) is retried at the interval: polling may last 15
        minutes, and a person who already signed in must not lose the consent to one hiccup.

        :param until: stop early when it returns True (then :class:`TimeoutError`).
        """
        conn_id = self.settings.conn_id
        flow = code.flow
        failures = 0
        while True:
            try:
                if self._app is None:  # rebuilt after a failure (fetches the discovery document again)
                    self._app = self._build()
                result = self._app.acquire_token_by_device_flow(flow, exit_condition=lambda _flow: True)
            except (msal.exceptions.MsalServiceError, requests.RequestException, ConnectionConfigError) as err:
                # ConnectionConfigError: the rebuild found no discovery document, which start() had: transient.
                failures += 1
                result = {"error": "authorization_pending", "transient": type(err).__name__}
                # MSAL replays a 5xx from its throttling cache for a minute (public clients): a new
                # application object (the same token cache) asks the identity provider again.
                self._app = None
            else:
                mask_result(result)
                if result.get("error") not in ("authorization_pending", "slow_down"):
                    break
            for _ in range(int(flow.get("interval", 5))):
                if until is not None and until():
                    raise TimeoutError(
                        f"Nobody signed in with the device code for {conn_id!r} before --timeout passed; nothing "
                        "was stored. Run the command again (with a larger --timeout if needed)."
                    )
                if time.time() > float(flow["expires_at"]):
                    if "transient" in result:
                        raise IdentityProviderUnavailable(
                            f"Device code sign-in for {conn_id!r}: the token endpoint kept failing "
                            f"({failures} polls, last {result['transient']}) until the code expired; nothing was "
                            "stored. Run the command again when the identity provider answers."
                        )
                    raise authorization_error({"error": "expired_token"}, conn_id, public_client=True)
                time.sleep(1)
        if "error" in result:
            raise authorization_error(result, conn_id, public_client=True)
        return consent_result(conn_id, result, self._cache)


__all__ = ["DeviceCode", "DeviceCodeConsent"]
