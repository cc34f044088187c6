"""Microsoft Graph's answers: its error shape, which failures are temporary, and each permanent one's
cause and fix (no I/O).

Graph errors are ``{"error": {"code", "message", "innerError": {"request-id", ...}}}``; code against
``code``, never the message (learn.microsoft.com/graph/errors). Outlook's throttling answers 429 with
``Retry-After``; 503 may carry one too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from airflow_provider_o365mail import hints
from airflow_provider_o365mail.exceptions import (
    GraphRequestRefused,
    MailAuthenticationError,
    MailServerError,
    MessageRejectedError,
    MessageTooLargeError,
    SendingBlockedError,
)

#: Answers worth another attempt of a request that changes nothing twice (or was refused before any work):
#: throttling (429), the service busy or failing (500, 502, 503). 504 is here too, but a 504 to a send is
#: ambiguous (the mail may have gone out): the sender checks Sent Items instead of resending.
TEMPORARY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Error codes that mean "later" whatever the status (Graph's own names for throttling and busy mailboxes).
TEMPORARY_CODES = frozenset(
    {"ApplicationThrottled", "TooManyRequests", "ErrorServerBusy", "ServiceUnavailable", "ErrorTimeoutExpired"}
)


@dataclass(frozen=True)
class GraphReply:
    """One non-2xx answer of Graph, reduced to what decides what happens next (no secrets in it)."""

    status: int
    code: str
    message: str
    request_id: str = ""
    retry_after: float | None = None

    @property
    def temporary(self) -> bool:
        return self.status in TEMPORARY_STATUSES or self.code in TEMPORARY_CODES

    def describe(self) -> str:
        text = f"HTTP {self.status} {self.code}".rstrip()
        if self.message:
            text += f": {self.message}"
        if self.request_id:
            text += f" (request-id {self.request_id})"
        return text


def parse_reply(status: int, headers: Mapping[str, str], body: bytes) -> GraphReply:
    """Graph's error JSON (or whatever a proxy answered instead), with ``Retry-After`` in seconds."""
    code, message, request_id = "", "", ""
    try:
        error = json.loads(body.decode("utf-8", "replace") or "{}").get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    if isinstance(error, dict):
        code = str(error.get("code") or "")
        message = " ".join(str(error.get("message") or "").split())[:500]
        inner = error.get("innerError") or error.get("innererror") or {}
        if isinstance(inner, dict):
            request_id = str(inner.get("request-id") or "")
    if not message and body and not code:
        message = " ".join(body[:200].decode("utf-8", "replace").split())
    lowered = {k.lower(): v for k, v in headers.items()}
    request_id = request_id or str(lowered.get("request-id") or "")
    return GraphReply(status, code, message, request_id, _seconds(lowered.get("retry-after")))


def _seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(str(value).strip())
    except ValueError:
        return None  # an HTTP date: Graph sends seconds; fall back to our own backoff
    return seconds if seconds >= 0 else None


def permanent_error(reply: GraphReply, *, doing: str, mailbox: str, conn_id: str) -> MailServerError:
    """The exception for a permanent refusal: what failed, Graph's code, and the fix."""
    what = f"Microsoft Graph refused {doing} ({reply.describe()})."
    code, status = reply.code, reply.status
    if status == 401 or code in ("InvalidAuthenticationToken", "NoPermissionsInAccessToken"):
        return MailAuthenticationError(f"{what} {hints.GRAPH_TOKEN_REFUSED.format(conn_id=conn_id)}")
    if code == "ErrorSendAsDenied":
        return MessageRejectedError(f"{what} {hints.SEND_AS} {hints.GRAPH_SEND_AS}")
    if status == 413 or code in ("ErrorMessageSizeExceeded", "RequestEntityTooLarge"):
        return MessageTooLargeError(f"{what} {hints.GRAPH_TOO_LARGE}")
    if code in ("ErrorQuotaExceeded", "QuotaExceededException") or status == 507:
        return SendingBlockedError(f"{what} The mailbox {mailbox} is full: free space or raise its quota.")
    if code in ("ErrorInvalidRecipients", "ErrorInvalidRecipient"):
        return MessageRejectedError(f"{what} Check the message's addresses.")
    if code == "ErrorAccessDenied" or status == 403:
        hint = hints.GRAPH_ACCESS_DENIED.format(conn_id=conn_id, mailbox=mailbox)
        return GraphRequestRefused(f"{what} {hint}", status=status, code=code)
    if code in ("MailboxNotEnabledForRESTAPI", "ErrorInvalidUser", "ErrorNonExistentMailbox", "ResourceNotFound"):
        hint = hints.GRAPH_NO_MAILBOX.format(mailbox=mailbox)
        return GraphRequestRefused(f"{what} {hint}", status=status, code=code)
    return GraphRequestRefused(what, status=status, code=code)


__all__ = ["TEMPORARY_CODES", "TEMPORARY_STATUSES", "GraphReply", "parse_reply", "permanent_error"]
