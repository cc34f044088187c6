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


def mfa_expired() -> AadstsError:
    """AADSTS50078 UserStrongAuthExpired (the reference's text)."""
    return AadstsError(
        "invalid_grant",
        50078,
        "Presented multi-factor authentication has expired due to policies configured by your administrator, you "
        "must refresh your multi-factor authentication to access '00000002-0000-0ff1-ce00-000000000000'.",
        suberror="basic_action",
    )


def mfa_registration_required() -> AadstsError:
    """AADSTS50079 UserStrongAuthEnrollmentRequired (the reference's text)."""
    return AadstsError(
        "invalid_grant",
        50079,
        "Due to a configuration change made by your administrator, or because you moved to a new location, you must "
        "enroll in multi-factor authentication to access '00000002-0000-0ff1-ce00-000000000000'.",
        suberror="basic_action",
    )


def sign_in_frequency(issued: str, max_age_seconds: int) -> AadstsError:
    """AADSTS70043 BadTokenDueToInteractionRequired: a Conditional Access sign-in frequency policy (the
    reference's text; the wording real responses carry, email-oauth2-proxy#181)."""
    return AadstsError(
        "invalid_grant",
        70043,
        "The refresh token has expired or is invalid due to sign-in frequency checks by conditional access. The token "
        f"was issued on {issued} and the maximum allowed lifetime for this request is {max_age_seconds}.",
        suberror="bad_token",
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


# --------------------------------------------------------------------- client assertions
_FIC_HELP = (
    "Please check your federated identity credential Subject, Audience and Issuer against the presented "
    "assertion. https://learn.microsoft.com/entra/workload-id/workload-identity-federation"
)


def certificate_not_registered(client_id: str, thumbprint: str) -> AadstsError:
    return AadstsError(
        "invalid_client",
        700027,
        "The certificate with identifier used to sign the client assertion is not registered on application. "
        f"[Reason - The key was not found., Thumbprint of key used by client: '{thumbprint}', Please visit the "
        "Azure Portal, Graph Explorer or directly use MS Graph to see configured keys for app Id "
        f"'{client_id}'.]",
        status=401,
    )


def assertion_signature_invalid(client_id: str, thumbprint: str) -> AadstsError:
    return AadstsError(
        "invalid_client",
        700027,
        "Client assertion failed signature validation. [Reason - The provided signature value did not match the "
        f"expected signature value., Thumbprint of key used by client: '{thumbprint}', app Id '{client_id}'.]",
        status=401,
    )


def assertion_time_range(now: float, not_before: float | None, expires: float) -> AadstsError:
    def stamp(value: float | None) -> str:
        moment = datetime.datetime.fromtimestamp(value or 0, datetime.UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.0000000Z")

    return AadstsError(
        "invalid_client",
        700024,
        f"Client assertion is not within its valid time range. Current time: {stamp(now)}, assertion valid from "
        f"{stamp(not_before)}, expiry time of assertion {stamp(expires)}. Review the documentation at "
        "https://learn.microsoft.com/entra/identity-platform/certificate-credentials .",
        status=401,
    )


def assertion_audience(audience: object) -> AadstsError:
    return AadstsError(
        "invalid_client",
        50012,
        f"Client assertion audience claim does not match Realm issuer. Audience presented: '{audience}'.",
        status=401,
    )


def invalid_jwt(reason: str) -> AadstsError:
    """AADSTS50027 InvalidJwtToken: malformed, unexpected issuer, missing claims, bad external signature."""
    return AadstsError("invalid_client", 50027, f"Invalid JWT token. {reason}", status=401)


def subject_mismatches_issuer() -> AadstsError:
    return AadstsError("invalid_client", 50048, "Subject mismatches Issuer claim in the client assertion.", status=401)


def assertion_replayed() -> AadstsError:
    """Microsoft documents no code of its own for a replayed ``jti``: AADSTS50013 is InvalidAssertion."""
    return AadstsError(
        "invalid_client",
        50013,
        "Assertion is invalid because of various reasons: the jti of this client assertion was already used.",
        status=401,
    )


def _no_federated_match(code: int, claim: str, value: object) -> AadstsError:
    return AadstsError(
        "invalid_client",
        code,
        f"No matching federated identity record found for presented assertion {claim} '{value}'. {_FIC_HELP}",
        status=401,
    )


def no_federated_issuer(issuer: str) -> AadstsError:
    return _no_federated_match(700211, "issuer", issuer)


def no_federated_audience(audience: object) -> AadstsError:
    return _no_federated_match(700212, "audience", audience)


def no_federated_subject(subject: str) -> AadstsError:
    return _no_federated_match(700213, "subject", subject)


#: Codes Microsoft's reference calls transient (its descriptions, trimmed); injected as faults.
TRANSIENT_TEXTS = {
    50033: "RetryableError - Indicates a transient error not related to the database operations.",
    90024: "RequestBudgetExceededError - A transient error has occurred. Try again.",
    90033: "MsodsServiceUnavailable - The Microsoft Online Directory Service (MSODS) isn't available.",
}


def injected(code: int, error: str, status: int) -> AadstsError:
    """A refusal with ``code`` (one of :data:`TRANSIENT_TEXTS`) and the ``error`` value a test chose."""
    return AadstsError(error, code, TRANSIENT_TEXTS[code], status=status)


# ----------------------------------------------------------------- device code flow
# Microsoft's v2 device code reference ("Expected errors") names the ``error`` values; the codes are
# the error reference's: AuthorizationPending 70016, CodeExpired 70019, BadVerificationCode 70018
# (a wrong user code typed on the page), UserDeclinedConsent 65004. ``slow_down`` is RFC 8628's; the
# reference lists no code of its own for it, so it carries the pending code, as a variant of pending.


def device_authorization_pending() -> AadstsError:
    return AadstsError(
        "authorization_pending",
        70016,
        "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
    )


def device_slow_down(interval: int) -> AadstsError:
    return AadstsError(
        "slow_down",
        70016,
        f"OAuth 2.0 device flow error. The client polled too often: wait at least {interval} seconds between polls.",
    )


def device_code_expired() -> AadstsError:
    return AadstsError("expired_token", 70019, "Verification code expired. Have the user retry the sign-in.")


def device_authorization_declined() -> AadstsError:
    return AadstsError("authorization_declined", 65004, "User declined to consent to access the app.")


def device_code_unknown() -> AadstsError:
    return AadstsError(
        "bad_verification_code",
        70000,
        "The provided value for the input parameter 'device_code' is not valid.",
    )


def user_code_wrong() -> AadstsError:
    return AadstsError(
        "invalid_request",
        70018,
        "Invalid verification code due to User typing in wrong user code for device code flow.",
    )
