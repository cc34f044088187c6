"""Every fix-it hint the provider shows, in one table (no logic, no imports).

Errors, ``doctor``, the hook and the UI page say what to do in the same words. Placeholders are
filled with ``str.format``: ``{conn_id}``, ``{mailbox}``, ``{reply}``.
"""

from __future__ import annotations

#: The documentation site (built from docs/ by mkdocs.yml; pip users have no docs/ folder).
DOCS_URL = "https://o365mail.github.io/airflow-provider-o365mail"

REAUTHORIZE = (
    "Re-authorize: 'airflow o365mail authorize --conn-id {conn_id}' or the Authorize button on the Airflow UI "
    "page Microsoft 365 Mail."
)
REFRESH_KEEPALIVE = (
    "Nothing uses this connection often enough and the credential watch is off ([o365mail] credential_watch): turn "
    "it on, or schedule 'airflow o365mail refresh {conn_id}' (or the example DAG example_o365mail_keepalive) at least "
    f"every few weeks; see {DOCS_URL}/token-store.md#keep-alive."
)
REFRESH_WATCH_FAILED = (
    "The credential watch redeems refresh tokens unused for {days} days, and did not renew this one: run "
    "'airflow o365mail refresh {conn_id}' now, and see the 'credential watch' line of 'airflow o365mail doctor "
    f"--conn-id {{conn_id}}' for why; see {DOCS_URL}/token-store.md#credential-watch."
)
SECRET_EXPIRY_FIELD = "Then set the connection's credential_expires_on to the new secret's expiry date."
NEW_CERTIFICATE = (
    "Create a new certificate, upload its public part to the app registration's Certificates & secrets > "
    "Certificates, then update the connection's certificate and key."
)
SIGN_IN_FREQUENCY = (
    "The sign-in frequency counts from the last interactive sign-in, so neither a keep-alive nor a DAG prevents this: "
    "ask the admin to exclude this app (or the service account) from the sign-in frequency policy, or use an "
    "app-only connection."
)
SIGN_IN_WITH_MFA = "Sign in with multi-factor authentication when the browser asks."
NEVER_AUTHORIZED = (
    "Run 'airflow o365mail authorize --conn-id {conn_id}' or use the Authorize button on the Airflow UI page "
    "Microsoft 365 Mail."
)
NEVER_AUTHORIZED_PUBLIC = (
    "Run 'airflow o365mail authorize --conn-id {conn_id} --device-code' and sign in with the code it prints."
)
REAUTHORIZE_PUBLIC = (
    "Re-authorize: 'airflow o365mail authorize --conn-id {conn_id} --device-code' (a public client consents with "
    "the device code; the UI page offers no Authorize button for it)."
)


def for_public_client(fix: str) -> str:
    """``fix`` (a template with ``{conn_id}``) as it reads for a public client: consent by device code."""
    return fix.replace(REAUTHORIZE, REAUTHORIZE_PUBLIC).replace(NEVER_AUTHORIZED, NEVER_AUTHORIZED_PUBLIC)


