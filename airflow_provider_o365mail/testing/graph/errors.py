"""Microsoft Graph's error responses: the JSON shape and the codes the mail endpoints answer with.

Shape (learn.microsoft.com/graph/errors): ``{"error": {"code", "message", "innerError": {"request-id",
"date", "client-request-id"}}}``. Clients must code against ``code``, never ``message``; the messages
here are the ones Microsoft documents or that were observed in the field (research notes, section 4).
"""

from __future__ import annotations

import time


class GraphError(Exception):
    """An error answer: HTTP ``status``, Graph ``code`` and ``message``, extra response ``headers``."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def utc_stamp(now: float | None = None) -> str:
    """``2019-01-16T18:53:25``: the ``date`` of an ``innerError``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() if now is None else now))


def body(error: GraphError, request_id: str, client_request_id: str) -> dict:
    return {
        "error": {
            "code": error.code,
            "message": error.message,
            "innerError": {"request-id": request_id, "date": utc_stamp(), "client-request-id": client_request_id},
        }
    }


# ---------------------------------------------------------------------- authentication (401) and /me (400)
def token_missing() -> GraphError:
    return GraphError(401, "InvalidAuthenticationToken", "Access token is empty.")


def token_invalid(detail: str = "") -> GraphError:
    return GraphError(401, "InvalidAuthenticationToken", f"Access token validation failure. {detail}".strip())


def token_expired() -> GraphError:
    return GraphError(401, "InvalidAuthenticationToken", "Lifetime validation failed, the token is expired.")


def wrong_audience() -> GraphError:
    return token_invalid("Invalid audience.")


def no_permission_claims() -> GraphError:
    return GraphError(401, "InvalidAuthenticationToken", "Either scp or roles claim need to be present in the token.")


def me_needs_delegated_token() -> GraphError:
    return GraphError(400, "BadRequest", "/me request is only valid with delegated authentication flow.")


