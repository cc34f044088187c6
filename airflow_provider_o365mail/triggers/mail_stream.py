"""What the mail event trigger's producers share, whichever transport reads the folder (no I/O).

Watchers of one shared stream register their asset state stores here (the producer reads and writes
the stream's position in every one of them) and the messages some watcher reported (the producer
applies the post-action to those only, after Airflow stored the events).
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_o365mail.connection import DEFAULT_CONN_ID


@dataclass
class StreamGroup:
    """What the watchers of one stream share in this triggerer process."""

    stores: dict[int, Any] = field(default_factory=dict)  # id(trigger) -> its asset state store accessors
    matched: set[Hashable] = field(default_factory=set)  # match_key() of messages some watcher reported
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)


GROUPS: dict[Hashable, StreamGroup] = {}


def group(key: Hashable) -> StreamGroup:
    return GROUPS.setdefault(key, StreamGroup())


def stream_key(kwargs: Mapping[str, Any]) -> tuple[str, ...]:
    """Watchers with the same key share one stream (the post-action is applied once for all of them)."""
    key = (
        "o365mail-imap",
        str(kwargs.get("conn_id") or DEFAULT_CONN_ID),
        str(kwargs.get("mailbox") or ""),
        str(kwargs.get("folder") or "INBOX"),
        str(kwargs.get("post_action") or ""),
        str(kwargs.get("move_to") or ""),
    )
    transport = kwargs.get("transport")
    return (*key, str(transport)) if transport else key


def match_key(message: Mapping[str, Any]) -> Hashable:
    """A message in a stream: its Graph id over Graph, (UIDVALIDITY, UID) over IMAP (summary or payload)."""
    if message.get("graph_id"):
        return ("graph", str(message["graph_id"]))
    return (message.get("uidvalidity"), message.get("uid"))


def accessors(store: Any) -> list[Any]:
    """Per-asset accessors of a trigger's ``asset_state_store`` (one per watched asset)."""
    if store is None:
        return []
    found = [*getattr(store, "_by_name", {}).values(), *getattr(store, "_by_uri", {}).values()]
    return found or [store]


@dataclass(frozen=True)
class Outcome:
    is_clean: bool = True


@dataclass(frozen=True)
class Resolved:
    """An advance item for a trigger run without the shared-stream manager (``run()``)."""

    broker_payload: dict[str, Any]
    outcome: Outcome = field(default_factory=Outcome)


__all__ = ["GROUPS", "Outcome", "Resolved", "StreamGroup", "accessors", "group", "match_key", "stream_key"]
