"""The event trigger's producer over Microsoft Graph (``O365ImapEventTrigger(transport="graph")``).

The twin of :class:`.imap_events.ImapStreamProducer`: one :class:`.graph_stream.GraphFolderStream`
per connection, mailbox, folder and post-action in the triggerer, shared by every watcher. Ack mode:
the post-action and the stream's position (a :class:`..core.watermark.DeltaWatermark` kept in every
watcher's asset state store under :data:`GRAPH_POSITION_KEY`) advance only in :meth:`advance`, i.e.
after Airflow stored the asset events. After a triggerer restart the stream resumes from the stored
delta link, skipping the Graph ids already handled; asset events Airflow stored whose ack was lost are
skipped through the listener's record (:mod:`..event_state`), as over IMAP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from airflow_provider_o365mail.connection import DEFAULT_CONN_ID
from airflow_provider_o365mail.core.watch_spec import CheckResult, WatchSpec
from airflow_provider_o365mail.core.watermark import DeltaWatermark
from airflow_provider_o365mail.exceptions import O365MailError
from airflow_provider_o365mail.triggers import mail_stream
from airflow_provider_o365mail.triggers.graph_stream import GraphFolderStream, PollPace

try:  # Airflow >= 3.3
    from airflow.triggers.shared_stream import AdvanceItem, SharedStreamProducer
except ImportError:  # pragma: no cover - refused in O365ImapEventTrigger.__init__
    AdvanceItem = Any  # type: ignore[misc,assignment]
    SharedStreamProducer = object  # type: ignore[misc,assignment]

log = logging.getLogger(__name__)

GRAPH_POSITION_KEY = "o365mail_graph_position"
FIRST_SUBSCRIBER_WAIT_SECONDS = 30.0
#: A quiet stream stores its fresher delta link at most this often (a link unused for long expires).
QUIET_STORE_SECONDS = 600.0
#: The fastest poll (after a round that found mail); the slowest is the trigger's ``poll_interval``.
FASTEST_POLL_SECONDS = 2.0


def least_advanced(positions: Sequence[DeltaWatermark]) -> DeltaWatermark | None:
    """Where a stream of several watchers resumes: the oldest link (nothing a watcher has not handled is
    skipped), with the handled ids of every watcher that watched the same folder."""
    if not positions:
        return None
    oldest = min(positions, key=lambda p: (p.obtained_at, p.updated_at))
    same = [p for p in positions if p.folder_id == oldest.folder_id]
    seen = list(dict.fromkeys(i for p in same for i in p.seen_ids))
    return DeltaWatermark(
        oldest.folder_id,
        oldest.delta_link,
        seen,
        min(p.since for p in same),
        oldest.obtained_at,
        max(p.updated_at for p in same),
    )


class GraphStreamProducer(SharedStreamProducer):
    """The shared half over Graph: reads the folder's delta once for all watchers, advances after persistence."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        from airflow_provider_o365mail.hooks.o365mail import O365MailHook

        self.kwargs = dict(kwargs)
        self.key = mail_stream.stream_key(self.kwargs)
        self.spec = WatchSpec.build(
            self.kwargs.get("folder") or "INBOX",
            post_action=self.kwargs.get("post_action"),
            move_to=self.kwargs.get("move_to"),
        )
        self.hook = O365MailHook(self.kwargs.get("conn_id") or DEFAULT_CONN_ID)
        self.position: DeltaWatermark | None = None
        self.stream: GraphFolderStream | None = None
        #: Events yielded and not yet advanced (a quiet round stores its link only when nothing is pending).
        self.pending = 0
        self.stored_at = 0.0

    def build_stream(self) -> GraphFolderStream:
        """Reads nothing: the Graph client (and the connection) is built in the stream's worker thread."""
        mailbox = self.kwargs.get("mailbox")
        slowest = max(float(self.kwargs.get("poll_interval") or 60.0), FASTEST_POLL_SECONDS)
        return GraphFolderStream(
            lambda: self.hook.graph_mailbox(mailbox),
            self.spec.folders[0],
            pace=PollPace(fastest=FASTEST_POLL_SECONDS, slowest=slowest),
        )

    async def _stored_position(self) -> DeltaWatermark | None:
        group = mail_stream.group(self.key)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(group.subscribed.wait(), FIRST_SUBSCRIBER_WAIT_SECONDS)
        positions = []
        for store in list(group.stores.values()):
            for accessor in mail_stream.accessors(store):
                position = DeltaWatermark.from_dict(await accessor.aget(GRAPH_POSITION_KEY))
                if position is not None:
                    positions.append(position)
        return least_advanced(positions)

    async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
        start = await self._stored_position()
        self.position = start
        self.stream = self.build_stream()
        async for raw, payload in self.stream.events(
            start,
            name=f"{self.key[1]}/{self.spec.folders[0]}",
            on_first_position=self._store_position,
            on_quiet_round=self._quiet_round,
        ):
            self.pending += 1
            yield raw, payload
        raise O365MailError("The Graph stream ended unexpectedly.")  # contract: yield forever or raise

    async def _store_position(self, position: DeltaWatermark) -> None:
        """Write the position into every watcher's asset state store (the next start resumes there)."""
        self.position = position
        self.stored_at = time.time()
        for store in list(mail_stream.group(self.key).stores.values()):
            for accessor in mail_stream.accessors(store):
                await accessor.aset(GRAPH_POSITION_KEY, position.to_dict())

    async def _quiet_round(self, read: DeltaWatermark) -> None:
        """A round found nothing and every yielded message is handled: the newer link may be stored."""
        stored = self.position
        if self.pending or stored is None or read.delta_link == stored.delta_link:
            return
        if time.time() - self.stored_at < QUIET_STORE_SECONDS:
            return
        await self._store_position(
            DeltaWatermark(read.folder_id, read.delta_link, read.seen_ids, read.since, read.obtained_at, time.time())
        )

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        group = mail_stream.group(self.key)
        self.pending = max(0, self.pending - len(batch))
        clean = []
        for item in batch:
            if not item.outcome.is_clean:
                break
            clean.append(item.broker_payload)
        if clean:
            matched = [p for p in clean if mail_stream.match_key(p) in group.matched]
            if self.spec.post_action and matched:
                result = CheckResult(
                    messages=[
                        {"folder": self.spec.folders[0], "graph_id": p["graph_id"], "message_id": p["message_id"]}
                        for p in matched
                    ],
                    scanned={},
                )
                await asyncio.to_thread(
                    self.hook.apply_post_action, self.spec, result, mailbox=self.kwargs.get("mailbox")
                )
            for p in matched:
                group.matched.discard(mail_stream.match_key(p))
            now = time.time()
            position = self.position or DeltaWatermark(folder_id=clean[0]["folder_id"])
            for p in clean:
                position = position.advanced(
                    p["folder_id"],
                    p.get("delta_link"),
                    float(p["obtained_at"]),
                    float(p["since"]),
                    [p["graph_id"]],
                    now,
                )
            await self._store_position(position)
        if len(clean) != len(batch):
            raise O365MailError(
                "A watcher did not confirm a message in time; restarting the stream from the last confirmed "
                "position so that nothing is lost."
            )


__all__ = ["GRAPH_POSITION_KEY", "GraphStreamProducer", "least_advanced"]
