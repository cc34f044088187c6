"""O365ImapEventTrigger: schedule DAGs on inbound mail (``AssetWatcher``), Airflow >= 3.3.

Every watcher on the same connection, mailbox, folder, post-action and transport shares ONE stream
through Airflow 3.3's shared streams; each watcher filters the new messages with its own criteria
and turns each match into one asset event whose payload is the message summary (the sensor's XCom
shape). Over IMAP the stream waits on the triggerer's shared IDLE watch of the folder
(:mod:`.imap.hub`), the one deferred sensors use too: one IDLE connection per connection, mailbox
and folder. Over Microsoft Graph (``transport="graph"``) it reads the folder's delta
(:mod:`.graph_events`).

Ack mode: the post-action and the stream position (UIDVALIDITY + last UID + recent Message-IDs,
kept in every watcher's asset state store) advance only in the producer's ``advance``, i.e. after
Airflow stored the asset events. After a triggerer restart the stream resumes from the stored
position, and Message-IDs already handled are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Hashable, Sequence
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

from airflow_provider_o365mail.connection import DEFAULT_CONN_ID
from airflow_provider_o365mail.core.criteria import POST_ACTIONS, CriteriaError, MailCriteria
from airflow_provider_o365mail.core.watch_spec import CheckResult, WatchSpec
from airflow_provider_o365mail.core.watermark import FolderWatermark
from airflow_provider_o365mail.event_state import EMITTED_KEY, SOURCE_MARKER, emitted_id
from airflow_provider_o365mail.exceptions import ConnectionConfigError, O365MailError
from airflow_provider_o365mail.imap.idle import MAX_IDLE_SECONDS, PERMANENT_ERRORS, RECONNECT
from airflow_provider_o365mail.imap.stream import PARKED
from airflow_provider_o365mail.triggers import mail_stream
from airflow_provider_o365mail.triggers.mail_stream import Resolved as _Resolved

try:  # Airflow >= 3.3
    from airflow.triggers.shared_stream import AdvanceItem, SharedStreamProducer
except ImportError:  # pragma: no cover - refused in O365ImapEventTrigger.__init__
    AdvanceItem = Any  # type: ignore[misc,assignment]
    SharedStreamProducer = object  # type: ignore[misc,assignment]

log = logging.getLogger(__name__)

POSITION_KEY = "o365mail_imap_position"
FIRST_SUBSCRIBER_WAIT_SECONDS = 30.0
CRITERIA_FIELDS = (
    "sender",
    "recipient",
    "subject",
    "since",
    "before",
    "unseen",
    "header",
    "has_attachment",
    "attachment_name",
)


def require_shared_streams() -> None:
    """Fail at DAG parse on an Airflow without shared streams and the asset state store."""
    from airflow_provider_o365mail.version_compat import AIRFLOW_V_3_3_PLUS, AIRFLOW_VERSION

    if not AIRFLOW_V_3_3_PLUS or SharedStreamProducer is object:
        raise O365MailError(
            f"O365ImapEventTrigger needs Airflow 3.3 or newer (shared trigger streams and the asset state store); "
            f"this is Airflow {AIRFLOW_VERSION}. On Airflow 3.1 and 3.2 use O365ImapSensor (deferrable=True) in a DAG instead."
        )


#: The transports a stream reads with (``auto``: IMAP, Graph once Exchange refuses the IMAP login).
STREAM_TRANSPORTS = ("imap", "graph", "auto")

# What the producers of both transports share (:mod:`.mail_stream`).
_GROUPS = mail_stream.GROUPS
_group = mail_stream.group
_stream_key = mail_stream.stream_key
_accessors = mail_stream.accessors


class ImapStreamProducer(SharedStreamProducer):
    """The shared half: reads the folder once for all watchers, advances after persistence."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        from airflow_provider_o365mail.hooks.o365mail import O365MailHook

        self.kwargs = dict(kwargs)
        self.key = _stream_key(self.kwargs)
        self.spec = WatchSpec.build(
            self.kwargs.get("folder") or "INBOX",
            post_action=self.kwargs.get("post_action"),
            move_to=self.kwargs.get("move_to"),
        )
        self.hook = O365MailHook(self.kwargs.get("conn_id") or DEFAULT_CONN_ID)
        self.position: FolderWatermark | None = None

    async def _stored_position(self) -> FolderWatermark | None:
        group = _group(self.key)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(group.subscribed.wait(), FIRST_SUBSCRIBER_WAIT_SECONDS)
        positions = []
        for store in list(group.stores.values()):
            for accessor in _accessors(store):
                value = await accessor.aget(POSITION_KEY)
                position = FolderWatermark.from_dict(value)
                if position is not None:
                    positions.append(position)
        if not positions:
            return None
        # Resume from the least advanced watcher: nothing a watcher has not seen is skipped.
        oldest = min(positions, key=lambda p: (p.uidvalidity, p.last_uid))
        seen = [m for p in positions for m in p.seen_keys]
        return FolderWatermark(oldest.uidvalidity, oldest.last_uid, seen, max(p.updated_at for p in positions))

    async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
        start = await self._stored_position()
        self.position = start
        stream = self.hook.folder_stream(
            self.spec.folders[0],
            mailbox=self.kwargs.get("mailbox"),
            poll_interval=float(self.kwargs.get("poll_interval") or 60.0),
            max_idle=min(float(self.kwargs.get("idle_timeout") or MAX_IDLE_SECONDS), MAX_IDLE_SECONDS),
        )
        async for raw, payload in stream.events(
            start, name=f"{self.key[1]}/{self.spec.folders[0]}", on_first_position=self._store_position
        ):
            yield raw, payload
        raise O365MailError("The IMAP stream ended unexpectedly.")  # contract: yield forever or raise

    async def _store_position(self, position: FolderWatermark) -> None:
        """Write the position into every watcher's asset state store (the next start resumes there)."""
        self.position = position
        for store in list(_group(self.key).stores.values()):
            for accessor in _accessors(store):
                await accessor.aset(POSITION_KEY, position.to_dict())

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        group = _group(self.key)
        clean = []
        for item in batch:
            if not item.outcome.is_clean:
                break
            clean.append(item.broker_payload)
        if clean:
            matched = [p for p in clean if mail_stream.match_key(p) in group.matched]
            if self.spec.post_action and matched:
                result = CheckResult(
                    messages=[{"folder": self.spec.folders[0], **p} for p in matched],
                    scanned={},
                )
                await asyncio.to_thread(
                    self.hook.commit_mail, self.spec, result, None, mailbox=self.kwargs.get("mailbox")
                )
            for p in matched:
                group.matched.discard(mail_stream.match_key(p))
            last = clean[-1]
            base = self.position or FolderWatermark(last["uidvalidity"], 0)
            self.position = base.advanced(
                last["uidvalidity"], last["uid"], [p.get("seen_key") for p in clean], time.time()
            )
            await self._store_position(self.position)
        if len(clean) != len(batch):
            raise O365MailError(
                "A watcher did not confirm a message in time; restarting the stream from the last confirmed "
                "position so that nothing is lost."
            )