# ---------------------------------------------------------------------- authorization (403)
def access_denied() -> GraphError:
    return GraphError(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")


def access_policy_denied() -> GraphError:
    """An application access policy excludes the mailbox (auth-limit-mailbox-access.md)."""
    return GraphError(403, "ErrorAccessDenied", "Access to OData is disabled.")


def send_as_denied() -> GraphError:
    return GraphError(
        403,
        "ErrorSendAsDenied",
        "The user account which was used to submit this request does not have the right to send mail on behalf "
        "of the specified sending account. Cannot submit message.",
    )


# ---------------------------------------------------------------------- mailboxes (404)
def invalid_user(reference: str) -> GraphError:
    return GraphError(404, "ErrorInvalidUser", f"The requested user '{reference}' is invalid.")


def mailbox_not_enabled() -> GraphError:
    return GraphError(
        404,
        "MailboxNotEnabledForRESTAPI",
        "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
    )


def item_not_found() -> GraphError:
    return GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")


def id_malformed() -> GraphError:
    """An ID that is not one (observed answer of Exchange; Microsoft's docs do not list it: UNCONFIRMED)."""
    return GraphError(400, "ErrorInvalidIdMalformed", "Id is malformed.")


# ---------------------------------------------------------------------- reading: query options and delta
def bad_query(message: str) -> GraphError:
    """A query option the service cannot parse (OData's 400 ``BadRequest``)."""
    return GraphError(400, "BadRequest", message)


def unknown_property(name: str) -> GraphError:
    return GraphError(400, "BadRequest", f"Could not find a property named '{name}' on type 'microsoft.graph.message'.")


def inefficient_filter() -> GraphError:
    """user-list-messages.md: ``$orderby`` properties must lead ``$filter`` in the same order."""
    return GraphError(400, "InefficientFilter", "The restriction or sort order is too complex for this operation.")


def search_with(option: str) -> GraphError:
    """``$search`` with ``$filter`` or ``$orderby`` on messages: codes and messages observed in the field
    (SearchWithFilter, SearchWithOrderBy); the documentation only says the combination is unsupported."""
    code = {"$filter": "SearchWithFilter", "$orderBy": "SearchWithOrderBy"}.get(option, "BadRequest")
    return GraphError(400, code, f"The query parameter '{option}' is not supported with '$search'.")


def sync_state_not_found(status: int) -> GraphError:
    """An expired or unknown delta token (delta-query-overview.md: "a 40X-series error" with this code)."""
    return GraphError(
        status,
        "syncStateNotFound",
        "The sync state generation is not found. The delta token is expired and data must be synchronized again.",
    )


def resync_required(location: str) -> GraphError:
    """delta-query-overview.md, Synchronization reset: 410 with a Location to start over from."""
    return GraphError(
        410,
        "resyncRequired",
        "The delta token is no longer valid, and the app must reset the sync state.",
        headers={"Location": location},
    )


# ---------------------------------------------------------------------- request content (400, 413)
def bad_json() -> GraphError:
    return GraphError(
        400,
        "BadRequest",
        "Unable to read JSON request payload. Please ensure Content-Type header is set and payload is of valid "
        "JSON format.",
    )


def invalid_request(message: str) -> GraphError:
    return GraphError(400, "ErrorInvalidRequest", message)


def invalid_base64() -> GraphError:
    return GraphError(400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content.")


def no_recipients() -> GraphError:
    return GraphError(
        400,
        "ErrorInvalidRecipients",
        "At least one recipient isn't valid., A message can't be sent because it contains no recipients.",
    )


def invalid_recipient(address: str) -> GraphError:
    return GraphError(
        400,
        "ErrorInvalidRecipients",
        f"At least one recipient isn't valid., Recipient \"{address}\" isn't resolved. All recipients must be "
        "resolved before a message can be submitted.",
    )


def invalid_header_name(name: str) -> GraphError:
    return GraphError(
        400,
        "InvalidInternetMessageHeader",
        f"The internet message header name '{name}' should start with 'x-' or 'X-'.",
    )


def request_too_large(limit: int) -> GraphError:
    return GraphError(
        413, "RequestEntityTooLarge", f"The maximum request length supported is {limit // (1024 * 1024)}MB."
    )


def message_too_large(status: int = 400, *, saving: bool = False) -> GraphError:
    message = "The message exceeds the maximum supported size."
    return GraphError(
        status,
        "ErrorMessageSizeExceeded",
        message + (", Cannot save changes made to an item to store." if saving else ""),
    )


def attachment_too_small() -> GraphError:
    return GraphError(
        400,
        "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize",
        "Attachment size must be at least 3 MB for an upload session; attach smaller files with a POST on the "
        "message's attachments.",
    )


def unsupported(what: str) -> GraphError:
    return GraphError(501, "NotImplemented", f"The sandbox's Graph stand-in does not implement {what}.")


def unknown_segment(segment: str) -> GraphError:
    return GraphError(400, "BadRequest", f"Resource not found for the segment '{segment}'.")


# ---------------------------------------------------------------------- throttling and service faults
def throttled(limit: str, retry_after: int) -> GraphError:
    return GraphError(
        429,
        "ApplicationThrottled",
        f"Application is over its {limit} limit.",
        headers={"Retry-After": str(max(1, int(retry_after)))},
    )


#: Code and message of an injected failure when the test names only the status (or only the code).
DEFAULT_FAULTS: dict[int, tuple[str, str]] = {
    429: ("ApplicationThrottled", "Application is over its MailboxConcurrency limit."),
    500: ("generalException", "An unspecified error has occurred."),
    503: ("serviceNotAvailable", "The service is temporarily unavailable. Try again after the Retry-After delay."),
    504: ("GatewayTimeout", "The gateway did not receive a response from the mailbox server in time."),
    507: ("ErrorQuotaExceeded", "Mailbox has exceeded maximum mailbox size."),
}
DEFAULT_CODE_STATUS: dict[str, tuple[int, str]] = {
    "ErrorQuotaExceeded": (507, "Mailbox has exceeded maximum mailbox size."),
    "ErrorMessageSizeExceeded": (400, "The message exceeds the maximum supported size."),
    "ApplicationThrottled": (429, DEFAULT_FAULTS[429][1]),
    "serviceNotAvailable": (503, DEFAULT_FAULTS[503][1]),
}


def injected(status: int | None, code: str | None, message: str | None, retry_after: int | None) -> GraphError:
    """The error a test asked for: the status, code and message it gave, defaults for the rest."""
    if status is None:
        status, default_message = DEFAULT_CODE_STATUS.get(code or "", (503, DEFAULT_FAULTS[503][1]))
        default_code = code or DEFAULT_FAULTS[503][0]
    else:
        default_code, default_message = DEFAULT_FAULTS.get(status, ("generalException", f"Injected HTTP {status}."))
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    return GraphError(status, code or default_code, message or default_message, headers=headers)
