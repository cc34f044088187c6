"""One folder's new messages as an endless stream over Microsoft Graph delta (the event trigger's Graph half).

The Graph twin of :class:`..imap.stream.FolderStream`: it yields ``(raw_event, payload)`` pairs and
moves only its in-memory read position; the stored position is advanced by whoever knows the messages
were handled (the producer's ``advance``), never here.

The position is a :class:`..core.watermark.DeltaWatermark`: the folder's **id** (a renamed or moved
folder is still the watched one), the delta link of the last round whose messages were all handled,
the Graph ids handled (a round read again after a restart skips them), and ``since``, the earliest
``receivedDateTime`` the stream is responsible for.

- **First start** (no position): delta cannot start "from now" for messages, so a round starts from
  :data:`..graph.watch.FIRST_ROUND_MARGIN` before now and pages through to its delta link; what it
  finds was already in the folder and is not reported (its ids join the position). Only mail created
  after that round is new, as the IMAP stream's first start only finds where "now" is.
- **Expired delta token** (``syncStateNotFound``, ``resyncRequired``): a fresh round from
  :data:`..graph.watch.RESYNC_MARGIN` before the expired link was obtained (never before ``since``),
  skipping the ids already handled: nothing is lost that was received meanwhile, nothing is repeated.
- **Folder gone** (its id answers ``ErrorItemNotFound``: deleted, not renamed): the path is resolved
  again; a new folder under the name is read from the position's time (its mail since then is new).
- **Waiting**: delta has no push here, so the stream polls, adaptively (:class:`PollPace`): soon again
  after a round that found mail, then doubling up to ``slowest``. The shared per-folder delta loop of the
  triggerer (``graph/hub.py``, shared with deferred Graph sensors) plugs in as ``wait``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from airflow_provider_o365mail.core.watch_spec import WatchSpec
from airflow_provider_o365mail.core.watermark import DeltaWatermark
from airflow_provider_o365mail.exceptions import GraphRequestRefused
from airflow_provider_o365mail.graph import folders as graph_folders
from airflow_provider_o365mail.graph import watch as graph_watch
from airflow_provider_o365mail.graph.query import headers_of
from airflow_provider_o365mail.imap.idle import PERMANENT_ERRORS, RECONNECT
from airflow_provider_o365mail.imap.stream import PARKED
from airflow_provider_o365mail.retry import Backoff

log = logging.getLogger(__name__)

#: Errors a person must fix: the stream parks (checks again rarely) instead of failing the watcher.
GRAPH_PERMANENT_ERRORS = (*PERMANENT_ERRORS, GraphRequestRefused)


@dataclass
class PollPace:
    """How long to wait before the next delta round: ``fastest`` after a round that found mail (more may
    follow), then doubling on each quiet round up to ``slowest``."""

    fastest: float = 2.0
    slowest: float = 60.0
    current: float = 0.0

    def after(self, found: bool) -> float:
        if found or self.current <= 0:
            self.current = self.fastest
        else:
            self.current = min(self.slowest, self.current * 2)
        return max(self.current, 0.0)


class GraphFolderStream:
    """New messages of ``folder`` after a position: ``(raw_event, payload)`` pairs, forever.

    :param open_mailbox: builds a :class:`..graph.watch.GraphMailbox` (called in a worker thread: it may
        read the connection); kept for the stream's life, built afresh after a failure.
    :param folder: the folder's path as users write it (``INBOX``, ``Invoices/2026``).
    :param pace: the adaptive poll; ``wait(found)`` replaces it (the shared delta loop).
    :param retry: waits between attempts after transient failures; ``parked``: after permanent ones.
    """

    def __init__(
        self,
        open_mailbox: Callable[[], graph_watch.GraphMailbox],
        folder: str,
        *,
        pace: PollPace | None = None,
        wait: Callable[[bool], Awaitable[Any]] | None = None,
        retry: Backoff = RECONNECT,
        parked: Backoff = PARKED,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.open_mailbox = open_mailbox
        self.folder = folder
        self.spec = WatchSpec.build(folder)
        self.pace = pace or PollPace()
        self._wait = wait
        self.retry = retry
        self.parked = parked
        self._sleep = sleep
        self.clock = clock
        self.read_position: DeltaWatermark | None = None
        #: Messages found by the first start's round (already in the folder: not reported).
        self.skipped_at_start = 0
        self._mailbox: graph_watch.GraphMailbox | None = None

    # ------------------------------------------------------------------ sync part (worker thread)
    def mailbox(self) -> graph_watch.GraphMailbox:
        if self._mailbox is None:
            self._mailbox = self.open_mailbox()
        return self._mailbox

    def drop_mailbox(self) -> None:
        mailbox, self._mailbox = self._mailbox, None
        if mailbox is not None:
            try:
                mailbox.client.close()
            except Exception as err:  # closing a broken session must not hide why it broke
                log.debug("Closing the Graph session failed: %s", err)

    def _round(self, folder_id: str, since: float) -> tuple[list[dict[str, Any]], str]:
        return graph_watch.fresh_round(self.mailbox(), self.spec, folder_id, since, headers=True)

    def read_new(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """The created messages after the read position (oldest first), as ``(raw_event, payload)``.

        The last payload of a round carries the round's delta link (handled up to it, the link may
        advance); the read position moves past the round.
        """
        now = self.clock()
        position = self.read_position
        if position is None:  # first start: find where "now" is; what is there already is not new
            folder_id = graph_watch.folder_id(self.mailbox(), self.folder, None)
            since = now - graph_watch.FIRST_ROUND_MARGIN
            raw, link = self._round(folder_id, since)
            self.skipped_at_start = len(raw)
            self.read_position = DeltaWatermark(
                folder_id, link, [str(m["id"]) for m in raw if m.get("id")], since, now, now
            )
            return []
        folder_id, since = position.folder_id, position.since
        try:
            if position.delta_link:
                raw, link = graph_watch.read_round(self.mailbox(), position.delta_link, None)
            else:  # a position without a link (a new folder under the watched name): read from `since`
                raw, link = self._round(folder_id, since)
        except GraphRequestRefused as err:
            if graph_watch.is_expired(err):
                obtained = min(position.obtained_at, position.updated_at or position.obtained_at)
                bound = max(since, obtained - graph_watch.RESYNC_MARGIN)
                log.warning(
                    "The delta token of %r expired (%s); reading the folder again from %s, skipping the %d "
                    "message(s) already handled.",
                    self.folder,
                    err.code or err.status,
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(bound)),
                    len(position.seen_ids),
                )
                raw, link = self._round(folder_id, bound)
            elif err.code == "ErrorItemNotFound":
                folder_id, since = self._folder_gone(position)
                raw, link = self._round(folder_id, since)
            else:
                raise
        seen = set(position.seen_ids)
        new = [m for m in raw if m.get("id") and str(m["id"]) not in seen]
        new.sort(key=lambda m: (str(m.get("receivedDateTime") or ""), str(m["id"])))
        events = []
        for index, message in enumerate(new):
            summary = graph_watch.graph_summary(message, self.folder)
            last = index == len(new) - 1
            events.append(
                (
                    {"summary": summary, "headers": headers_of(message)},
                    {
                        "graph_id": summary["graph_id"],
                        "message_id": summary["message_id"],
                        "folder_id": folder_id,
                        "delta_link": link if last else None,
                        "obtained_at": now,
                        "since": since,
                    },
                )
            )
        self.read_position = DeltaWatermark(
            folder_id,
            link,
            [*(position.seen_ids if folder_id == position.folder_id else []), *(str(m["id"]) for m in new)],
            since,
            now,
            position.updated_at,
        )
        return events

    def _folder_gone(self, position: DeltaWatermark) -> tuple[str, float]:
        """The watched folder's id is unknown to Graph (deleted): the folder now under the watched name, read
        from the position's time (everything received there since is new to the watch)."""
        mailbox = self.mailbox()
        graph_folders.forget(mailbox.key, self.folder)
        folder_id = graph_folders.resolve(mailbox.client, mailbox.who, self.folder, key=mailbox.key)
        if folder_id == position.folder_id:
            raise GraphRequestRefused(
                f"Microsoft Graph no longer knows the delta of folder {self.folder!r} although the folder exists; "
                "this is retried.",
                status=404,
                code="ErrorItemNotFound",
            )
        since = max(position.since, (position.updated_at or position.obtained_at) - graph_watch.RESYNC_MARGIN)
        log.warning(
            "The watched folder %r was deleted; watching the folder now under that name from %s.",
            self.folder,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)),
        )
        return folder_id, since

    # ------------------------------------------------------------------ async part
    async def wait(self, found: bool) -> None:
        if self._wait is not None:
            await self._wait(found)
        else:
            await self._sleep(self.pace.after(found))

    async def events(
        self,
        start: DeltaWatermark | None,
        *,
        name: str = "",
        on_first_position: Callable[[DeltaWatermark], Awaitable[None]] | None = None,
        on_quiet_round: Callable[[DeltaWatermark], Awaitable[None]] | None = None,
    ) -> AsyncIterator[tuple[dict[str, Any], dict[str, Any]]]:
        """``on_first_position`` persists where a stream without a stored position begins (before any yield);
        ``on_quiet_round`` sees the read position after a round that found nothing (a fresher link to keep)."""
        self.read_position = start
        failures = parked = 0
        announced = False
        label = name or self.folder
        try:
            while True:
                try:
                    events = await asyncio.to_thread(self.read_new)
                    if parked:
                        log.info("Watching %s works again.", label)
                    failures = parked = 0
                    if not announced and self.read_position is not None:
                        announced = True
                        if start is None and on_first_position is not None:
                            await on_first_position(self.read_position)
                        log.info(
                            "Graph stream %s starts %s; %d message(s) to report.",
                            label,
                            "from its stored delta link" if start else "with new mail from now on",
                            len(events),
                        )
                    for event, payload in events:
                        yield event, payload
                    if not events and on_quiet_round is not None and self.read_position is not None:
                        await on_quiet_round(self.read_position)
                    await self.wait(bool(events))
                except GRAPH_PERMANENT_ERRORS as err:
                    # As over IMAP: raising would fail the watcher and Airflow restarts it within seconds, an
                    # endless loop. Report once, then check again rarely until someone fixes the cause.
                    self.drop_mailbox()
                    parked += 1
                    delay = self.parked.delay(parked)
                    if parked == 1:
                        log.error("Watching %s stopped: %s Next check in %.0f s.", label, err, delay)
                    else:
                        log.warning("Watching %s: still %s; next check in %.0f s.", label, type(err).__name__, delay)
                    await self._sleep(delay)
                except Exception as err:  # dropped connection, timeouts, 5xx after the client's own retries
                    self.drop_mailbox()
                    failures += 1
                    delay = self.retry.delay(failures)
                    log.warning(
                        "Reading %s over Microsoft Graph failed (%s: %s); retrying in %.0f s.",
                        self.folder,
                        type(err).__name__,
                        err,
                        delay,
                    )
                    await self._sleep(delay)
        finally:
            await asyncio.to_thread(self.drop_mailbox)


__all__ = ["GRAPH_PERMANENT_ERRORS", "GraphFolderStream", "PollPace"]
