"""Map identity-provider refusals (MSAL result dicts) to this provider's exceptions (no I/O)."""

from __future__ import annotations

from airflow_provider_o365mail import exceptions as exc
from airflow_provider_o365mail import hints

REAUTHORIZE = hints.REAUTHORIZE

#: code -> (exception class, cause, fix). ``{conn_id}`` is filled in.
AADSTS: dict[int, tuple[type[exc.AuthorizationError], str, str]] = {
    65001: (
        exc.ConsentRevoked,
        "consent for this app is missing or was removed (for example at myapps.microsoft.com)",
        REAUTHORIZE,
    ),
    50173: (
        exc.GrantRevoked,
        "the grant was revoked and a fresh sign-in is needed (an admin revoked the user's sessions, the password "
        "was reset in the Entra admin center, or the user revoked their own sessions)",
        REAUTHORIZE,
    ),
    70008: (exc.GrantRevoked, "the refresh token expired or was revoked", REAUTHORIZE),
    700082: (
        exc.RefreshTokenExpired,
        "the refresh token was not used for 90 days and expired",
        REAUTHORIZE + " Then let a DAG use the connection at least every few weeks.",
    ),
    70043: (
        exc.InteractionRequired,
        "a Conditional Access sign-in frequency policy requires the user to sign in again (the grant's last "
        "interactive sign-in is older than the policy allows; using the refresh token does not renew it)",
        REAUTHORIZE + " " + hints.SIGN_IN_FREQUENCY,
    ),
    50076: (
        exc.InteractionRequired,
        "Conditional Access (or per-user MFA) now requires multi-factor authentication, and the grant's sign-in "
        "had none",
        REAUTHORIZE + " " + hints.SIGN_IN_WITH_MFA,
    ),
    50078: (
        exc.InteractionRequired,
        "the user's multi-factor authentication expired under a Conditional Access policy",
        REAUTHORIZE + " " + hints.SIGN_IN_WITH_MFA,
    ),
    50079: (
        exc.InteractionRequired,
        "the user must register for multi-factor authentication before a token is issued",
        "Sign in once as the mailbox user at https://aka.ms/mfasetup and register a method. " + REAUTHORIZE,
    ),
    53003: (
        exc.AccessBlocked,
        "Conditional Access policies block token issuance for this user or app",
        hints.CONDITIONAL_ACCESS,
    ),
    7000215: (
        exc.ClientCredentialError,
        "the client secret is wrong (often the secret ID was pasted instead of its Value)",
        hints.NEW_CLIENT_SECRET,
    ),
    7000222: (
        exc.ClientCredentialError,
        "the client secret has expired",
        hints.NEW_CLIENT_SECRET,
    ),
    7000218: (exc.ClientCredentialError, "no client secret was sent", "Fill in the connection's Client secret."),
    700016: (
        exc.ClientCredentialError,
        "the Client ID is not an app in this tenant",
        "Check the connection's Client ID (Application (client) ID) and tenant.",
    ),
    90002: (
        exc.InvalidRequestError,
        "the tenant does not exist in this cloud",
        "Check tenant_id / authority and the cloud setting.",
    ),
    700022: (
        exc.InvalidRequestError,
        "the scopes mix several resources",
        "Keep only https://outlook.office.com/... scopes in the connection's scopes.",
    ),
    28000: (
        exc.InvalidRequestError,
        "the scopes mix several resources",
        "Keep only https://outlook.office.com/... scopes in the connection's scopes.",
    ),
    70000: (exc.ReauthorizationRequired, "the refresh token is invalid or malformed", REAUTHORIZE),
    54005: (
        exc.InvalidRequestError,
        "the authorization code was already redeemed",
        "Start the authorization again; codes are single-use.",
    ),
    900144: (
        exc.InvalidRequestError,
        "a required parameter was missing from the token request",
        "Check the connection's scopes; report a bug if they are set.",
    ),
    1002012: (
        exc.InvalidRequestError,
        "client credentials need a '/.default' scope",
        "Set scopes to https://outlook.office365.com/.default.",
    ),
    700025: (
        exc.ClientCredentialError,
        "the app is registered as a public client",
        "Register the redirect URI under 'Web' (not Mobile/desktop) so the app is a confidential client.",
    ),
    50011: (
        exc.InvalidRequestError,
        "the redirect URI is not registered for the app",
        "Add the provider's Callback URL as a Web redirect URI in the app registration.",
    ),
    700027: (
        exc.ClientCredentialError,
        "the client assertion failed signature validation: its certificate is not registered on the app, or the "
        "key does not match it",
        hints.CERTIFICATE_NOT_REGISTERED,
    ),
    700024: (
        exc.ClientCredentialError,
        "the client assertion is not within its valid time range (expired federated token, or clock skew)",
        hints.ASSERTION_CLOCK
        + " For a federated token file: check that the file is refreshed (AKS projects a new token hourly).",
    ),
    50012: (
        exc.ClientCredentialError,
        "the client assertion was refused (its audience is not this token endpoint, or its certificate is not trusted)",
        "Check the connection's tenant/authority: the assertion's audience is its V2 token endpoint.",
    ),
    50013: (
        exc.ClientCredentialError,
        "the client assertion is invalid (for example replayed)",
        "Do not reuse a client assertion; report a bug if the connection's own credential causes this.",
    ),
    50027: (
        exc.ClientCredentialError,
        "the client assertion or federated token is not a valid JWT for this app (issuer, claims or signature)",
        hints.FEDERATED_CREDENTIAL_MISMATCH,
    ),
    50048: (
        exc.ClientCredentialError,
        "the client assertion's subject does not match its issuer",
        "A client assertion needs iss = sub = the Client ID.",
    ),
    70021: (
        exc.ClientCredentialError,
        "no federated credential matches the token",
        hints.FEDERATED_CREDENTIAL_MISMATCH,
    ),
    700211: (
        exc.ClientCredentialError,
        "no federated credential matches the federated token's issuer",
        hints.FEDERATED_CREDENTIAL_MISMATCH,
    ),
    700212: (
        exc.ClientCredentialError,
        "no federated credential matches the federated token's audience",
        hints.FEDERATED_CREDENTIAL_MISMATCH,
    ),
    700213: (
        exc.ClientCredentialError,
        "no federated credential matches the federated token's subject",
        hints.FEDERATED_CREDENTIAL_MISMATCH,
    ),
}

