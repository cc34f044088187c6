"""Send many messages over one authenticated SMTP session, with bounded retries.

Microsoft 365 allows 3 concurrent SMTP AUTH sessions per mailbox and 30 messages per minute;
``432 4.3.2`` (too many sessions) and other 4xx replies are temporary. This module:

- keeps one session for a whole batch and re-authenticates before the access token it logged in
  with expires (and after the server dropped the session);
- retries 4xx replies, dropped connections and timeouts with bounded exponential backoff;
- fails on 5xx with the server's own text;
- reports refused recipients per address (temporary refusals are retried for those addresses only);
- stops the batch on replies that block the whole mailbox (``smtp/replies.py``);
- never resends blindly after an ambiguous outcome: when the connection is lost or times out after
  the content's final dot, the server may have accepted the message, so it first looks the
  Message-ID up in the mailbox's Sent Items (``sent_lookup``, with a bounded wait for the copy) and
  resends only when it is absent.
"""

from __future__ import annotations

import contextlib
import logging
import re
import smtplib
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from airflow_provider_o365mail import hints
from airflow_provider_o365mail.core.sending import OnAccepted, OnSending, SendResult, SentLookup
from airflow_provider_o365mail.core.sent_items import SENT_ITEMS_WAIT_SECONDS, found_in_sent_items
from airflow_provider_o365mail.exceptions import (
    MailServerError,
    MessageRejectedError,
    MessageTooLargeError,
    RecipientsRefusedError,
    SendingBlockedError,
)
from airflow_provider_o365mail.retry import Backoff
from airflow_provider_o365mail.smtp.replies import mailbox_block_hint

if TYPE_CHECKING:
    from airflow_provider_o365mail.core.compose import OutgoingMessage
    from airflow_provider_o365mail.core.credentials import ExpiringToken

log = logging.getLogger(__name__)

# Log in again when the session's access token has less than this left.
REAUTH_MARGIN_SECONDS = 120.0
#: Temporary failures of one message: 5 attempts, waits of 2, 4, 8, 16 s (jittered), at most 60 s.
SEND_RETRY = Backoff(first=2.0, maximum=60.0, attempts=5, jitter=(0.75, 1.0))

#: ``login(force_refresh)`` opens a logged-in session (STARTTLS, AUTH) and says which token it used.
SmtpLogin = Callable[[bool], "tuple[smtplib.SMTP, ExpiringToken]"]


