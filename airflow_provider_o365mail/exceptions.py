"""Errors of airflow-provider-o365mail.

::

    O365MailError (AirflowException)
     +-- ConnectionConfigError          the connection's fields are wrong (fix the connection)
     |    +-- CriteriaError             a sensor's or trigger's mail criteria are invalid
     +-- TokenStoreError                the encrypted token store cannot be read or written
     +-- IdentityProviderUnavailable    network, 5xx, 429 after bounded retries (Airflow may retry)
     +-- ProxyRefused (AirflowFailException)  the HTTP proxy answered CONNECT with 403/407/...: no retries
     +-- MailServerError                IMAP/SMTP refused something (transient or not, see subclasses)
     |    +-- MailAuthenticationError   the server refused the access token (permanent)
     |    +-- MailServerUnavailable     connection limit, BYE, not connected, timeout, reset (transient)
     |    |    +-- ProxyUnavailable     the HTTP proxy in front of IMAP/SMTP cannot be reached (transient)
     |    +-- TlsRequiredError          the server offered no TLS; nothing secret was sent
     |    +-- MessageRejectedError      5xx for the sender or the message (no retries)
     |    |    +-- SendingBlockedError  Exchange blocks or throttles the mailbox (5.2.0 quota, 5.2.251-255)
     |    +-- DeliveryUnknownError      connection lost after the content; Sent Items could not tell (transient)
     |    +-- RecipientBudgetExceeded   the batch would cross [o365mail] daily_recipient_budget (no retries)
     |    +-- RecipientsRefusedError    some recipients were refused permanently (others got the mail; no retries)
     |    +-- GraphRequestRefused       Microsoft Graph refused permanently: permissions, mailbox, request (no retries)
     +-- MessageCompositionError (ValueError; no retries)  bad address, header injection, unreadable file
     |    +-- MessageTooLargeError      larger than the server's SIZE limit
     +-- AuthorizationError (AirflowFailException: the task fails without retries)
          +-- ReauthorizationRequired   a person must consent again
          |    +-- ConsentRevoked           AADSTS65001 / consent removed at myapps.microsoft.com
          |    +-- GrantRevoked             AADSTS50173 / 70008: sessions revoked, password reset
          |    +-- RefreshTokenExpired      AADSTS700082: unused for 90 days
          |    +-- InteractionRequired      AADSTS50076 / 50078 / 70043: MFA or sign-in frequency
          +-- AccessBlocked                 AADSTS53003: Conditional Access blocks the app
          +-- ClientCredentialError         AADSTS7000215 / 7000222 / 700016: secret or client ID wrong
          +-- InvalidRequestError           any other permanent identity-provider refusal

Every message says what failed, why, and what to do; none carries a token or a secret.

An error crosses the trigger boundary (triggerer -> worker) and the shared IDLE hub (one loop ->
many waiters) as a structured payload: :meth:`O365MailError.to_payload` names its class and carries
its message and its keyword fields (``payload_fields``, JSON values), and :func:`from_payload`
builds the same error again, with the same class and fields.
"""

from __future__ import annotations

from typing import Any, ClassVar

from airflow_provider_o365mail.version_compat import AirflowException, AirflowFailException

PAYLOAD_KIND = "o365mail-error/1"


class O365MailError(AirflowException):
    """Base of every error this provider raises."""

    #: keyword arguments of ``__init__`` that are also attributes: carried by :meth:`to_payload`
    payload_fields: ClassVar[tuple[str, ...]] = ()

    def to_payload(self) -> dict[str, Any]:
        """A JSON-friendly description of this error that :func:`from_payload` turns back into it."""
        return {
            "kind": PAYLOAD_KIND,
            "class": type(self).__name__,
            "message": str(self),
            "fields": {name: _jsonable(getattr(self, name, None)) for name in self.payload_fields},
        }


class ConnectionConfigError(O365MailError, ValueError):
    """The ``o365mail`` connection is incomplete or inconsistent."""


class CriteriaError(ConnectionConfigError):
    """Mail criteria (sensor, trigger) that cannot be turned into a safe IMAP SEARCH."""


class TokenStoreError(O365MailError):
    """The encrypted token store cannot be used."""


class IdentityProviderUnavailable(O365MailError):
    """The identity provider could not be reached or kept failing (transient)."""


class ProxyRefused(O365MailError, AirflowFailException):
    """The HTTP proxy refused to open a tunnel (403 policy, 407 credentials): fix the proxy or its rules.

    Not a ``ValueError``: MSAL turns those into "no OpenID configuration" while discovering.
    """

    payload_fields = ("proxy", "status")

    def __init__(self, message: str, *, proxy: str, status: int) -> None:
        super().__init__(message)
        #: the proxy as ``http://host:port`` (never with credentials) and the status it answered
        self.proxy = proxy
        self.status = status


class MailServerError(O365MailError):
    """An IMAP or SMTP server refused a command."""


class MailAuthenticationError(MailServerError):
    """The mail server refused the XOAUTH2 login."""

    payload_fields = ("reply",)

    def __init__(self, message: str, *, reply: str = "") -> None:
        super().__init__(message)
        #: the server's own reply (``535 5.7.139 ...``): what decides, never the message's advice
        self.reply = reply


class MailServerUnavailable(MailServerError):
    """The mail server refused for now or dropped the connection (connection limits, ``BYE``, timeouts,
    resets): retried with backoff, never reported as a token problem."""