#: A public client (``credential_type`` ``public_client``) sends no credential on purpose: these
#: codes then mean something else than for a confidential client.
PUBLIC_CLIENT_AADSTS: dict[int, tuple[type[exc.AuthorizationError], str, str]] = {
    7000218: (
        exc.ClientCredentialError,
        "the app registration does not allow public client flows, so Entra ID expects a client secret or assertion",
        hints.ALLOW_PUBLIC_CLIENT,
    ),
}

#: The device code flow's endings (Microsoft's v2 device code reference, "Expected errors"), other than
#: ``authorization_pending`` and ``slow_down``, which MSAL keeps polling on.
DEVICE_FLOW_ERRORS: dict[str, tuple[type[exc.AuthorizationError], str, str]] = {
    "authorization_declined": (
        exc.AuthorizationError,
        "the sign-in was declined on the device login page",
        "Accept the permissions when signing in. " + hints.DEVICE_CODE_AGAIN,
    ),
    "expired_token": (
        exc.AuthorizationError,
        "nobody signed in with the code before it expired (codes are valid for 15 minutes)",
        hints.DEVICE_CODE_AGAIN + " Enter the code soon after it is printed.",
    ),
    "bad_verification_code": (
        exc.InvalidRequestError,
        "the identity provider did not recognise the device code",
        hints.DEVICE_CODE_AGAIN,
    ),
}

BY_ERROR = {
    "invalid_client": (
        exc.ClientCredentialError,
        "the client ID or secret was refused",
        "Check the Client ID and Client secret of the connection.",
    ),
    "interaction_required": (exc.InteractionRequired, "the user must sign in interactively", REAUTHORIZE),
    "consent_required": (exc.ConsentRevoked, "consent is required", REAUTHORIZE),
    "invalid_grant": (exc.ReauthorizationRequired, "the refresh token was refused", REAUTHORIZE),
}


#: Codes Microsoft's reference (entra-docs ``reference-error-codes.md``) describes as temporary. A
#: refusal carrying one is retried like a 5xx even when its ``error`` is ``invalid_grant``, and is never
#: reported as a revoked grant. The codes of a real revocation or expiry (50173, 70008, 700082, 70043,
#: 65001 above) stay permanent. Microsoft documents no code for clock skew on a refresh-token redemption
#: (the request carries no client time; skew matters for client assertions) nor for replica lag.
TRANSIENT_AADSTS: dict[int, str] = {
    50033: "RetryableError: a transient error",
    50087: "SasRetryableError: a transient error during strong authentication",
    90006: "ExternalServerRetryableError: the service is temporarily unavailable",
    90012: "RequestTimeout",
    90024: "RequestBudgetExceededError: a transient error",
    90033: "MsodsServiceUnavailable: the directory service is not available",
    90090: "GraphRetryableError: the service is temporarily unavailable",
}


def transient_refusal(result: dict) -> str | None:
    """``AADSTS<code> <name>`` when the refusal carries a code Microsoft calls temporary, else None."""
    for code in result.get("error_codes") or []:
        if str(code).isdigit() and int(code) in TRANSIENT_AADSTS:
            return f"AADSTS{code} {TRANSIENT_AADSTS[int(code)]}"
    return None


def authorization_error(result: dict, conn_id: str, *, public_client: bool = False) -> exc.AuthorizationError:
    """The exception for an MSAL error result; the message never contains the description's secrets.

    :param public_client: the connection has no credential (``credential_type`` ``public_client``).
    """
    codes = [int(c) for c in result.get("error_codes") or [] if str(c).isdigit()]
    error = str(result.get("error", "unknown_error"))
    table = {**AADSTS, **PUBLIC_CLIENT_AADSTS} if public_client else AADSTS
    entry = DEVICE_FLOW_ERRORS.get(error) or next((table[c] for c in codes if c in table), None) or BY_ERROR.get(error)
    code_text = ", ".join(f"AADSTS{c}" for c in codes) or error
    if entry is None:
        cls, cause, fix = (
            exc.InvalidRequestError,
            "the identity provider refused the request",
            "Check the connection's fields; the AADSTS code explains the refusal.",
        )
    else:
        cls, cause, fix = entry
    if public_client:
        fix = hints.for_public_client(fix)
    correlation = result.get("correlation_id")
    message = (
        f"Microsoft 365 token request for connection {conn_id!r} failed ({code_text}, {error}): {cause}. "
        f"{fix.format(conn_id=conn_id)}"
    )
    if correlation:
        message += f" [correlation_id {correlation}]"
    return cls(message, conn_id=conn_id, error=error, error_codes=codes, correlation_id=correlation)
