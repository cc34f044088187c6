"""After an ambiguous outcome (the request went out, its answer did not come back), look for the message
in the mailbox's Sent Items before sending it again: the one rule every transport shares.

Exchange keeps a copy of every message it accepted in Sent Items (SMTP AUTH submissions and Graph
sends alike); the copy can lag behind the acceptance, so the lookup waits for it a bounded time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from airflow_provider_o365mail.core.sending import SentLookup
from airflow_provider_o365mail.exceptions import DeliveryUnknownError

log = logging.getLogger(__name__)

#: How long to wait for Exchange's Sent Items copy after an ambiguous outcome, and how often to look.
SENT_ITEMS_WAIT_SECONDS = 30.0
SENT_ITEMS_POLL_SECONDS = 3.0


def found_in_sent_items(
    lookup: SentLookup | None,
    message_id: str,
    *,
    reason: str,
    where: str,
    copies: int = 0,
    wait: float = SENT_ITEMS_WAIT_SECONDS,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> bool:
    """Look for ``message_id`` in Sent Items for up to ``wait`` seconds (the copy can lag).

    Found means more copies of its Message-ID than the ``copies`` known accepted transactions made.
    False: not there, send it again. Raises :class:`DeliveryUnknownError` when Sent Items could not be
    read at all (sending again could deliver twice; the task's retry looks again).
    """
    if lookup is None:
        log.warning(
            "The outcome of message %s is unknown (%s) and no Sent Items lookup is configured; sending it "
            "again may deliver it twice.",
            message_id,
            reason,
        )
        return False
    deadline = clock() + wait
    last_error: str | None = None
    looked = False
    while True:
        try:
            if int(lookup(message_id)) > copies:
                log.info(
                    "Message %s is in Sent Items: the server accepted it although %s; not sending it again.",
                    message_id,
                    reason,
                )
                return True
            looked = True
        except Exception as err:  # mail server down, throttled, folder missing: keep trying until the deadline
            last_error = f"{type(err).__name__}: {err}"
        if clock() >= deadline:
            break
        sleep(min(SENT_ITEMS_POLL_SECONDS, max(0.0, deadline - clock())))
    if not looked:
        raise DeliveryUnknownError(
            f"Message {message_id} may or may not have been accepted by {where} ({reason}), and Sent Items could "
            f"not be searched for {wait:.0f} s (last: {last_error}). It was not sent again to avoid a duplicate; "
            "the task's retry looks in Sent Items again first."
        )
    log.warning("Message %s is not in Sent Items %.0f s after %s: sending it again.", message_id, wait, reason)
    return False


__all__ = ["SENT_ITEMS_POLL_SECONDS", "SENT_ITEMS_WAIT_SECONDS", "found_in_sent_items"]
