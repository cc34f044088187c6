"""Consent: the authorization-code flow (PKCE, state, nonce) and storing its result.

Shared by ``airflow o365mail authorize`` and the api-server plugin's Authorize button. MSAL builds
the flow (``initiate_auth_code_flow``: state, nonce and a PKCE verifier) and redeems it
(``acquire_token_by_auth_code_flow``: checks state and the ID token's nonce). A connection that may
send through Microsoft Graph (``transport`` graph or auto) asks consent for Exchange and Graph at once
(``/authorize`` may span resources) and redeems the code for Exchange's scopes only: a token request
names one resource (else AADSTS28000); the same refresh token later yields Graph tokens. The result is stored
twice: the refresh token into the connection (when it lives in the metadata DB) and the whole MSAL
cache into the encrypted token store, so the next task needs no request at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msal

from airflow_provider_o365mail.auth.errors import authorization_error
from airflow_provider_o365mail.auth.masking import mask, mask_result
from airflow_provider_o365mail.auth.msal_app import build_app
from airflow_provider_o365mail.auth.store import TokenStore, fingerprint
from airflow_provider_o365mail.connection import O365MailSettings
from airflow_provider_o365mail.exceptions import AuthorizationError, ConnectionConfigError, InvalidRequestError
from airflow_provider_o365mail.tls import IdentityProviderSession

log = logging.getLogger(__name__)

#: What the callback's ``error`` values mean for the person consenting.
CALLBACK_ERROR_HINTS = {
    "access_denied": "The user cancelled or declined consent. Run Authorize again and accept the permissions.",
    "consent_required": "An administrator must grant consent for this app (Enterprise applications > "
    "Permissions > Grant admin consent), or allow users to consent.",
    "interaction_required": "The sign-in needs user interaction (MFA, terms of use). Run Authorize again in a browser.",
    "invalid_request": "The request was rejected: check that the Callback URL is registered as a Web redirect "
    "URI of the app, exactly (AADSTS50011 means it is not).",
    "unauthorized_client": "The app may not use the authorization-code flow: register the Callback URL under "
    "the Web platform, not Single-page application.",
    "server_error": "Microsoft's sign-in service failed; try again.",
    "temporarily_unavailable": "Microsoft's sign-in service is busy; try again in a minute.",
}


@dataclass(frozen=True)
class ConsentResult:
    """Who consented, to what; the secrets stay out of ``repr``."""

    conn_id: str
    username: str
    name: str | None
    scopes: tuple[str, ...]
    refresh_token: str = field(repr=False)
    msal_cache: str = field(repr=False)
    connection_updated: bool = False
    #: Scopes of other resources consented to in the same sign-in (Microsoft Graph), not in this token.
    also_consented: tuple[str, ...] = ()


def parse_redirect(url_or_query: str) -> dict[str, str]:
    """The authorization response from a pasted redirect URL (or its query string)."""
    text = url_or_query.strip()
    query = urlsplit(text).query if "://" in text or text.startswith("/") else text.lstrip("?")
    parsed = {key: values[-1] for key, values in parse_qs(query, keep_blank_values=True).items()}
    if not parsed:
        raise ValueError("No authorization response in that URL: it should contain ?code=...&state=...")
    return parsed


class ConsentFlow:
    """Start and finish the authorization-code flow for one connection."""

    def __init__(self, settings: O365MailSettings, redirect_uri: str) -> None:
        if not settings.delegated:
            raise ConnectionConfigError(
                f"Connection {settings.conn_id!r} uses client_credentials (app-only): there is nothing to consent "
                "to. An administrator grants application permissions in Entra ID instead."
            )
        self.settings = settings
        self.redirect_uri = redirect_uri
        self._cache = msal.SerializableTokenCache()
        mask(settings.client_secret)

    def _app(self) -> msal.ClientApplication:
        return build_app(
            self.settings,
            cache=self._cache,
            http_client=IdentityProviderSession(
                self.settings.ca_bundle, self.settings.timeout, proxy=self.settings.http_proxy
            ),
        )

    def start(self, *, login_hint: str | None = None) -> dict[str, Any]:
        """A new flow: ``flow["auth_uri"]`` is where the browser goes. Keep the flow secret (PKCE verifier).

        It asks :attr:`O365MailSettings.consent_scopes`: Exchange's, plus Graph's when the connection may
        send through Graph, so one sign-in covers both resources.
        """
        return self._app().initiate_auth_code_flow(
            list(self.settings.consent_scopes),
            redirect_uri=self.redirect_uri,
            login_hint=login_hint or self.settings.mailbox or None,
            prompt="select_account",
        )

    def finish(self, flow: Mapping[str, Any], auth_response: Mapping[str, str]) -> ConsentResult:
        """Redeem the code; raise :class:`AuthorizationError` with the fix when anything is wrong."""
        conn_id = self.settings.conn_id
        if "error" in auth_response:
            error = str(auth_response.get("error"))
            description = str(auth_response.get("error_description") or "")
            hint = CALLBACK_ERROR_HINTS.get(error, "")
            mapped = authorization_error(
                {"error": error, "error_description": description},
                conn_id,
                public_client=self.settings.public_client,
            )
            raise type(mapped)(
                f"Authorization for {conn_id!r} failed: {error}: {description[:300]} {hint}".strip(),
                conn_id=conn_id,
                error=error,
                error_codes=mapped.error_codes,
            )
        try:
            # One resource per token request: the consent may span Exchange and Graph, the redemption
            # may not (MSAL: "you will need to provide a subset"). Graph tokens come from the refresh token.
            result = self._app().acquire_token_by_auth_code_flow(
                dict(flow), dict(auth_response), scopes=list(self.settings.scopes)
            )
        except ValueError as err:  # MSAL: state mismatch, missing code...
            raise InvalidRequestError(
                f"Authorization for {conn_id!r} was refused: the response does not belong to this sign-in ({err}). "
                "Start Authorize again and use the newest link only once.",
                conn_id=conn_id,
            ) from None
        mask_result(result)
        if "error" in result:
            raise authorization_error(result, conn_id, public_client=self.settings.public_client)
        also = tuple(s for s in self.settings.consent_scopes if s not in self.settings.scopes)
        return dataclasses.replace(consent_result(conn_id, result, self._cache), also_consented=also)


def consent_result(conn_id: str, result: dict, cache: msal.SerializableTokenCache) -> ConsentResult:
    """A successful interactive sign-in's result (any flow): who, which scopes, the grant and the cache."""
    refresh_token = result.get("refresh_token")
    if not refresh_token:
        raise InvalidRequestError(
            f"Authorization for {conn_id!r} returned no refresh token: the scopes must include offline_access "
            "(MSAL adds it) and the app must be allowed to use it.",
            conn_id=conn_id,
        )
    claims = result.get("id_token_claims") or {}
    return ConsentResult(
        conn_id=conn_id,
        username=str(claims.get("preferred_username") or claims.get("upn") or claims.get("email") or "unknown"),
        name=claims.get("name"),
        scopes=tuple(str(result.get("scope", "")).split()),
        refresh_token=refresh_token,
        msal_cache=cache.serialize(),
    )


