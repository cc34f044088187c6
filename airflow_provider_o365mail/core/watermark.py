"""Where a watcher remembers what it has already reported: per folder UIDVALIDITY + last UID.

IMAP guarantees that (folder, UIDVALIDITY, UID) never names another message, so "everything
above the last UID" is exactly the new mail, until UIDVALIDITY changes (folder recreated,
mailbox moved): then UIDs mean nothing and the keys (Message-ID and size) of recently reported
messages prevent repeats. They are used for that rescan only: a new message that reuses a
Message-ID in the same folder generation is a new UID, and is reported.

Over Microsoft Graph a folder's watermark is its delta link (:class:`DeltaWatermark`) and the
ids of reported messages. One Variable may hold both kinds (a sensor moved from one transport to
the other): each transport starts from the other's ``updated_at`` time.

Sensors keep watermarks in an Airflow Variable (reachable from workers, the triggerer and the
CLI); the event trigger keeps them in the asset state store (Airflow >= 3.3).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from airflow_provider_o365mail.runtime import VariableBackend, default_variables

SEEN_IDS_KEPT = 2000
#: Open reservations kept per watch (one per task instance whose success was not seen yet).
RESERVATIONS_KEPT = 200
WATERMARK_DESCRIPTION = "airflow-provider-o365mail: IMAP watermark (folder UIDVALIDITY and last UID)"


def seen_key(summary: dict[str, Any]) -> str | None:
    """What identifies a message across a UIDVALIDITY change (its UID does not): Message-ID and size.

    The sender chooses the Message-ID, so it alone would let a different message that reuses one be
    dropped; the key is only consulted after a UIDVALIDITY change, when UIDs mean nothing.
    """
    message_id = summary.get("message_id")
    return f"{message_id}|{summary.get('size')}" if message_id else None


@dataclass
class FolderWatermark:
    uidvalidity: int
    last_uid: int
    seen_keys: list[str] = field(default_factory=list)
    updated_at: float = 0.0

    def advanced(
        self, uidvalidity: int, high_uid: int, seen_keys: Iterable[str | None], now: float | None = None
    ) -> FolderWatermark:
        """Past ``high_uid``; the :func:`seen_key` of reported messages are kept across UIDVALIDITY changes
        (they de-duplicate the rescan after one, and only that)."""
        same_folder = uidvalidity == self.uidvalidity
        seen = [*self.seen_keys, *(m for m in seen_keys if m)]
        return FolderWatermark(
            uidvalidity=uidvalidity,
            last_uid=max(high_uid, self.last_uid) if same_folder else high_uid,
            seen_keys=list(dict.fromkeys(reversed(seen)))[:SEEN_IDS_KEPT][::-1],
            updated_at=time.time() if now is None else now,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> FolderWatermark | None:
        if not isinstance(data, dict) or "uidvalidity" not in data:
            return None
        # Watermarks written before 0.2 kept bare Message-IDs under "seen_message_ids".
        keys = data.get("seen_keys", data.get("seen_message_ids", []))
        return cls(
            uidvalidity=int(data["uidvalidity"]),
            last_uid=int(data["last_uid"]),
            seen_keys=[str(m) for m in keys][-SEEN_IDS_KEPT:],
            updated_at=float(data.get("updated_at", 0.0)),
        )


#: The size part of a :func:`seen_key` that matches any size (a Graph watermark's Message-IDs: Graph
#: does not return a message's size).
ANY_SIZE = "*"
#: Graph ids of reported messages kept per folder (a delta link is re-read until it advances).
SEEN_GRAPH_IDS_KEPT = 5000
DELTA_KIND = "graph-delta"


@dataclass
class DeltaWatermark:
    """Microsoft Graph: how far a folder's delta query got, and what was reported.

    ``delta_link`` is the ``@odata.deltaLink`` of the last round whose changes were all handled
    (``None``: no round yet, or a capped first check: list the folder again). Reading it again
    returns the messages created since, so ``seen_ids`` (Graph ids of reported messages) keeps a
    message from being reported twice when a round is read more than once. ``since`` is the epoch
    second a fresh round starts from (``receivedDateTime ge``) when the link expired.
    """

    folder_id: str
    delta_link: str | None = None
    seen_ids: list[str] = field(default_factory=list)
    since: float = 0.0
    #: When ``delta_link`` was obtained: a link never replaces a newer one.
    obtained_at: float = 0.0
    updated_at: float = 0.0
    #: Internet Message-IDs of the last reported messages: a watch moved to IMAP skips them.
    seen_message_ids: list[str] = field(default_factory=list)

    def advanced(
        self,
        folder_id: str,
        delta_link: str | None,
        obtained_at: float,
        since: float,
        reported: Iterable[str | None],
        now: float | None = None,
        reported_message_ids: Iterable[str | None] = (),
    ) -> DeltaWatermark:
        same_folder = folder_id == self.folder_id
        seen = [*(self.seen_ids if same_folder else []), *(r for r in reported if r)]
        message_ids = [*self.seen_message_ids, *(m for m in reported_message_ids if m)]
        link, at, bound = delta_link, obtained_at, since
        if same_folder and self.delta_link and (delta_link is None or obtained_at < self.obtained_at):
            link, at, bound = self.delta_link, self.obtained_at, max(self.since, since)
        return DeltaWatermark(
            folder_id=folder_id,
            delta_link=link,
            seen_ids=list(dict.fromkeys(reversed(seen)))[:SEEN_GRAPH_IDS_KEPT][::-1],
            seen_message_ids=list(dict.fromkeys(reversed(message_ids)))[:SEEN_IDS_KEPT][::-1],
            since=bound,
            obtained_at=at,
            updated_at=time.time() if now is None else now,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"kind": DELTA_KIND, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Any) -> DeltaWatermark | None:
        if not isinstance(data, dict) or data.get("kind") != DELTA_KIND or not data.get("folder_id"):
            return None
        return cls(
            folder_id=str(data["folder_id"]),
            delta_link=str(data["delta_link"]) if data.get("delta_link") else None,
            seen_ids=[str(m) for m in data.get("seen_ids") or []][-SEEN_GRAPH_IDS_KEPT:],
            seen_message_ids=[str(m) for m in data.get("seen_message_ids") or []][-SEEN_IDS_KEPT:],
            since=float(data.get("since", 0.0)),
            obtained_at=float(data.get("obtained_at", 0.0)),
            updated_at=float(data.get("updated_at", 0.0)),
        )


#: A folder's watermark: IMAP (UIDVALIDITY + last UID) or Graph (delta link).
Watermark = FolderWatermark | DeltaWatermark


def watermark_from_dict(data: Any) -> Watermark | None:
    return FolderWatermark.from_dict(data) or DeltaWatermark.from_dict(data)


@dataclass
class Reservation:
    """Messages one task instance reported whose delivery is not known to be durable yet.

    The sensor returns them (XCom) but applies the post-action and advances the watermark only once
    Airflow recorded that task instance as successful, seen by a later poke of the same watch.
    """

    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    messages: list[dict[str, Any]]
    scanned: dict[str, dict[str, Any]]
    reserved_at: float = 0.0

    @property
    def key(self) -> str:
        return task_key(self.dag_id, self.run_id, self.task_id, self.map_index)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Reservation | None:
        try:
            return cls(
                dag_id=str(data["dag_id"]),
                run_id=str(data["run_id"]),
                task_id=str(data["task_id"]),
                map_index=int(data.get("map_index", -1)),
                messages=list(data.get("messages") or []),
                scanned=dict(data.get("scanned") or {}),
                reserved_at=float(data.get("reserved_at", 0.0)),
            )
        except (KeyError, TypeError, ValueError):
            return None


def task_key(dag_id: str, run_id: str, task_id: str, map_index: int) -> str:
    return f"{dag_id}|{run_id}|{task_id}|{map_index}"


@dataclass
class WatchState:
    """Everything one watch keeps: per-folder watermarks and the open reservations (one Variable, one write)."""

    watermarks: dict[str, Watermark] = field(default_factory=dict)
    reservations: dict[str, Reservation] = field(default_factory=dict)

    def reserve(self, reservation: Reservation) -> None:
        self.reservations[reservation.key] = reservation
        while len(self.reservations) > RESERVATIONS_KEPT:  # oldest first; its messages stay unconfirmed
            del self.reservations[min(self.reservations.values(), key=lambda r: r.reserved_at).key]


class WatermarkStore(Protocol):
    def load(self) -> dict[str, Watermark]: ...
    def load_state(self) -> WatchState: ...
    def save(self, watermarks: dict[str, Watermark]) -> None:
        """Replace the watermarks (open reservations are kept)."""
        state = self.load_state()
        state.watermarks = dict(watermarks)
        self.save_state(state)

    def save_state(self, state: WatchState) -> None: ...


def _decode(raw: str | None) -> WatchState:
    if not raw:
        return WatchState()
    data = json.loads(raw)
    folders = {folder: watermark_from_dict(values) for folder, values in data.get("folders", {}).items()}
    reservations = [Reservation.from_dict(r) for r in (data.get("reservations") or {}).values()]
    return WatchState(
        watermarks={folder: mark for folder, mark in folders.items() if mark is not None},
        reservations={r.key: r for r in reservations if r is not None},
    )


def _encode(state: WatchState) -> str:
    return json.dumps(
        {
            "version": 1,
            "folders": {f: w.to_dict() for f, w in state.watermarks.items()},
            "reservations": {k: r.to_dict() for k, r in state.reservations.items()},
        }
    )


def variable_key(conn_id: str, watch_id: str, mailbox: str | None = None) -> str:
    scope = f"{conn_id}|{mailbox or ''}|{watch_id}"
    digest = hashlib.sha256(scope.encode()).hexdigest()[:16]
    readable = "".join(c if c.isalnum() or c in "._-" else "_" for c in watch_id)[:120]
    return f"o365mail_watermark__{conn_id}__{readable}__{digest}"


class VariableWatermarkStore:
    """Watermarks of one watcher (connection + mailbox + watch id) in one Airflow Variable."""

    def __init__(self, key: str, backend: VariableBackend | None = None) -> None:
        self.key = key
        self._backend = backend

    @property
    def backend(self) -> VariableBackend:
        if self._backend is None:
            self._backend = default_variables()
        return self._backend

    def load(self) -> dict[str, Watermark]:
        return self.load_state().watermarks

    def load_state(self) -> WatchState:
        return _decode(self.backend.get(self.key))

    def save(self, watermarks: dict[str, Watermark]) -> None:
        """Replace the watermarks (open reservations are kept)."""
        state = self.load_state()
        state.watermarks = dict(watermarks)
        self.save_state(state)

    def save_state(self, state: WatchState) -> None:
        self.backend.set(self.key, _encode(state), description=WATERMARK_DESCRIPTION)