class ProxyUnavailable(MailServerUnavailable):
    """The HTTP proxy could not be reached, or closed the connection before the tunnel was open."""


class TlsRequiredError(MailServerError):
    """The server did not offer TLS; credentials were not sent."""


class AuthorizationError(O365MailError, AirflowFailException):
    """The identity provider refused permanently. Retrying will not help."""

    payload_fields = ("conn_id", "error", "error_codes", "correlation_id")

    def __init__(
        self,
        message: str,
        *,
        conn_id: str | None = None,
        error: str | None = None,
        error_codes: list[int] | None = None,
        correlation_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.conn_id = conn_id
        self.error = error
        self.error_codes = list(error_codes or [])
        self.correlation_id = correlation_id


class ReauthorizationRequired(AuthorizationError):
    """A person must run the consent flow again for this connection."""


class ConsentRevoked(ReauthorizationRequired):
    """Consent for the app is missing or was removed."""


class GrantRevoked(ReauthorizationRequired):
    """The grant behind the refresh token was revoked."""


class RefreshTokenExpired(ReauthorizationRequired):
    """The refresh token was not used for 90 days."""


class InteractionRequired(ReauthorizationRequired):
    """The user must sign in interactively (MFA, sign-in frequency)."""


class AccessBlocked(AuthorizationError):
    """Conditional Access blocks token issuance."""


class ClientCredentialError(AuthorizationError):
    """The client ID or client secret is wrong or expired."""


class InvalidRequestError(AuthorizationError):
    """Any other permanent refusal by the identity provider."""


class MessageCompositionError(O365MailError, AirflowFailException, ValueError):
    """The message cannot be built from the given fields (bad address, header injection, missing file).

    Retrying the task would build the same message again, so the task fails without retries.
    """


class MessageTooLargeError(MessageCompositionError):
    """The message is larger than the SMTP server accepts."""


class MessageRejectedError(MailServerError, AirflowFailException):
    """The SMTP server refused the sender or the message with a permanent (5xx) reply."""


class SendingBlockedError(MessageRejectedError):
    """Exchange refuses every message of this mailbox for a while (sending quota, continuous error throttling).

    Retrying prolongs the throttling, so the batch stops and the task fails without retries.
    """


class DeliveryUnknownError(MailServerUnavailable):
    """The connection was lost after the message content was sent, and Sent Items could not be checked.

    Transient: the task's retry checks Sent Items again before sending the message again.
    """


class RecipientBudgetExceeded(MailServerError, AirflowFailException):
    """Sending the batch would cross the mailbox's daily recipient budget; nothing was sent."""


class RecipientsRefusedError(MailServerError, AirflowFailException):
    """The server refused some recipients permanently; the message went to the others.

    The task fails without retries: a retry would send the message to the accepted recipients again.
    """

    payload_fields = ("refused",)

    def __init__(self, message: str, refused: dict[str, tuple[int, str]] | None = None) -> None:
        super().__init__(message)
        self.refused = {address: tuple(reply) for address, reply in (refused or {}).items()}


class GraphRequestRefused(MailServerError, AirflowFailException):
    """Microsoft Graph refused a request permanently (permissions, a mailbox without REST access, an
    invalid request); the message names Graph's error code and the fix. Retrying will not help."""

    payload_fields = ("status", "code")

    def __init__(self, message: str, *, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        #: Graph's HTTP status and ``error.code`` (code against the code, never the message)
        self.status = status
        self.code = code


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _error_classes() -> dict[str, type[O365MailError]]:
    """This provider's own error classes by name (never a class defined elsewhere in the process)."""
    found: dict[str, type[O365MailError]] = {}
    pending: list[type[O365MailError]] = [O365MailError]
    while pending:
        cls = pending.pop()
        if cls.__module__.split(".")[0] == __name__.split(".")[0]:
            found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return found


def is_payload(value: Any) -> bool:
    return isinstance(value, dict) and value.get("kind") == PAYLOAD_KIND


def from_payload(payload: dict[str, Any], *, default: type[O365MailError] | None = None) -> O365MailError:
    """The error :meth:`O365MailError.to_payload` described: same class, message and fields.

    Never raises: a class this version does not know (a triggerer running a newer provider) becomes
    ``default`` (:class:`MailServerError`) with the same message, and fields that do not fit the
    class (another version's) are left out rather than turning the error into a ``TypeError``.
    """
    message = str(payload.get("message") or "The mail watch failed.")
    cls = _error_classes().get(str(payload.get("class")))
    raw_fields = payload.get("fields")
    fields = raw_fields if isinstance(raw_fields, dict) else {}
    if cls is None:
        return (default or MailServerError)(message)
    wanted = {name: value for name, value in fields.items() if name in cls.payload_fields}
    try:
        return cls(message, **wanted)
    except Exception:
        try:
            err = cls.__new__(cls)
            Exception.__init__(err, message)
            for name in cls.payload_fields:
                setattr(err, name, wanted.get(name))
            return err
        except Exception:
            return (default or MailServerError)(message)


def fresh_copy(err: BaseException) -> BaseException:
    """A new instance of ``err`` (same class and fields) to raise in another task: one exception
    object raised in many tasks would share (and grow) one traceback."""
    if isinstance(err, O365MailError):
        return from_payload(err.to_payload())
    try:
        return type(err)(*err.args)
    except Exception:
        return MailServerError(f"{type(err).__name__}: {err}")