NEW_CLIENT_SECRET = (
    "Create a new client secret (Certificates & secrets), paste its Value (not its ID) into the connection's "
    "Client secret field."
)
CERTIFICATE_NOT_REGISTERED = (
    "Upload the certificate's public part (.cer/.pem, not the key) to the app registration's Certificates & "
    "secrets > Certificates; 'airflow o365mail doctor' shows the thumbprint the connection sends."
)
ALLOW_PUBLIC_CLIENT = (
    "In the app registration's Authentication > Advanced settings, set 'Allow public client flows' to Yes (and "
    "Save); or give the connection a credential (client secret, certificate or federated token)."
)
DEVICE_CODE_AGAIN = "Run 'airflow o365mail authorize --conn-id {conn_id} --device-code' again."
ASSERTION_CLOCK = "Check this host's clock (NTP): a client assertion is valid only around the time it is signed."
FEDERATED_CREDENTIAL_MISMATCH = (
    "In the app registration's Certificates & secrets > Federated credentials, the issuer, subject and audience "
    "must equal the federated token's iss, sub and aud exactly (case-sensitive; audience api://AzureADTokenExchange)."
)
CONDITIONAL_ACCESS = (
    "An administrator must allow the app in the Conditional Access policy named in the sign-in logs (Entra admin "
    "center > Sign-in logs, the failure's Conditional Access tab). " + REAUTHORIZE
)
TOKEN_STORE_KEYS = (
    "Use the same [o365mail] token_cache_keys (or [core] fernet_key) on every Airflow component, or "
    "'airflow o365mail forget --conn-id {conn_id}' and authorize again."
)
PROXY_REFUSED = {
    407: (
        "The proxy wants credentials, or refused the ones given: put them in the connection's proxy URL "
        "(http://user:password@host:port, URL-encoded)."
    ),
    403: "The proxy's rules do not allow a tunnel to {target}: ask its administrators to allow CONNECT to it.",
}
PROXY_REFUSED_OTHER = "Check the connection's proxy field and the proxy's logs."
PROXY_UNREACHABLE = "Check the connection's proxy field (or HTTPS_PROXY) and that the proxy is running."
IDENTITY_PROVIDER_UNREACHABLE = "Check network access to the login host; retry."
FIX_CONNECTION = f"Fix the connection's fields (see {DOCS_URL}/connection/)."
CREATE_CONNECTION = f"Create the connection ({DOCS_URL}/connection/)."
AADSTS_REFERENCE = f"See {DOCS_URL}/troubleshooting/ for the AADSTS code."
IMAP_REFUSED = (
    "The server refused the token for {mailbox}. Check that the mailbox is the signed-in user (or one it may "
    "open), that the app has IMAP.AccessAsUser.All (delegated) or IMAP.AccessAsApp plus Add-MailboxPermission "
    "(app-only), and that IMAP is enabled for the mailbox."
)
SMTP_REFUSED = (
    "The server refused the token for {mailbox} ({reply}). If the reply says 5.7.139, SMTP AUTH is disabled for "
    "the tenant or mailbox: enable it with Set-CASMailbox -SmtpClientAuthenticationDisabled $false. Otherwise check "
    "that the app has SMTP.Send (delegated) or SMTP.SendAsApp (app-only) and that the mailbox is the signed-in user."
)
IMAP_CHECK_FAILED = "Check IMAP is enabled for the mailbox and the IMAP.AccessAsUser.All permission."
SMTP_CHECK_FAILED = "Check SMTP AUTH for the tenant and mailbox and the SMTP.Send permission."
SMTP_AUTH_DISABLED = "Enable SMTP AUTH: Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false."
SEND_AS = "For another From address the signed-in mailbox needs Send As (or Send on Behalf) permission on it."
SMTP_LIMITS = (
    "Microsoft 365 allows 3 concurrent SMTP sessions per mailbox (432 4.3.2) and 30 messages per minute: limit "
    "parallel tasks per sender with an Airflow pool."
)
FOLDER_NAME = (
    "Check the name (Exchange shows localized names such as 'Posteingang' in the UI but IMAP uses INBOX) and that "
    "the signed-in user may open it."
)
SUBMISSION_QUOTA_EXCEEDED = (
    "Exchange Online blocks this mailbox from sending for up to 24 hours: it exceeded the 10,000 recipients per "
    "day limit (Recipient Rate Limit). Wait, or send from another mailbox; an administrator can check the block "
    "in the Microsoft 365 Defender portal (Restricted entities). Lower [o365mail] daily_recipient_budget so the "
    "provider stops before Exchange does."
)
MAILBOX_FULL = (
    "The sending mailbox is full: every message sent over SMTP AUTH is stored in its Sent Items. Empty Sent "
    "Items or Deleted Items, or raise the mailbox quota."
)
#: Continuous error throttling: Exchange throttles SMTP AUTH after repeated errors of one kind;
#: retrying prolongs it, so the task fails without retries. Keys are the enhanced status codes.
CONTINUOUS_ERROR_THROTTLING = {
    "5.2.251": "Exchange throttles this mailbox's SMTP AUTH because its mailbox was full repeatedly. Free space "
    "(Sent Items, Deleted Items) and wait before sending again.",
    "5.2.252": "Exchange throttles this mailbox's SMTP AUTH after repeated Send As refusals. Grant Send As on the "
    "From address (Add-RecipientPermission) or send as the mailbox itself, then wait before sending again.",
    "5.2.253": "Exchange throttles this mailbox's SMTP AUTH because it has no valid Exchange Online license. Assign "
    "a license to the mailbox, then wait before sending again.",
    "5.2.254": "Exchange throttles this mailbox's SMTP AUTH after repeated messages with too many recipients. Send "
    "to fewer recipients per message (at most 500 per message), then wait before sending again.",
    "5.2.255": "Exchange throttles this mailbox's SMTP AUTH after repeated invalid recipients. Fix the recipient "
    "addresses (check the task's earlier refusals), then wait before sending again.",
}
RECIPIENT_BUDGET = (
    "Exchange Online allows 10,000 recipients per rolling 24 hours per mailbox and then blocks it for up to a day; "
    "[o365mail] daily_recipient_budget keeps the provider below that. Send later, from another mailbox, or to "
    "fewer recipients."
)
EXCHANGE_RATE = (
    "Exchange Online accepts about 30 messages per minute per mailbox and delays, not refuses, the rest: "
    "delivery of this batch takes at least {minutes:.0f} minute(s)."
)

