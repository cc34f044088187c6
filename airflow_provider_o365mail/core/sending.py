"""What every transport's sender shares: the result of one message, the callbacks that keep the send
ledger, and the sender protocol that :func:`.batch.send_batch` drives (SMTP today, Graph next)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from airflow_provider_o365mail.core.compose import OutgoingMessage

#: ``sent_lookup(message_id)``: how many messages with this Message-ID are in the mailbox's Sent Items
#: (a bool is fine where only one transaction per message can happen).
SentLookup = Callable[[str], "int | bool"]
#: ``on_accepted(message_id, recipients, complete)``: right after the server accepted a transaction;
#: ``complete``: no recipient of the message is left deferred.
OnAccepted = Callable[[str, "tuple[str, ...]", bool], None]
#: ``on_sending(message_id)``: right before a transaction of the message starts.
OnSending = Callable[[str], None]


@dataclass(frozen=True)
class SendResult:
    """What happened to one message: accepted and permanently refused recipients."""

    message_id: str
    accepted: tuple[str, ...]
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: True when an earlier try (send ledger) or the Sent Items check showed it was already accepted.
    already_sent: bool = False


class MessageSender(Protocol):
    """Sends one message at a time, retrying what is temporary; see ``smtp.sender.SmtpBatchSender.send``."""

    def send(
        self,
        message: OutgoingMessage,
        *,
        on_accepted: OnAccepted | None = None,
        on_sending: OnSending | None = None,
        check_sent_first: bool = False,
        already_accepted: Iterable[str] = (),
        copies: int = 0,
    ) -> SendResult: ...


__all__ = ["MessageSender", "OnAccepted", "OnSending", "SendResult", "SentLookup"]
