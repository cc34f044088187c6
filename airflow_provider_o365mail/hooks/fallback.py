"""``transport: auto``: SMTP, and Microsoft Graph once Exchange answers that SMTP AUTH is disabled.

Exchange refuses the XOAUTH2 login with ``535 5.7.139 ... SmtpClientAuthentication is disabled`` (for
the tenant, by security defaults, or for the mailbox). The refusal comes before any message content,
so the message that met it is sent through Graph at once, nothing twice. The switch is logged once per
process and connection with Exchange's reason, and remembered for :data:`REMEMBER_SECONDS` (SMTP is
tried again after that, in case an admin turned SMTP AUTH back on).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Any

from airflow_provider_o365mail.core.sending import MessageSender, OnAccepted, OnSending, SendResult
from airflow_provider_o365mail.exceptions import MailAuthenticationError

if TYPE_CHECKING:
    from airflow_provider_o365mail.core.compose import OutgoingMessage

log = logging.getLogger(__name__)

#: How long this process sends through Graph without trying SMTP again after a 5.7.139.
REMEMBER_SECONDS = 3600.0
#: What Exchange's refusal says when SMTP AUTH is off (its variants all carry the enhanced code).
SMTP_AUTH_DISABLED_MARKERS = ("5.7.139", "SmtpClientAuthentication is disabled")

_disabled: dict[Hashable, float] = {}
_lock = threading.Lock()


def smtp_auth_disabled(err: BaseException) -> bool:
    """True for Exchange's "SMTP AUTH is disabled" refusal (not for a refused or expired token).

    Decided on the server's reply only (:attr:`MailAuthenticationError.reply`): the error's message also
    carries advice that names 5.7.139.
    """
    reply = str(getattr(err, "reply", "") or "")
    return isinstance(err, MailAuthenticationError) and any(
        m.lower() in reply.lower() for m in SMTP_AUTH_DISABLED_MARKERS
    )


def _known_disabled(key: Hashable, now: float) -> bool:
    with _lock:
        since = _disabled.get(key)
        if since is not None and now - since > REMEMBER_SECONDS:
            del _disabled[key]
            return False
        return since is not None


def _remember_disabled(key: Hashable, now: float) -> bool:
    """Remember the refusal; True when this process had not known it (log it then)."""
    with _lock:
        first = key not in _disabled
        _disabled[key] = now
        return first


def forget_disabled() -> None:
    """Try SMTP first again everywhere in this process (tests; after an admin enabled SMTP AUTH)."""
    with _lock:
        _disabled.clear()


class SmtpThenGraph:
    """A :class:`MessageSender` for ``transport: auto``. Use as a context manager.

    :param smtp: makes the SMTP sender (a context manager too); ``graph``: the Graph sender.
    :param key: names the connection and mailbox for what this process remembers.
    """

    def __init__(
        self,
        smtp: Callable[[], Any],
        graph: Callable[[], Any],
        *,
        key: Hashable,
        what: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._make_smtp = smtp
        self._make_graph = graph
        self._key = key
        self._what = what
        self._clock = clock
        self._stack = contextlib.ExitStack()
        self._smtp: MessageSender | None = None
        self._graph: MessageSender | None = None
        self.transport_used: str | None = None

    def __enter__(self) -> SmtpThenGraph:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def _sender(self, which: str) -> MessageSender:
        if which == "smtp":
            if self._smtp is None:
                self._smtp = self._stack.enter_context(self._make_smtp())
            return self._smtp
        if self._graph is None:
            self._graph = self._stack.enter_context(self._make_graph())
        return self._graph

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
        options = {
            "on_accepted": on_accepted,
            "on_sending": on_sending,
            "check_sent_first": check_sent_first,
            "already_accepted": already_accepted,
            "copies": copies,
        }
        if self._graph is None and not _known_disabled(self._key, self._clock()):
            try:
                result = self._sender("smtp").send(message, **options)
                self.transport_used = "smtp"
                return result
            except MailAuthenticationError as err:
                if not smtp_auth_disabled(err):
                    raise
                # The login was refused before any content went out: Graph may send this message.
                if _remember_disabled(self._key, self._clock()):
                    log.warning(
                        "SMTP AUTH is disabled for %s (%s); transport is auto, so mail goes through Microsoft Graph "
                        "(this process tries SMTP again in %.0f minutes).",
                        self._what,
                        str(err)[:300],
                        REMEMBER_SECONDS / 60,
                    )
        result = self._sender("graph").send(message, **options)
        self.transport_used = "graph"
        return result


def imap_then_graph(
    imap: Callable[[], Any],
    graph: Callable[[], Any],
    *,
    key: Hashable,
    what: str,
    clock: Callable[[], float] = time.monotonic,
) -> Any:
    """Receiving with ``transport: auto``: ``imap()``, and ``graph()`` when Exchange refuses the IMAP login.

    Exchange answers a mailbox with IMAP disabled (or a tenant without IMAP) with the same ``NO
    AUTHENTICATE failed`` as a refused token, so the refusal alone decides; Graph then answers with its
    own error if the token is the problem. Remembered per process for :data:`REMEMBER_SECONDS`.
    """
    imap_key = ("imap", key)
    if not _known_disabled(imap_key, clock()):
        try:
            return imap()
        except MailAuthenticationError as err:
            if _remember_disabled(imap_key, clock()):
                log.warning(
                    "Exchange refused the IMAP login of %s (%s); transport is auto, so mail is read through "
                    "Microsoft Graph (this process tries IMAP again in %.0f minutes).",
                    what,
                    str(err)[:300],
                    REMEMBER_SECONDS / 60,
                )
    return graph()


__all__ = ["REMEMBER_SECONDS", "SmtpThenGraph", "forget_disabled", "imap_then_graph", "smtp_auth_disabled"]