# ---------------------------------------------------------------- Microsoft Graph
GRAPH_TOKEN_REFUSED = (
    "Graph did not accept the access token: its audience or permissions are wrong. The app registration needs "
    "Microsoft Graph's Mail.Send (delegated, or as an application permission with admin consent for app-only); "
    "after adding it, consent again: 'airflow o365mail authorize --conn-id {conn_id}'."
)
GRAPH_SEND_AS = (
    "Through Graph a delegated connection also needs the Mail.Send.Shared permission (add it to the connection's "
    "graph_permissions and consent again)."
)
GRAPH_TOO_LARGE = (
    "Graph takes at most 4 MB per request and the mailbox's MaxSendSize (35 MB by default, up to 150 MB) per "
    "message: send smaller files or links, or raise MaxSendSize (Set-Mailbox -MaxSendSize)."
)
GRAPH_ACCESS_DENIED = (
    "The token lacks the permission this request needs, or an application access policy keeps the app out of "
    "{mailbox}. Delegated: add Mail.Send and Mail.ReadWrite to the app's Microsoft Graph permissions and consent "
    "again ('airflow o365mail authorize --conn-id {conn_id}'); app-only: grant the application permissions "
    "Mail.Send and Mail.ReadWrite with admin consent, and include {mailbox} in any application access policy."
)
GRAPH_NO_MAILBOX = (
    "{mailbox} has no Exchange Online mailbox Graph can use (unlicensed, soft-deleted, on-premises, or a typo): "
    "check the address and its Exchange Online licence."
)
GRAPH_NEEDS_READWRITE = (
    "Graph's Mail.ReadWrite permission is needed for this ({why}); the connection's graph_permissions do not "
    "include it. Add Mail.ReadWrite there and to the app registration, then consent again."
)
DEVICE_CODE_WITHOUT_GRAPH = (
    "The device code consent covers Exchange (SMTP and IMAP) only: a device code is redeemed for one resource, and "
    "{why}. This connection sends through Microsoft Graph (transport {transport}), which needs consent to {scopes}. "
    "Fix: authorize once in a browser, which asks for Exchange and Graph together ('airflow o365mail authorize "
    "--conn-id {conn_id}', or --paste), or have an administrator grant admin consent for those Microsoft Graph "
    "permissions (Enterprise applications > Permissions > Grant admin consent)."
)
GRAPH_CONSENT_MISSING = (
    "The consent covers Exchange but not Microsoft Graph (AADSTS65001): it was given before the connection sent "
    "through Graph. Authorize again once (the page's Authorize button or 'airflow o365mail authorize --conn-id "
    "{conn_id}'): it asks for Exchange and Graph together. Or have an administrator grant admin consent for "
    "Microsoft Graph {permissions}."
)