class _Transient(Exception):
    """A temporary failure worth another attempt."""

    def __init__(self, reason: str, *, drop_session: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.drop_session = drop_session


class _Ambiguous(_Transient):
    """The content went out but the reply did not come back: the server may have accepted it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, drop_session=True)


def _reply(code: int, text: bytes | str) -> str:
    body = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
    return f"{code} {' '.join(body.split())}"


def _is_temporary(code: int) -> bool:
    return 400 <= code < 500


class SmtpBatchSender:
    """One SMTP session for many messages. Use as a context manager.

    :param login: opens a logged-in session; called again after a drop or before the token expires
        (with ``force_refresh=True`` then).
    :param where: ``host:port`` for messages.
    :param retry: attempts and waits for temporary failures of one message (``attempts`` must be set).
    :param reauth_margin: log in again when the session's token has less than this many seconds left.
    :param clock: POSIX time (compared with the token's ``expires_on``); ``sleep`` waits.
    :param session_slot: held from each login until that session is closed (a per-mailbox budget,
        :mod:`..core.budget`); ``None``: no budget.
    """

    def __init__(
        self,
        login: SmtpLogin,
        *,
        where: str,
        retry: Backoff = SEND_RETRY,
        reauth_margin: float = REAUTH_MARGIN_SECONDS,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        session_slot: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
        sent_lookup: SentLookup | None = None,
        sent_items_wait: float = SENT_ITEMS_WAIT_SECONDS,
    ) -> None:
        if retry.attempts is None:
            raise ValueError("the send retry policy needs a bounded number of attempts")
        self._login = login
        self.where = where
        self.retry = retry
        self.reauth_margin = reauth_margin
        self._clock = clock
        self._sleep = sleep
        self._sent_lookup = sent_lookup
        self.sent_items_wait = sent_items_wait
        self._client: smtplib.SMTP | None = None
        self._token: ExpiringToken | None = None
        self._session_slot = session_slot
        self._slot = contextlib.ExitStack()

    def __enter__(self) -> SmtpBatchSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        client, self._client, self._token = self._client, None, None
        try:
            if client is not None:
                try:
                    client.quit()
                except Exception:
                    with contextlib.suppress(Exception):
                        client.close()
        finally:
            self._slot.close()  # the session is gone: its slot of the budget is free

    # ------------------------------------------------------------------ session
    def _session(self) -> smtplib.SMTP:
        expiring = False
        if self._client is not None and self._token is not None:
            if self._token.expires_on - self._clock() > self.reauth_margin:
                return self._client
            log.info("The SMTP session's access token expires soon; logging in again with a fresh token.")
            self.close()
            expiring = True
        if self._session_slot is not None:
            self._slot.enter_context(self._session_slot())  # waits while the budget is in use
        try:
            self._client, self._token = self._login_once(expiring)
        except BaseException:
            self._slot.close()
            raise
        return self._client

    def _login_once(self, expiring: bool) -> tuple[smtplib.SMTP, ExpiringToken]:
        try:
            return self._login(expiring)
        except smtplib.SMTPResponseException as err:  # e.g. 432 4.3.2 on connect
            if _is_temporary(err.smtp_code) or err.smtp_code == 421:
                raise _Transient(_reply(err.smtp_code, err.smtp_error), drop_session=True) from None
            raise MailServerError(
                f"SMTP server {self.where} refused the session: {_reply(err.smtp_code, err.smtp_error)}"
            ) from None
        except (smtplib.SMTPServerDisconnected, TimeoutError, ConnectionError) as err:
            raise _Transient(f"{type(err).__name__}: {err}", drop_session=True) from None

    def _max_size(self, client: smtplib.SMTP) -> int | None:
        size = client.esmtp_features.get("size", "").strip()
        return int(size) if size.isdigit() and int(size) > 0 else None

    # ------------------------------------------------------------------ sending
    def send(
        self,
        message: OutgoingMessage,
        *,
        on_accepted: OnAccepted | None = None,
        on_sending: OnSending | None = None,
        check_sent_first: bool = False,
        already_accepted: Iterable[str] = (),
        copies: int = 0,
    ) -> SendResult:
        """Send one message; retry temporary failures; raise on permanent ones.

        Permanently refused recipients are returned in :attr:`SendResult.refused` (the others got
        the message); raise yourself if that is an error for you (see :func:`raise_for_refused`).

        :param on_accepted: told right after each ``250`` to the end of DATA (the send ledger): the
            recipients that transaction delivered to, and whether the message is complete (no
            recipient is left deferred); also after a transaction that certainly delivered nothing
            (every recipient deferred, a 4xx, a session lost before the end of DATA, or a lost reply
            that Sent Items showed was not accepted): no recipients, not complete.
        :param on_sending: told right before each transaction starts (the send ledger).
        :param check_sent_first: an earlier try was interrupted while sending it: look in Sent Items first.
        :param already_accepted: recipients an earlier try delivered it to (the others were deferred):
            only the rest are sent to.
        :param copies: Sent Items copies of this Message-ID that earlier tries' accepted transactions
            made; a lookup finds the message only when there are more.
        :raises DeliveryUnknownError: the outcome stayed ambiguous (Sent Items could not be read).
        """
        done = set(already_accepted)
        pending = [r for r in message.recipients if r not in done]
        if check_sent_first and self._found_in_sent_items(
            message, "an earlier try was interrupted while sending it", copies
        ):
            return self._accepted_earlier(message, pending, on_accepted)
        size = message.size()
        accepted: list[str] = [r for r in message.recipients if r in done]
        refused: dict[str, tuple[int, str]] = {}
        attempt = 0
        while pending:
            attempt += 1
            try:
                client = self._session()
                limit = self._max_size(client)
                if limit is not None and size > limit:
                    raise MessageTooLargeError(
                        f"Message {message.message_id} is {size:,} bytes; {self.where} accepts at most "
                        f"{limit:,} bytes (attachments grow by a third in base64). Send smaller files or links."
                    )
                if on_sending is not None:
                    on_sending(message.message_id)
                rejected = self._transaction(client, message, pending, size)
            except _Transient as transient:
                if transient.drop_session:
                    self.close()
                if isinstance(transient, _Ambiguous) and self._found_in_sent_items(message, transient.reason, copies):
                    # Accepted although the reply was lost: the pending recipients got it.
                    rejected = {}
                else:
                    if on_accepted is not None:  # that transaction certainly delivered nothing
                        on_accepted(message.message_id, (), False)
                    self._wait_or_fail(message, attempt, transient.reason)
                    continue
            newly = tuple(r for r in pending if r not in rejected)
            temporary = {r: v for r, v in rejected.items() if _is_temporary(v[0])}
            accepted.extend(newly)
            if newly:
                copies += 1
            if on_accepted is not None and (newly or temporary):
                # Also when the transaction delivered nothing: it certainly did not, so a retry need
                # not look in Sent Items for it.
                on_accepted(message.message_id, newly, not temporary)
            self._raise_if_mailbox_blocked(rejected)
            self._raise_if_sender_refused(message, accepted, rejected)
            refused.update({r: v for r, v in rejected.items() if r not in temporary})
            pending = list(temporary)
            if pending:
                reason = "; ".join(f"{r}: {_reply(*v)}" for r, v in temporary.items())
                self._wait_or_fail(message, attempt, f"recipients deferred ({reason})")
        return SendResult(message_id=message.message_id, accepted=tuple(accepted), refused=refused)

    def _accepted_earlier(
        self, message: OutgoingMessage, pending: list[str], on_accepted: OnAccepted | None
    ) -> SendResult:
        if on_accepted is not None:
            on_accepted(message.message_id, tuple(pending), True)
        return SendResult(message_id=message.message_id, accepted=message.recipients, already_sent=True)

    def _found_in_sent_items(self, message: OutgoingMessage, reason: str, copies: int = 0) -> bool:
        """See :func:`..core.sent_items.found_in_sent_items` (waits up to ``sent_items_wait``)."""
        return found_in_sent_items(
            self._sent_lookup,
            message.message_id,
            reason=reason,
            where=self.where,
            copies=copies,
            wait=self.sent_items_wait,
            clock=self._clock,
            sleep=self._sleep,
        )

    def _raise_if_mailbox_blocked(self, rejected: dict[str, tuple[int, str]]) -> None:
        for code, reply in rejected.values():
            hint = mailbox_block_hint(code, reply)
            if hint:
                raise SendingBlockedError(f"SMTP server {self.where} refused a recipient: {reply}. {hint}")

    def _permanent(self, what: str, code: int, text: bytes | str, extra: str = "") -> MessageRejectedError:
        reply = _reply(code, text)
        hint = mailbox_block_hint(code, reply)
        if hint:
            return SendingBlockedError(f"SMTP server {self.where} refused {what}: {reply}. {hint}")
        return MessageRejectedError(f"SMTP server {self.where} refused {what}: {reply}{extra}")

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
                f"SMTP server {self.where} refused the sender {message.envelope_from}: {reply}. {hints.SEND_AS}"
            )

    def _transaction(
        self, client: smtplib.SMTP, message: OutgoingMessage, recipients: list[str], size: int
    ) -> dict[str, tuple[int, str]]:
        """One MAIL/RCPT/DATA transaction; returns refused recipients as ``{addr: (code, text)}``."""
        envelope_from = message.envelope_from
        try:
            if client.has_extn("pipelining"):
                refused = _pipelined_sendmail(client, envelope_from, recipients, message.chunks(), size)
            else:  # no pipelining (not Exchange, not Postfix): smtplib's own path, with the whole message
                refused = client.sendmail(envelope_from, recipients, message.as_bytes())
        except smtplib.SMTPRecipientsRefused as err:  # every recipient refused
            refused = err.recipients
        except smtplib.SMTPSenderRefused as err:
            if _is_temporary(err.smtp_code):
                raise _Transient(
                    f"MAIL FROM deferred: {_reply(err.smtp_code, err.smtp_error)}", drop_session=False
                ) from None
            raise self._permanent(
                f"the sender {envelope_from}", err.smtp_code, err.smtp_error, f". {hints.SEND_AS}"
            ) from None
        except smtplib.SMTPDataError as err:
            if _is_temporary(err.smtp_code):
                raise _Transient(
                    f"DATA deferred: {_reply(err.smtp_code, err.smtp_error)}", drop_session=False
                ) from None
            raise self._permanent("the message", err.smtp_code, err.smtp_error) from None
        except _Transient:
            raise
        except smtplib.SMTPServerDisconnected as err:
            raise _Transient(f"server closed the session ({err})", drop_session=True) from None
        except smtplib.SMTPResponseException as err:
            if _is_temporary(err.smtp_code):  # includes 421: the server is closing the session
                raise _Transient(_reply(err.smtp_code, err.smtp_error), drop_session=True) from None
            raise self._permanent("the message", err.smtp_code, err.smtp_error) from None
        except (TimeoutError, ConnectionError) as err:
            raise _Transient(f"{type(err).__name__}: {err}", drop_session=True) from None
        return {addr: (code, _reply(code, text)) for addr, (code, text) in refused.items()}

    def _wait_or_fail(self, message: OutgoingMessage, attempt: int, reason: str) -> None:
        if self.retry.gives_up_after(attempt):
            raise MailServerError(
                f"Sending message {message.message_id} through {self.where} failed {attempt} times with a "
                f"temporary error; last: {reason}. {hints.SMTP_LIMITS}"
            )
        delay = self.retry.delay(attempt)
        log.warning(
            "Temporary SMTP failure for message %s (attempt %d of %d): %s; retrying in %.1f s.",
            message.message_id,
            attempt,
            self.retry.attempts,
            reason,
            delay,
        )
        self._sleep(delay)


def _pipelined_sendmail(
    client: smtplib.SMTP, envelope_from: str, recipients: list[str], chunks: Iterable[bytes], size: int
) -> dict[str, tuple[int, bytes]]:
    """MAIL, RCPT... and DATA in one write (RFC 2920), then the content: 2 round trips instead of 3 + n.

    ``chunks`` each start at a line start (dot-stuffed one by one) and are written as they come, so
    the whole message is never in memory. Raises the same exceptions as
    :meth:`smtplib.SMTP.sendmail` and returns refused recipients.
    """
    declared = f" SIZE={size}" if client.has_extn("size") else ""
    commands = [f"MAIL FROM:<{envelope_from}>{declared}", *(f"RCPT TO:<{r}>" for r in recipients), "DATA"]
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
    last = b"\r\n"
    for chunk in chunks:
        if chunk:
            client.send(re.sub(rb"(?m)^\.", b"..", chunk))
            last = chunk
    client.send(b".\r\n" if last.endswith(b"\r\n") else b"\r\n.\r\n")
    try:
        code, text = client.getreply()
    except (smtplib.SMTPServerDisconnected, TimeoutError, ConnectionError) as err:
        # The final dot is out: the server may have queued the message. Only Sent Items can tell.
        client.close()
        raise _Ambiguous(f"the connection was lost after the end of DATA ({type(err).__name__}: {err})") from None
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
