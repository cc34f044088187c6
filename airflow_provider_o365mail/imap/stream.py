"""One folder's new messages as an endless stream, in UID order, from a stored position.

The stream reads with IMAPClient in a worker thread (short calls) and waits through this process's
shared IDLE watch of the folder (:mod:`.hub`, the one the deferrable sensor's trigger waits on):
one IDLE connection per folder and mailbox, however many streams and sensors wait on it; polling
where the server has no IDLE. It moves its in-memory read position as it yields; the stored
position (the watermark) is advanced by whoever knows the messages were handled, never here.

No change is missed between a read and the wait after it: the stream notes the watch's generation
*before* each read and then waits for "changed since that generation", telling the watch the
UIDNEXT its read saw (mail that came while the IDLE connection was between sessions wakes it too).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from airflow_provider_o365mail.core.summary import headers_of
from airflow_provider_o365mail.core.watermark import FolderWatermark, seen_key
from airflow_provider_o365mail.imap.hub import FolderWatch
from airflow_provider_o365mail.imap.idle import PERMANENT_ERRORS, RECONNECT
from airflow_provider_o365mail.imap.scan import ClientFactory, ImapSession, scan_folder
from airflow_provider_o365mail.imap.summary import header_bytes
from airflow_provider_o365mail.retry import Backoff

log = logging.getLogger(__name__)

#: A stream that cannot work until a person fixes something checks again after 1, 2, 4 ... 30 min.
PARKED = Backoff(first=60.0, maximum=1800.0, jitter=(1.0, 1.0))


class FolderStream:
    """New messages of ``folder`` after a position: ``(raw_event, payload)`` pairs, forever.

    :param open_client: opens a logged-in IMAPClient (short reads run in a worker thread).
    :param join_watch: joins the shared watch of ``folder`` (called on the event loop, no I/O); the
        stream holds it while it runs and joins afresh after the watch stopped on a permanent error.
    :param retry: waits between attempts after transient failures; ``parked``: after permanent ones.
    """

    def __init__(
        self,
        open_client: ClientFactory,
        join_watch: Callable[[], FolderWatch],
        folder: str,
        *,
        retry: Backoff = RECONNECT,
        parked: Backoff = PARKED,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.open_client = open_client
        self.join_watch = join_watch
        self.folder = folder
        self.retry = retry
        self.parked = parked
        self._sleep = sleep
        self.read_position: FolderWatermark | None = None

    # ------------------------------------------------------------------ sync part (worker thread)
    def read_new(self) -> tuple[list[dict[str, Any]], int]:
        """Messages after the read position (oldest first) and the folder's UIDNEXT."""
        position = self.read_position
        with ImapSession(self.open_client) as session:
            scan = scan_folder(session, self.folder, position, from_now_on=True)
        events = [
            {"summary": message.summary, "headers": headers_of(header_bytes(message.data))} for message in scan.messages
        ]
        seen, updated_at = (position.seen_keys, position.updated_at) if position else ([], 0.0)
        self.read_position = FolderWatermark(scan.uidvalidity, scan.high_uid, seen, updated_at)
        return events, scan.uidnext

    # ------------------------------------------------------------------ async part
    async def events(
        self,
        start: FolderWatermark | None,
        *,
        name: str = "",
        on_first_position: Callable[[FolderWatermark], Awaitable[None]] | None = None,
    ) -> AsyncIterator[tuple[dict[str, Any], dict[str, Any]]]:
        """``on_first_position`` persists where a stream without a stored position begins (before any yield)."""
        self.read_position = start
        failures = 0
        parked = 0
        announced = False
        watch: FolderWatch | None = None
        try:
            while True:
                try:
                    if watch is None:
                        watch = self.join_watch()
                    # Before the read: a change while it runs (or while events are yielded) ends the wait at once.
                    mark = watch.mark()
                    events, uidnext = await asyncio.to_thread(self.read_new)
                    if parked:
                        log.info("Watching %s works again.", name or self.folder)
                    failures = parked = 0
                    if not announced and self.read_position is not None:
                        announced = True
                        if start is None and on_first_position is not None:
                            await on_first_position(self.read_position)
                        log.info(
                            "IMAP stream %s starts after UID %s (%s); %d message(s) to report.",
                            name or self.folder,
                            start.last_uid if start else self.read_position.last_uid,
                            "stored position" if start else "new mail from now on",
                            len(events),
                        )
                    for event in events:
                        summary = event["summary"]
                        yield (
                            event,
                            {
                                "uidvalidity": summary["uidvalidity"],
                                "uid": summary["uid"],
                                "message_id": summary["message_id"],
                                "seen_key": seen_key(summary),
                            },
                        )
                    reason = await watch.wait(mark, {self.folder: uidnext})
                    log.debug("Waiting on %s ended: %s.", name or self.folder, reason)
                except PERMANENT_ERRORS as err:
                    # Raising would fail the watcher, and Airflow restarts failed watchers within seconds: an
                    # endless loop. Report once, then check again rarely until someone fixes the cause. A
                    # parked stream holds no IDLE connection: the watch is left (a watch that stopped on
                    # this error stays stopped) and joined afresh for the next check.
                    if watch is not None:
                        watch.close()
                        watch = None
                    parked += 1
                    delay = self.parked.delay(parked)
                    if parked == 1:
                        log.error("Watching %s stopped: %s Next check in %.0f s.", name or self.folder, err, delay)
                    else:
                        log.warning(
                            "Watching %s: still %s; next check in %.0f s.",
                            name or self.folder,
                            type(err).__name__,
                            delay,
                        )
                    await self._sleep(delay)
                    continue
                except Exception as err:  # dropped connection, timeouts, 5xx
                    failures += 1
                    delay = self.retry.delay(failures)
                    log.warning(
                        "Reading %s failed (%s: %s); retrying in %.0f s.", self.folder, type(err).__name__, err, delay
                    )
                    await self._sleep(delay)
        finally:
            if watch is not None:
                watch.close()