def stream_transport(kwargs: dict[str, Any]) -> str:
    """``imap`` or ``graph`` for a stream (blocking: reads the connection; ``auto`` may try an IMAP login)."""
    from airflow_provider_o365mail.hooks.fallback import imap_then_graph
    from airflow_provider_o365mail.hooks.o365mail import O365MailHook, receive_transport

    hook = O365MailHook(kwargs.get("conn_id") or DEFAULT_CONN_ID)
    transport = receive_transport(kwargs.get("transport"), hook.settings.transport)
    if transport != "auto":
        return transport
    mailbox = kwargs.get("mailbox")

    def imap_login() -> str:
        with hook.imap_client(mailbox):
            return "imap"

    return imap_then_graph(
        imap_login,
        lambda: "graph",
        key=hook._mailbox_key(mailbox),
        what=f"{mailbox or 'the mailbox'} (connection {hook.conn_id})",
    )


class MailStreamProducer(SharedStreamProducer):
    """A stream whose transport comes from the connection (``transport`` unset or ``auto``): decided when the
    stream opens (the connection is read in a thread, never on the event loop), then the IMAP or the Graph
    producer does the work."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.kwargs = dict(kwargs)
        self.key = _stream_key(self.kwargs)
        self.inner: SharedStreamProducer | None = None

    async def _transport(self) -> str:
        failures = parked = 0
        while True:
            try:
                return await asyncio.to_thread(stream_transport, self.kwargs)
            except PERMANENT_ERRORS as err:  # as the streams do: park rather than fail the watcher
                parked += 1
                delay = PARKED.delay(parked)
                log.error("Watching %s/%s stopped: %s Next check in %.0f s.", self.key[1], self.key[3], err, delay)
                await asyncio.sleep(delay)
            except Exception as err:
                failures += 1
                delay = RECONNECT.delay(failures)
                log.warning("Reading connection %s failed (%s); retrying in %.0f s.", self.key[1], err, delay)
                await asyncio.sleep(delay)

    async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
        transport = await self._transport()
        self.inner = _producer(transport, self.kwargs)
        async for item in self.inner.open_stream():
            yield item

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        if self.inner is not None:
            await self.inner.advance(batch)


def _producer(transport: str | None, kwargs: dict[str, Any]) -> SharedStreamProducer:
    if transport == "graph":
        from airflow_provider_o365mail.triggers.graph_events import GraphStreamProducer

        return GraphStreamProducer(kwargs)
    if transport == "imap":
        return ImapStreamProducer(kwargs)
    return MailStreamProducer(kwargs)


class O365ImapEventTrigger(BaseEventTrigger):
    """Fire one asset event per new message matching the criteria in ``folder``.

    :param conn_id: the ``o365mail`` connection.
    :param folder: the folder to watch (one per watcher).
    :param mailbox: another mailbox to open (shared mailbox).
    :param sender: ...the sensor's criteria (same names and meaning), except raw ``criteria``.
    :param post_action: ``None``, ``"seen"``, ``"flag"``, ``"move"`` (with ``move_to``) or ``"delete"``,
        applied after Airflow stored the asset event.
    :param poll_interval: seconds between reads where the server has no IDLE; over Graph, the longest wait
        between two delta reads (2 s after a read that found mail, then doubling up to this).
    :param idle_timeout: re-issue IDLE after this many seconds (at most 1500).
    :param transport: ``"imap"``, ``"graph"`` (Microsoft Graph delta: where IMAP is off) or ``"auto"`` (IMAP,
        and Graph once Exchange refuses the IMAP login); default: the connection's ``transport`` (``smtp``:
        IMAP). Each transport keeps its own position in the asset state store.
    """

    def __init__(
        self,
        *,
        conn_id: str = DEFAULT_CONN_ID,
        folder: str = "INBOX",
        mailbox: str | None = None,
        sender: str | Sequence[str] | None = None,
        recipient: str | Sequence[str] | None = None,
        subject: str | None = None,
        since: str | None = None,
        before: str | None = None,
        unseen: bool = False,
        header: dict[str, str] | None = None,
        has_attachment: bool = False,
        attachment_name: str | None = None,
        post_action: str | None = None,
        move_to: str | None = None,
        poll_interval: float = 60.0,
        idle_timeout: float = MAX_IDLE_SECONDS,
        transport: str | None = None,
        **kwargs: Any,
    ) -> None:
        require_shared_streams()
        if transport is not None and str(transport).lower() not in STREAM_TRANSPORTS:
            raise ConnectionConfigError(
                f"transport must be one of {', '.join(STREAM_TRANSPORTS)} (or None: the connection's); got {transport!r}."
            )
        if kwargs.get("criteria"):
            raise CriteriaError("O365ImapEventTrigger takes the readable criteria only, not raw IMAP 'criteria'.")
        kwargs.pop("criteria", None)
        super().__init__(**kwargs)
        if post_action not in POST_ACTIONS or (post_action == "move" and not move_to):
            raise CriteriaError("post_action must be None, 'seen', 'flag', 'move' (with move_to) or 'delete'.")
        self.conn_id = conn_id
        self.folder = folder
        self.mailbox = mailbox
        self.criteria_values = {
            "sender": sender,
            "recipient": recipient,
            "subject": subject,
            "since": since.isoformat() if hasattr(since, "isoformat") else since,
            "before": before.isoformat() if hasattr(before, "isoformat") else before,
            "unseen": unseen,
            "header": dict(header or {}),
            "has_attachment": has_attachment,
            "attachment_name": attachment_name,
        }
        self.criteria = MailCriteria.build(**dict(self.criteria_values))
        self.post_action = post_action
        self.move_to = move_to
        self.poll_interval = float(poll_interval)
        self.idle_timeout = min(float(idle_timeout), MAX_IDLE_SECONDS)
        self.transport = str(transport).lower() if transport is not None else None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        kwargs = {
            "conn_id": self.conn_id,
            "folder": self.folder,
            "mailbox": self.mailbox,
            **self.criteria_values,
            "post_action": self.post_action,
            "move_to": self.move_to,
            "poll_interval": self.poll_interval,
            "idle_timeout": self.idle_timeout,
        }
        # Only when set: a watcher written before `transport` existed keeps its serialized form (and its trigger).
        if self.transport is not None:
            kwargs["transport"] = self.transport
        return f"{type(self).__module__}.{type(self).__qualname__}", kwargs

    def shared_stream_key(self) -> Hashable | None:
        return _stream_key(self.serialize()[1])

    @classmethod
    def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> SharedStreamProducer:
        return _producer(kwargs.get("transport"), kwargs)

    async def filter_shared_stream(self, shared_stream: AsyncIterator[Any]) -> AsyncIterator[TriggerEvent]:
        key = self.shared_stream_key()
        group = _group(key)
        group.stores[id(self)] = self.asset_state_store
        group.subscribed.set()
        reported = await self._reported()
        try:
            async for raw in shared_stream:
                summary = raw["summary"]
                if self.criteria.matches(summary, raw.get("headers")):
                    group.matched.add(mail_stream.match_key(summary))
                    if emitted_id(summary) in reported:
                        log.info(
                            "Skipping %s (%s): already reported before a restart.",
                            emitted_id(summary),
                            summary["message_id"],
                        )
                        continue
                    yield TriggerEvent({**summary, "source": SOURCE_MARKER})
        finally:
            group.stores.pop(id(self), None)
            if not group.stores:
                _GROUPS.pop(key, None)

    async def _reported(self) -> set[str]:
        """Messages (:func:`emitted_id`) whose asset events Airflow stored (recorded in the same transaction
        by the listener)."""
        reported: set[str] = set()
        for accessor in _accessors(self.asset_state_store):
            value = await accessor.aget(EMITTED_KEY)
            if isinstance(value, str):
                with contextlib.suppress(ValueError):
                    value = json.loads(value)
            if isinstance(value, list):
                reported.update(str(v) for v in value)
        return reported

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Without a shared-stream manager: the same stream for this watcher alone (advance after yield)."""
        kwargs = self.serialize()[1]
        producer = _producer(kwargs.get("transport"), kwargs)
        key = _stream_key(kwargs)
        group = _group(key)
        group.stores[id(self)] = self.asset_state_store
        group.subscribed.set()
        try:
            async for raw, payload in producer.open_stream():
                if self.criteria.matches(raw["summary"], raw.get("headers")):
                    group.matched.add(mail_stream.match_key(raw["summary"]))
                    yield TriggerEvent({**raw["summary"], "source": SOURCE_MARKER})
                await producer.advance([_Resolved(payload)])
        finally:
            group.stores.pop(id(self), None)
