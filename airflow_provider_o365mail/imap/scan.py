"""The one "new messages since a watermark" routine, shared by the sensor's check and the event stream.

IMAP guarantees that (folder, UIDVALIDITY, UID) never names another message, so with a watermark
of the same UIDVALIDITY "new" is ``UID last+1:*``; a cheap ``STATUS (UIDNEXT UIDVALIDITY)`` answers
"nothing new" without selecting the folder. When UIDVALIDITY changed (folder recreated, mailbox
moved) UIDs mean nothing: the folder is searched since a day before the watermark was written, and
messages whose key (Message-ID and size) the watermark remembers are skipped; at no other time, so a
message that reuses a Message-ID is never dropped. Without a watermark, either every
matching message is new (the sensor) or none is and the scan only says where "now" is (a stream's
first start).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import imaplib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_o365mail import hints
from airflow_provider_o365mail.core.watermark import ANY_SIZE, FolderWatermark, seen_key
from airflow_provider_o365mail.exceptions import MailServerError
from airflow_provider_o365mail.imap.summary import FETCH_ITEMS, summarize

log = logging.getLogger(__name__)

#: UIDs per FETCH of the bounded summary items.
FETCH_CHUNK = 200
#: UIDs per FETCH of BODYSTRUCTURE: its size grows with a message's parts (10,000 parts give a
#: response line over imaplib's 1 MB limit), so a poisoned group costs one reconnect and a split.
STRUCTURE_GROUP = 20

#: No literal inside a BODYSTRUCTURE answer may be larger (imaplib would hold it whole: a part's
#: 100 MB file name is sent as one literal). Lines are bounded by imaplib itself (1 MB).
MAX_LITERAL_BYTES = 1024 * 1024

#: Opens a logged-in IMAPClient (a context manager that logs it out).
ClientFactory = Callable[[], contextlib.AbstractContextManager[Any]]


class ConnectionBroken(Exception):
    """Why a session's client is closed by :meth:`ImapSession.reopen` (never raised to callers)."""


class ImapSession:
    """A logged-in IMAPClient that is replaced when a response broke the connection.

    ``with ImapSession(open_client) as session: session.client...``; :meth:`reopen` logs the old
    client out (or drops it) and opens a new one.
    """

    def __init__(self, open_client: ClientFactory) -> None:
        self._open = open_client
        self._stack = contextlib.ExitStack()
        self.client: Any = None
        self.reopened = 0

    def __enter__(self) -> ImapSession:
        self.client = self._stack.enter_context(self._open())
        return self

    def __exit__(self, *exc_info: Any) -> None:
        # The error (if any) goes to the client's context manager: a pooled client is then dropped.
        self._stack.__exit__(*exc_info)

    def reopen(self) -> Any:
        # Closed *with* an error: a pooled client (see :mod:`.pool`) is then dropped, not reused.
        broken = ConnectionBroken("a response broke the IMAP connection")
        with contextlib.suppress(Exception):
            self._stack.__exit__(ConnectionBroken, broken, None)
        self._stack = contextlib.ExitStack()
        self.client = self._stack.enter_context(self._open())
        self.reopened += 1
        return self.client


@dataclass(frozen=True)
class ScannedMessage:
    """A new message: its defensive summary and the raw FETCH items (for callers that asked for more)."""

    summary: dict[str, Any]
    data: dict[bytes, Any] = field(repr=False)


@dataclass
class FolderScan:
    """What one scan found in one folder, and how far it got."""

    folder: str
    uidvalidity: int
    uidnext: int
    #: Everything up to this UID was looked at (the watermark may advance to it).
    high_uid: int
    messages: list[ScannedMessage] = field(default_factory=list)

    def progress(self) -> dict[str, int]:
        return {"uidvalidity": self.uidvalidity, "high_uid": self.high_uid, "uidnext": self.uidnext}


def _has_selected(client: Any) -> bool:
    return getattr(getattr(client, "_imap", None), "state", None) == "SELECTED"


def select(client: Any, folder: str, *, readonly: bool) -> dict[bytes, Any]:
    """``SELECT``/``EXAMINE`` with an error that names the folder and the likely fix."""
    try:
        return client.select_folder(folder, readonly=readonly)
    except (OSError, imaplib.IMAP4.abort):  # the connection broke (a dead peer), not the folder: said as such
        raise
    except Exception as err:
        raise MailServerError(f"Cannot open folder {folder!r}: {err}. {hints.FOLDER_NAME}") from None


