"""One folder's new messages as an endless stream, in UID order, from a stored position.

The stream reads with IMAPClient in a worker thread (short calls) and waits with IMAP IDLE or
polling (the same waiter as the deferrable sensor). It moves its in-memory read position as it
yields; the stored position (the watermark) is advanced by whoever knows the messages were
handled, never here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from email import policy
from typing import Any

from airflow_provider_o365mail.mail.imap_idle import PERMANENT_ERRORS, MailWaiter, reconnect_delay
from airflow_provider_o365mail.mail.imap_summary import FETCH_ITEMS, summarize
from airflow_provider_o365mail.mail.imap_watch import CheckResult, WatchSpec
from airflow_provider_o365mail.mail.watermark import FolderWatermark

log = logging.getLogger(__name__)

HEADER_ITEM = "BODY.PEEK[HEADER]"
FETCH_CHUNK = 200
PARKED_FIRST_SECONDS = 60.0
PARKED_MAX_SECONDS = 1800.0


# The stream's position is a folder watermark kept in the asset state store.
StreamPosition = FolderWatermark


def headers_of(raw_header: bytes | None) -> dict[str, str]:
    """Lower-case header names to their (unfolded, decoded) values; repeated headers joined."""
    if not raw_header:
        return {}
    try:
        message = email.message_from_bytes(raw_header, policy=policy.default)
    except Exception:
        return {}
    headers: dict[str, str] = {}
    for name, value in message.raw_items():
        try:
            text = str(policy.default.header_fetch_parse(name, value))
        except Exception:
            text = str(value)
        key = name.lower()
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


class FolderStream:
    """New messages of ``folder`` after a position: ``(raw_event, payload)`` pairs, forever."""

    def __init__(self, hook: Any, folder: str, *, mailbox: str | None, poll_interval: float, max_idle: float) -> None:
        self.hook = hook
        self.folder = folder
        self.mailbox = mailbox
        self.waiter = MailWaiter(hook, WatchSpec(folders=(folder,)), mailbox, poll_interval, max_idle)
        self.read_position: StreamPosition | None = None

    # ------------------------------------------------------------------ sync part (worker thread)
    def read_new(self) -> tuple[list[dict[str, Any]], int]:
        """Messages after the read position (oldest first) and the folder's UIDNEXT."""
        with self.hook.imap_client(self.mailbox) as client:
            selected = client.select_folder(self.folder, readonly=True)
            uidvalidity = int(selected[b"UIDVALIDITY"])
            uidnext = int(selected.get(b"UIDNEXT", 0) or 0)
            position = self.read_position
            if position is None:  # first start ever: from now on
                self.read_position = StreamPosition(uidvalidity, max(0, uidnext - 1))
                return [], uidnext
            if position.uidvalidity != uidvalidity:
                since = dt.date.fromtimestamp(position.updated_at or 0) - dt.timedelta(days=1)
                log.warning(
                    "UIDVALIDITY of %s changed (%s -> %s); rescanning since %s, skipping Message-IDs already seen.",
                    self.folder,
                    position.uidvalidity,
                    uidvalidity,
                    since,
                )
                uids = sorted(client.search([b"SINCE", since]))
                floor = 0
            else:
                floor = position.last_uid
                uids = sorted(u for u in client.search([b"UID", f"{floor + 1}:*".encode()]) if u > floor)
            seen = set(position.seen_message_ids)
            events = []
            for start in range(0, len(uids), FETCH_CHUNK):
                chunk = uids[start : start + FETCH_CHUNK]
                fetched = client.fetch(chunk, [*FETCH_ITEMS, HEADER_ITEM])
                for uid in chunk:
                    data = fetched.get(uid)
                    if data is None:
                        continue
                    summary = summarize(self.folder, uidvalidity, uid, data)
                    if summary["message_id"] and summary["message_id"] in seen:
                        continue
                    header_key = next((k for k in data if k.startswith(b"BODY[HEADER")), None)
                    events.append({"summary": summary, "headers": headers_of(data.get(header_key))})
            last = max([floor, *uids]) if uids else floor
            self.read_position = StreamPosition(uidvalidity, last, position.seen_message_ids, position.updated_at)
            return events, uidnext

    # ------------------------------------------------------------------ async part
    async def events(
        self,
        start: StreamPosition | None,
        *,
        name: str = "",
        on_first_position: Callable[[StreamPosition], Awaitable[None]] | None = None,
    ) -> AsyncIterator[tuple[dict[str, Any], dict[str, Any]]]:
        """``on_first_position`` persists where a stream without a stored position begins (before any yield)."""
        self.read_position = start
        failures = 0
        parked = 0
        announced = False
        while True:
            try:
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
                        },
                    )
                await self.waiter.wait(CheckResult(scanned={self.folder: {"uidnext": uidnext}}))
            except PERMANENT_ERRORS as err:
                # Raising would fail the watcher, and Airflow restarts failed watchers within seconds: an
                # endless loop. Report once, then check again rarely until someone fixes the cause.
                parked += 1
                delay = min(PARKED_MAX_SECONDS, PARKED_FIRST_SECONDS * 2 ** (parked - 1))
                if parked == 1:
                    log.error("Watching %s stopped: %s Next check in %.0f s.", name or self.folder, err, delay)
                else:
                    log.warning(
                        "Watching %s: still %s; next check in %.0f s.", name or self.folder, type(err).__name__, delay
                    )
                await asyncio.sleep(delay)
                continue
            except Exception as err:  # dropped connection, timeouts, 5xx
                failures += 1
                delay = reconnect_delay(failures)
                log.warning(
                    "Reading %s failed (%s: %s); retrying in %.0f s.", self.folder, type(err).__name__, err, delay
                )
                await asyncio.sleep(delay)
