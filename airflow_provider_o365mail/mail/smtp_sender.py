"""Send many messages over one authenticated SMTP session, with bounded retries.

Microsoft 365 allows 3 concurrent SMTP AUTH sessions per mailbox and 30 messages per minute;
``432 4.3.2`` (too many sessions) and other 4xx replies are temporary. This module:

- keeps one session for a whole batch and re-authenticates before the access token it logged in
  with expires (and after the server dropped the session);
- retries 4xx replies, dropped connections and timeouts with bounded exponential backoff;
- fails on 5xx with the server's own text;
- reports refused recipients per address (temporary refusals are retried for those addresses only).
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import smtplib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from airflow_provider_o365mail.exceptions import (
    MailServerError,
    MessageRejectedError,
    MessageTooLargeError,
    RecipientsRefusedError,
)

if TYPE_CHECKING:
    from airflow_provider_o365mail.auth.tokens import AccessToken
    from airflow_provider_o365mail.hooks.o365mail import O365MailHook
    from airflow_provider_o365mail.mail.compose import OutgoingMessage

log = logging.getLogger(__name__)

# Log in again when the session's access token has less than this left.
REAUTH_MARGIN_SECONDS = 120.0


@dataclass(frozen=True)
class SendResult:
    """What happened to one message: accepted and permanently refused recipients."""

    message_id: str
    accepted: tuple[str, ...]
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)


class _Transient(Exception):
    """A temporary failure worth another attempt."""

    def __init__(self, reason: str, *, drop_session: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.drop_session = drop_session


def _reply(code: int, text: bytes | str) -> str:
    body = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
    return f"{code} {' '.join(body.split())}"


def _is_temporary(code: int) -> bool:
    return 400 <= code < 500


class SmtpBatchSender:
    """One SMTP session for many messages. Use as a context manager.

    :param hook: the :class:`O365MailHook` that logs in (token, STARTTLS, XOAUTH2).
    :param max_attempts: attempts per message for temporary failures (>= 1).
    :param backoff: first wait in seconds; doubles per attempt up to ``max_backoff``.
    """

    def __init__(
        self,
        hook: O365MailHook,
        *,
        max_attempts: int = 5,
        backoff: float = 2.0,
        max_backoff: float = 60.0,
        reauth_margin: float = REAUTH_MARGIN_SECONDS,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.hook = hook
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.reauth_margin = reauth_margin
        self._clock = clock
        self._sleep = sleep
        self._client: smtplib.SMTP | None = None
        self._token: AccessToken | None = None

    def __enter__(self) -> SmtpBatchSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        client, self._client, self._token = self._client, None, None
        if client is None:
            return
        try:
            client.quit()
        except Exception:
            with contextlib.suppress(Exception):
                client.close()

    # ------------------------------------------------------------------ session
    def _session(self) -> smtplib.SMTP:
        expiring = False
        if self._client is not None and self._token is not None:
            if self._token.expires_on - self._clock() > self.reauth_margin:
                return self._client
            log.info("The SMTP session's access token expires soon; logging in again with a fresh token.")
            self.close()
            expiring = True
        try:
            self._client, self._token = self.hook.smtp_login(force_refresh=expiring)
        except smtplib.SMTPResponseException as err:  # e.g. 432 4.3.2 on connect
            if _is_temporary(err.smtp_code) or err.smtp_code == 421:
                raise _Transient(_reply(err.smtp_code, err.smtp_error), drop_session=True) from None
            raise MailServerError(
                f"SMTP server {self._where()} refused the session: {_reply(err.smtp_code, err.smtp_error)}"
            ) from None
        except (smtplib.SMTPServerDisconnected, TimeoutError, ConnectionError) as err:
            raise _Transient(f"{type(err).__name__}: {err}", drop_session=True) from None
        return self._client

    def _where(self) -> str:
        s = self.hook.settings
        return f"{s.smtp_host}:{s.smtp_port}"

    def _max_size(self, client: smtplib.SMTP) -> int | None:
        size = client.esmtp_features.get("size", "").strip()
        return int(size) if size.isdigit() and int(size) > 0 else None

    # ------------------------------------------------------------------ sending
    def send(self, message: OutgoingMessage) -> SendResult:
        """Send one message; retry temporary failures; raise on permanent ones.

        Permanently refused recipients are returned in :attr:`SendResult.refused` (the others got
        the message); raise yourself if that is an error for you (see :func:`raise_for_refused`).
        """
        data = message.as_bytes()
        pending = list(message.recipients)
        accepted: list[str] = []
        refused: dict[str, tuple[int, str]] = {}
        attempt = 0
        while pending:
            attempt += 1
            try:
                client = self._session()
                limit = self._max_size(client)
                if limit is not None and len(data) > limit:
                    raise MessageTooLargeError(
                        f"Message {message.message_id} is {len(data):,} bytes; {self._where()} accepts at most "
                        f"{limit:,} bytes (attachments grow by a third in base64). Send smaller files or links."
                    )
                rejected = self._transaction(client, message.envelope_from, pending, data)
            except _Transient as transient:
                if transient.drop_session:
                    self.close()
                self._wait_or_fail(message, attempt, transient.reason)
                continue
            accepted.extend(r for r in pending if r not in rejected)
            self._raise_if_sender_refused(message, accepted, rejected)
            temporary = {r: v for r, v in rejected.items() if _is_temporary(v[0])}
            refused.update({r: v for r, v in rejected.items() if r not in temporary})
            pending = list(temporary)
            if pending:
                reason = "; ".join(f"{r}: {_reply(*v)}" for r, v in temporary.items())
                self._wait_or_fail(message, attempt, f"recipients deferred ({reason})")
        return SendResult(message_id=message.message_id, accepted=tuple(accepted), refused=refused)

    def _raise_if_sender_refused(
        self, message: OutgoingMessage, accepted: list[str], rejected: dict[str, tuple[int, str]]
    ) -> None:
        """Servers that delay sender checks to RCPT (Postfix's default) refuse every recipient alike."""
        replies = {reply for code, reply in rejected.values() if not _is_temporary(code)}
        if accepted or len(replies) != 1 or len(rejected) != len(message.recipients):
            return
        (reply,) = replies
        if "sender" in reply.lower():
            raise MessageRejectedError(
                f"SMTP server {self._where()} refused the sender {message.envelope_from}: {reply}. For another From "
                "address the signed-in mailbox needs Send As (or Send on Behalf) permission on it."
            )

    def _transaction(
        self, client: smtplib.SMTP, envelope_from: str, recipients: list[str], data: bytes
    ) -> dict[str, tuple[int, str]]:
        """One MAIL/RCPT/DATA transaction; returns refused recipients as ``{addr: (code, text)}``."""
        try:
            if client.has_extn("pipelining"):
                refused = _pipelined_sendmail(client, envelope_from, recipients, data)
            else:
                refused = client.sendmail(envelope_from, recipients, data)
        except smtplib.SMTPRecipientsRefused as err:  # every recipient refused
            refused = err.recipients
        except smtplib.SMTPSenderRefused as err:
            if _is_temporary(err.smtp_code):
                raise _Transient(
                    f"MAIL FROM deferred: {_reply(err.smtp_code, err.smtp_error)}", drop_session=False
                ) from None
            raise MessageRejectedError(
                f"SMTP server {self._where()} refused the sender {envelope_from}: "
                f"{_reply(err.smtp_code, err.smtp_error)}. For another From address the signed-in mailbox needs "
                "Send As (or Send on Behalf) permission on it."
            ) from None
        except smtplib.SMTPDataError as err:
            if _is_temporary(err.smtp_code):
                raise _Transient(
                    f"DATA deferred: {_reply(err.smtp_code, err.smtp_error)}", drop_session=False
                ) from None
            raise MessageRejectedError(
                f"SMTP server {self._where()} refused the message: {_reply(err.smtp_code, err.smtp_error)}"
            ) from None
        except smtplib.SMTPServerDisconnected as err:
            raise _Transient(f"server closed the session ({err})", drop_session=True) from None
        except smtplib.SMTPResponseException as err:
            if _is_temporary(err.smtp_code):  # includes 421: the server is closing the session
                raise _Transient(_reply(err.smtp_code, err.smtp_error), drop_session=True) from None
            raise MessageRejectedError(
                f"SMTP server {self._where()} refused the message: {_reply(err.smtp_code, err.smtp_error)}"
            ) from None
        except (TimeoutError, ConnectionError) as err:
            raise _Transient(f"{type(err).__name__}: {err}", drop_session=True) from None
        return {addr: (code, _reply(code, text)) for addr, (code, text) in refused.items()}

    def _wait_or_fail(self, message: OutgoingMessage, attempt: int, reason: str) -> None:
        if attempt >= self.max_attempts:
            raise MailServerError(
                f"Sending message {message.message_id} through {self._where()} failed {attempt} times with a "
                f"temporary error; last: {reason}. Microsoft 365 allows 3 concurrent SMTP sessions per mailbox "
                "(432 4.3.2) and 30 messages per minute: limit parallel tasks per sender with an Airflow pool."
            )
        delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.75, 1.0)  # noqa: S311
        log.warning(
            "Temporary SMTP failure for message %s (attempt %d of %d): %s; retrying in %.1f s.",
            message.message_id,
            attempt,
            self.max_attempts,
            reason,
            delay,
        )
        self._sleep(delay)


