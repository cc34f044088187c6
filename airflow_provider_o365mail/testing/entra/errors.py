"""AADSTS errors in the shape Microsoft's v2 endpoints return them.

Texts follow Microsoft's published error reference (entra-docs ``reference-error-codes.md``) and
the wording seen in real responses. Clients must not build logic on the description text; the
code in ``error_codes`` is what matters, as at Microsoft.
"""

from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass, field


@dataclass(eq=False)
class AadstsError(Exception):
    """One AADSTS error: the OAuth ``error`` value, the numeric code and Microsoft's text."""

    error: str
    code: int
    message: str
    status: int = 400
    suberror: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def body(self, trace_id: str | None = None, correlation_id: str | None = None) -> dict:
        trace_id = trace_id or str(uuid.uuid4())
        correlation_id = correlation_id or str(uuid.uuid4())
        now = datetime.datetime.now(datetime.UTC)
        timestamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
        description = (
            f"AADSTS{self.code}: {self.message} Trace ID: {trace_id} "
            f"Correlation ID: {correlation_id} Timestamp: {timestamp}"
        )
        body: dict = {
            "error": self.error,
            "error_description": description,
            "error_codes": [self.code],
            "timestamp": timestamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": f"https://login.microsoftonline.com/error?code={self.code}",
        }
        if self.suberror:
            body["suberror"] = self.suberror
        body.update(self.extra)
        return body


def refresh_token_inactive(issued: str) -> AadstsError:
    return AadstsError(
        "invalid_grant",
        700082,
        f"The refresh token has expired due to inactivity. The token was issued on {issued} "
        "and was inactive for 90.00:00:00.",
        suberror="bad_token",
    )


def expired_or_revoked_grant() -> AadstsError:
    return AadstsError(
        "invalid_grant",
        70008,
        "The provided authorization code or refresh token has expired due to inactivity. "
        "Send a new interactive authorization request for this user and resource.",
    )


def grant_revoked() -> AadstsError:
    return AadstsError(
        "invalid_grant",
        50173,
        "The provided grant has expired due to it being revoked, a fresh auth token is needed. "
        "The user might have changed or reset their password.",
        suberror="bad_token",
    )


def consent_missing(client_id: str, app_name: str) -> AadstsError:
    return AadstsError(
        "invalid_grant",
        65001,
        f"The user or administrator has not consented to use the application with ID '{client_id}' "
        f"named '{app_name}'. Send an interactive authorization request for this user and resource.",
        suberror="consent_required",
    )


def invalid_client_secret(client_id: str) -> AadstsError:
    return AadstsError(
        "invalid_client",
        7000215,
        f"Invalid client secret provided. Ensure the secret being sent in the request is the client "
        f"secret value, not the client secret ID, for a secret added to app '{client_id}'.",
        status=401,
    )


def client_secret_expired(client_id: str) -> AadstsError:
    return AadstsError(
        "invalid_client",
        7000222,
        f"The provided client secret keys for app '{client_id}' are expired. Visit the Azure portal "
        "to create new keys for your app: https://aka.ms/NewClientSecret, or consider using "
        "certificate credentials for added security: https://aka.ms/certCreds.",
        status=401,
    )


def client_secret_missing() -> AadstsError:
    return AadstsError(
        "invalid_client",
        7000218,
        "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        status=401,
    )


def mfa_required() -> AadstsError:
    return AadstsError(
        "invalid_grant",
        50076,
        "Due to a configuration change made by your administrator, or because you moved to a new "
        "location, you must use multi-factor authentication to access "
        "'00000002-0000-0ff1-ce00-000000000000'.",
        suberror="basic_action",
        extra={"claims": '{"access_token":{"capolids":{"essential":true,"values":["sandbox"]}}}'},
    )


def conditional_access_blocked() -> AadstsError:
    return AadstsError(
        "invalid_grant",
        53003,
        "Access has been blocked by Conditional Access policies. The access policy does not allow token issuance.",
        suberror="message_only",
    )


def invalid_grant(what: str = "refresh token") -> AadstsError:
    return AadstsError(
        "invalid_grant",
        70000,
        f"The provided value for the '{what}' parameter is not valid. The grant is invalid or malformed.",
    )


def code_already_redeemed() -> AadstsError:
    return AadstsError(
        "invalid_grant",
        54005,
        "OAuth2 Authorization code was already redeemed, please retry with a new valid code or use "
        "an existing refresh token.",
    )


def missing_parameter(name: str) -> AadstsError:
    return AadstsError(
        "invalid_request",
        900144,
        f"The request body must contain the following parameter: '{name}'.",
    )


def application_not_found(client_id: str, tenant: str) -> AadstsError:
    return AadstsError(
        "unauthorized_client",
        700016,
        f"Application with identifier '{client_id}' was not found in the directory '{tenant}'. This "
        "can happen if the application has not been installed by the administrator of the tenant or "
        "consented to by any user in the tenant. You may have sent your authentication request to the "
        "wrong tenant.",
    )


def tenant_not_found(tenant: str) -> AadstsError:
    return AadstsError(
        "invalid_request",
        90002,
        f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are "
        "signing into the correct cloud.",
        status=400,
    )


def redirect_uri_mismatch(redirect_uri: str, client_id: str) -> AadstsError:
    return AadstsError(
        "invalid_request",
        50011,
        f"The redirect URI '{redirect_uri}' specified in the request does not match the redirect URIs "
        f"configured for the application '{client_id}'. Make sure the redirect URI sent in the request "
        "matches one added to your application in the Azure portal.",
    )


def pkce_mismatch() -> AadstsError:
    return AadstsError(
        "invalid_grant",
        501481,
        "The Code_Verifier does not match the code_challenge supplied in the authorization request.",
    )


def multiple_resources() -> AadstsError:
    return AadstsError(
        "invalid_request",
        28000,
        "Provided value for the input parameter scope is not valid because it contains more than one "
        "resource. Scope {scopes} is not valid.",
    )


def client_credentials_scope(scope: str) -> AadstsError:
    return AadstsError(
        "invalid_scope",
        1002012,
        f"The provided value for scope {scope} is not valid. Client credential flows must have a "
        "scope value with /.default suffixed to the resource identifier (application ID URI).",
    )


def unsupported_grant_type(grant_type: str) -> AadstsError:
    return AadstsError(
        "unsupported_grant_type",
        70003,
        f"The app requested an unsupported grant type '{grant_type}'.",
    )


def user_declined() -> AadstsError:
    return AadstsError("access_denied", 65004, "User declined to consent to access the app.")


def invalid_credentials() -> AadstsError:
    return AadstsError("invalid_grant", 50126, "Error validating credentials due to invalid username or password.")


def throttled() -> AadstsError:
    return AadstsError(
        "temporarily_unavailable",
        50196,
        "The server terminated an operation because it encountered a client request loop. Please "
        "contact your app vendor.",
        status=429,
    )


def service_unavailable() -> AadstsError:
    return AadstsError(
        "temporarily_unavailable",
        90033,
        "A transient error has occurred. Please try again.",
        status=503,
    )
