"""Map identity-provider refusals (MSAL result dicts) to this provider's exceptions (no I/O)."""

from __future__ import annotations

from airflow_provider_o365mail import exceptions as exc

REAUTHORIZE = "Re-authorize: 'airflow o365mail authorize --conn-id {conn_id}' or the Authorize button on the Airflow UI page Microsoft 365 Mail."

#: code -> (exception class, cause, fix). ``{conn_id}`` is filled in.
AADSTS: dict[int, tuple[type[exc.AuthorizationError], str, str]] = {
    65001: (
        exc.ConsentRevoked,
        "consent for this app is missing or was removed (for example at myapps.microsoft.com)",
        REAUTHORIZE,
    ),
    50173: (
        exc.GrantRevoked,
        "the grant was revoked (sessions revoked by an admin, or the password was reset)",
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
        "a Conditional Access sign-in frequency policy requires a new sign-in",
        REAUTHORIZE + " Or ask the admin to exclude this app from the sign-in frequency policy.",
    ),
    50076: (exc.InteractionRequired, "multi-factor authentication is now required for this user", REAUTHORIZE),
    50078: (exc.InteractionRequired, "the user's multi-factor authentication expired", REAUTHORIZE),
    50079: (exc.InteractionRequired, "the user must register for multi-factor authentication", REAUTHORIZE),
    53003: (
        exc.AccessBlocked,
        "Conditional Access policies block token issuance for this user or app",
        "Ask the Entra ID admin to allow this app in Conditional Access (sign-in logs show the policy), then re-authorize.",
    ),
    7000215: (
        exc.ClientCredentialError,
        "the client secret is wrong (often the secret ID was pasted instead of its Value)",
        "Create a new secret in the app's Certificates & secrets and put its Value in the connection's Client secret.",
    ),
    7000222: (
        exc.ClientCredentialError,
        "the client secret has expired",
        "Create a new secret in the app's Certificates & secrets and put its Value in the connection's Client secret.",
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


def authorization_error(result: dict, conn_id: str) -> exc.AuthorizationError:
    """The exception for an MSAL error result; the message never contains the description's secrets."""
    codes = [int(c) for c in result.get("error_codes") or [] if str(c).isdigit()]
    error = str(result.get("error", "unknown_error"))
    entry = next((AADSTS[c] for c in codes if c in AADSTS), None) or BY_ERROR.get(error)
    code_text = ", ".join(f"AADSTS{c}" for c in codes) or error
    if entry is None:
        cls, cause, fix = (
            exc.InvalidRequestError,
            "the identity provider refused the request",
            "Check the connection's fields; the AADSTS code explains the refusal.",
        )
    else:
        cls, cause, fix = entry
    correlation = result.get("correlation_id")
    message = (
        f"Microsoft 365 token request for connection {conn_id!r} failed ({code_text}, {error}): {cause}. "
        f"{fix.format(conn_id=conn_id)}"
    )
    if correlation:
        message += f" [correlation_id {correlation}]"
    return cls(message, conn_id=conn_id, error=error, error_codes=codes, correlation_id=correlation)