def scan_folder(
    session: ImapSession,
    folder: str,
    mark: FolderWatermark | None,
    *,
    search_keys: Sequence[Any] = (b"ALL",),
    charset: str | None = None,
    fetch_items: Sequence[str] = FETCH_ITEMS,
    from_now_on: bool = False,
) -> FolderScan:
    """Messages of ``folder`` matching ``search_keys`` that ``mark`` has not covered, oldest first.

    :param session: a logged-in IMAP session (nothing on the server changes).
    :param mark: the watermark; ``None``: everything matching is new, unless ``from_now_on``.
    :param from_now_on: without a watermark, report nothing and return where "now" is.

    A message whose BODYSTRUCTURE cannot be fetched or parsed (a response too large, nesting too
    deep) is summarised from its header with ``"unparsed": True`` and no attachments; it never hides
    the other messages.
    """
    client = session.client
    # STATUS answers for the selected mailbox of a reused session can be stale (RFC 3501 6.3.10: it
    # "MUST NOT" be used to check the selected mailbox), so such a session SELECTs instead.
    if mark is not None and not _has_selected(client):
        status = client.folder_status(folder, [b"UIDNEXT", b"UIDVALIDITY"])
        uidnext = int(status[b"UIDNEXT"])
        if int(status[b"UIDVALIDITY"]) == mark.uidvalidity and uidnext - 1 <= mark.last_uid:
            return FolderScan(folder, mark.uidvalidity, uidnext, mark.last_uid)
    selected = select(client, folder, readonly=True)
    uidvalidity = int(selected[b"UIDVALIDITY"])
    uidnext = int(selected.get(b"UIDNEXT", 0) or 0)
    if mark is None and from_now_on:
        return FolderScan(folder, uidvalidity, uidnext, max(0, uidnext - 1))
    keys = list(search_keys)
    criteria = [] if keys == [b"ALL"] else keys
    floor_uid = 0
    if mark is not None and mark.uidvalidity == uidvalidity:
        floor_uid = mark.last_uid
        keys = [b"UID", f"{floor_uid + 1}:*".encode(), *criteria]
    elif mark is not None:
        since = dt.date.fromtimestamp(mark.updated_at or 0) - dt.timedelta(days=1)
        log.warning(
            "UIDVALIDITY of %s changed (%s -> %s): the folder was recreated or moved; rescanning since %s and "
            "skipping messages already reported (by Message-ID).",
            folder,
            mark.uidvalidity,
            uidvalidity,
            since,
        )
        if mark.updated_at:
            keys = [*criteria, b"SINCE", since]
    uids = sorted(uid for uid in client.search(keys, charset) if uid > floor_uid)
    scan = FolderScan(folder, uidvalidity, uidnext, max([uidnext - 1, floor_uid, *uids[-1:]]))
    # After a UIDVALIDITY change (only then) the rescan meets messages already reported.
    rescan_skips = set(mark.seen_keys) if mark is not None and mark.uidvalidity != uidvalidity else set()
    for start in range(0, len(uids), FETCH_CHUNK):
        chunk = uids[start : start + FETCH_CHUNK]
        fetched = session.client.fetch(chunk, list(fetch_items))
        present = [uid for uid in chunk if uid in fetched]  # the others were expunged meanwhile
        structures = _structures(session, folder, present)
        for uid in present:
            data = {**fetched[uid], **structures.get(uid, {})}
            summary = summarize(folder, uidvalidity, uid, data)
            if uid not in structures:
                summary["unparsed"] = True
            if rescan_skips and (
                seen_key(summary) in rescan_skips or f"{summary.get('message_id')}|{ANY_SIZE}" in rescan_skips
            ):
                continue
            scan.messages.append(ScannedMessage(summary, data))
    return scan


class ResponseTooLarge(Exception):
    """A literal in a server answer is larger than the client agreed to hold."""


@contextlib.contextmanager
def bounded_literals(client: Any, limit: int) -> Iterator[None]:
    """Refuse literals over ``limit`` bytes while the block runs (the connection is then unusable:
    callers open a fresh one)."""
    imap = getattr(client, "_imap", None)
    read = getattr(imap, "read", None)
    if read is None:
        yield
        return

    def bounded_read(size: int) -> bytes:
        if size > limit:
            raise ResponseTooLarge(f"the server sent a {size:,}-byte literal; at most {limit:,} are read")
        return read(size)

    imap.read = bounded_read
    try:
        yield
    finally:
        del imap.read  # back to the class's method


def _structures(session: ImapSession, folder: str, uids: list[int]) -> dict[int, dict[bytes, Any]]:
    """BODYSTRUCTURE of ``uids`` in small groups; a group that fails is split down to the message at fault."""
    found: dict[int, dict[bytes, Any]] = {}
    pending = [uids[i : i + STRUCTURE_GROUP] for i in range(0, len(uids), STRUCTURE_GROUP)]
    while pending:
        group = pending.pop(0)
        try:
            with bounded_literals(session.client, MAX_LITERAL_BYTES):
                fetched = session.client.fetch(group, ["BODYSTRUCTURE"])
            found.update({uid: {b"BODYSTRUCTURE": data.get(b"BODYSTRUCTURE")} for uid, data in fetched.items()})
        except (RecursionError, MemoryError, ValueError, Exception) as err:
            # imaplib refuses response lines over 1 MB and leaves the connection out of step; the
            # parser recurses per nesting level. Either way: a fresh connection, then a smaller group.
            session.reopen()
            select(session.client, folder, readonly=True)
            if len(group) == 1:
                log.warning(
                    "%s UID %s: its structure cannot be read (%s: %s); reporting it from its header alone "
                    "(unparsed, no attachments).",
                    folder,
                    group[0],
                    type(err).__name__,
                    str(err)[:200],
                )
                continue
            half = len(group) // 2
            pending[:0] = [group[:half], group[half:]]
    return found