def _pipelined_sendmail(
    client: smtplib.SMTP, envelope_from: str, recipients: list[str], data: bytes
) -> dict[str, tuple[int, bytes]]:
    """MAIL, RCPT... and DATA in one write (RFC 2920), then the content: 2 round trips instead of 3 + n.

    Raises the same exceptions as :meth:`smtplib.SMTP.sendmail` and returns refused recipients.
    """
    size = f" SIZE={len(data)}" if client.has_extn("size") else ""
    commands = [f"MAIL FROM:<{envelope_from}>{size}", *(f"RCPT TO:<{r}>" for r in recipients), "DATA"]
    client.send(("\r\n".join(commands) + "\r\n").encode("ascii"))
    mail_reply = client.getreply()
    rcpt_replies = [client.getreply() for _ in recipients]
    data_reply = client.getreply()
    for code, text in (mail_reply, *rcpt_replies, data_reply):
        if code == 421:  # the server is closing the session
            client.close()
            raise smtplib.SMTPServerDisconnected(_reply(code, text))
    refused = {r: reply for r, reply in zip(recipients, rcpt_replies, strict=True) if reply[0] not in (250, 251)}
    sender_ok = mail_reply[0] == 250
    if not sender_ok or len(refused) == len(recipients) or data_reply[0] != 354:
        if data_reply[0] == 354:  # the server wants content although nothing is valid: send none
            client.send(b".\r\n")
            client.getreply()
        client.rset()
        if not sender_ok:
            raise smtplib.SMTPSenderRefused(mail_reply[0], mail_reply[1], envelope_from)
        if len(refused) == len(recipients):
            raise smtplib.SMTPRecipientsRefused(refused)
        raise smtplib.SMTPDataError(*data_reply)
    content = re.sub(rb"(?m)^\.", b"..", data)
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    client.send(content + b".\r\n")
    code, text = client.getreply()
    if code != 250:
        if code == 421:
            client.close()
            raise smtplib.SMTPServerDisconnected(_reply(code, text))
        client.rset()
        raise smtplib.SMTPDataError(code, text)
    return refused


def raise_for_refused(results: Iterable[SendResult]) -> None:
    """Raise :class:`RecipientsRefusedError` naming every permanently refused recipient."""
    refused = {(result.message_id, addr): reply for result in results for addr, reply in result.refused.items()}
    if not refused:
        return
    lines = [f"{addr} (message {message_id}): {reply[1]}" for (message_id, addr), reply in refused.items()]
    raise RecipientsRefusedError(
        "The SMTP server refused these recipients permanently; the other recipients got the message:\n  "
        + "\n  ".join(lines),
        refused={addr: reply for (_, addr), reply in refused.items()},
    )
