"""Send a checked batch one message at a time, skipping what an earlier try sent, logging progress.

Each :class:`PlannedMessage` is built just before it is sent and dropped after (peak memory is one
message, not the batch). With a :class:`SendLedger`, a message is recorded right after the server's
``250`` and a retry of the task skips it (its Message-ID is returned as if sent); a message whose
outcome is not known (a try was killed or lost its connection during it) is looked up in Sent
Items before it is sent again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from airflow_provider_o365mail import hints
from airflow_provider_o365mail.core.sending import MessageSender, SendResult

if TYPE_CHECKING:
    from airflow_provider_o365mail.core.compose import PlannedMessage
    from airflow_provider_o365mail.core.send_ledger import SendLedger

log = logging.getLogger(__name__)

#: A progress line every this many messages (and at the end) for batches longer than it.
PROGRESS_EVERY = 25
#: Exchange Online delivers about this many messages per minute per mailbox (it delays the rest).
EXCHANGE_MESSAGES_PER_MINUTE = 30


def send_batch(
    sender: MessageSender,
    messages: Sequence[PlannedMessage],
    *,
    ledger: SendLedger | None = None,
    progress_every: int = PROGRESS_EVERY,
    clock: Callable[[], float] = time.monotonic,
) -> list[SendResult]:
    """Send ``messages`` in order through ``sender``; return one result per message (skipped ones too)."""
    total = len(messages)
    recorded = ledger.entries() if ledger is not None else {}
    skipped = [m.message_id for m in messages if recorded.get(m.message_id, {}).get("state") == "accepted"]
    if skipped:
        log.info(
            "An earlier try of this task already sent %d of %d message(s); skipping them: %s",
            len(skipped),
            total,
            ", ".join(skipped),
        )
    to_send = total - len(skipped)
    if to_send > EXCHANGE_MESSAGES_PER_MINUTE:
        log.info("Sending %d message(s). %s", to_send, hints.EXCHANGE_RATE.format(minutes=to_send / 30))
    results: list[SendResult] = []
    started = clock()
    sent = 0
    for planned in messages:
        entry = recorded.get(planned.message_id, {})
        state = entry.get("state")
        if state == "accepted":
            results.append(SendResult(planned.message_id, accepted=planned.recipients, already_sent=True))
            continue
        outgoing = planned.build()  # attachments are read now, one message at a time
        done = [r for r in entry.get("done", ()) if r in planned.recipients]
        if done:
            log.info(
                "An earlier try sent %s to %d of its %d recipient(s) (the others were deferred); sending it "
                "to the others.",
                planned.message_id,
                len(done),
                len(planned.recipients),
            )
        try:
            result = sender.send(
                outgoing,
                **_ledger_callbacks(ledger, planned, done, int(entry.get("copies", 0))),
                check_sent_first=state == "sending",
                already_accepted=done,
                copies=int(entry.get("copies", 0)),
            )
        finally:
            del outgoing
        results.append(result)
        sent += 1
        log.debug("Sent %s to %d recipient(s).", result.message_id, len(result.accepted))
        if to_send > progress_every and (sent % progress_every == 0 or sent == to_send):
            _log_progress(sent, to_send, clock() - started)
    return results


def _ledger_callbacks(
    ledger: SendLedger | None, planned: PlannedMessage, done: list[str], copies: int
) -> dict[str, Callable]:
    """``on_sending`` / ``on_accepted`` for :meth:`MessageSender.send` that keep the message's ledger entry."""
    if ledger is None:
        return {}
    progress = {"done": list(done), "copies": copies}
    total = len(planned.recipients)

    def on_sending(message_id: str) -> None:
        # Before each transaction: a try killed from here on may have delivered it (Sent Items tells).
        ledger.record(message_id, "sending", total, done=progress["done"], copies=progress["copies"])

    def on_accepted(message_id: str, recipients: tuple[str, ...], complete: bool) -> None:
        if recipients:
            progress["done"] = [*progress["done"], *recipients]
            progress["copies"] += 1
        if complete:
            ledger.record(message_id, "accepted", total, copies=progress["copies"])
        else:
            ledger.record(message_id, "partial", total, done=progress["done"], copies=progress["copies"])

    return {"on_sending": on_sending, "on_accepted": on_accepted}


def _log_progress(sent: int, total: int, elapsed: float) -> None:
    rate = sent / elapsed * 60 if elapsed > 0 else 0.0
    remaining = (total - sent) / (sent / elapsed) if sent and elapsed > 0 else 0.0
    log.info(
        "Sent %d of %d message(s) (%.0f%%), %.1f per minute, about %s left.",
        sent,
        total,
        100 * sent / total,
        rate,
        _duration(remaining),
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


__all__ = ["PROGRESS_EVERY", "send_batch"]