def store_consent(result: ConsentResult, *, session: Any = None) -> ConsentResult:
    """Persist a consent: refresh token into the DB connection (if it is there), cache into the token store.

    A connection defined outside the metadata DB (environment variable, secrets backend) cannot be
    updated from here; the token store then carries the grant, seeded against the connection's
    current refresh token so that it is used.
    """
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session

    updated = False
    with create_session() if session is None else contextlib.nullcontext(session) as db:
        connection = db.query(Connection).filter(Connection.conn_id == result.conn_id).one_or_none()
        if connection is not None:
            extra = json.loads(connection.extra or "{}") if connection.extra else {}
            extra["refresh_token"] = result.refresh_token
            connection.set_extra(json.dumps(extra))
            updated = True
            seed = fingerprint(result.refresh_token)
        else:
            seed = _current_seed(result.conn_id)
    store = TokenStore(result.conn_id)
    with store.refresh_lock() as lease:
        store.save(result.msal_cache, seed, fence=lease.fence or 0)
    if not updated:
        log.warning(
            "Connection %s is not in the metadata DB (environment variable or secrets backend): its refresh token "
            "was not replaced; the encrypted token store holds the new grant.",
            result.conn_id,
        )
    return ConsentResult(**{**result.__dict__, "connection_updated": updated})


def _current_seed(conn_id: str) -> str | None:
    from airflow_provider_o365mail.connection import settings_from_connection
    from airflow_provider_o365mail.runtime import load_connection

    try:
        return fingerprint(settings_from_connection(load_connection(conn_id)).refresh_token)
    except Exception:
        return None


__all__ = ["AuthorizationError", "ConsentFlow", "ConsentResult", "consent_result", "parse_redirect", "store_consent"]
