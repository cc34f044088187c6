"""Delta query state for messages in a folder: state tokens, kept on disk (message-delta.md).

A round starts from nothing (initial sync: every message is "created") or from a ``$deltatoken``
(the folder's state when that token's round began). The changes against the folder's state now
are worked out once, at the round's start, and handed out page by page: each page has its own
``$skiptoken`` (a retried page URL answers the same page; nothing is lost when an answer is), and
the last page's ``$deltatoken`` holds the state the round started from, so whatever happened
meanwhile shows up in the next round.

Tokens are files under the stand-in's state directory, so they survive a restart of the stand-in.
Outlook keeps tokens in a cache of unpublished size and drops the oldest ones
(delta-query-overview.md, Token duration): the stand-in keeps ``GraphSettings.delta_token_cache``
tokens per mailbox (UNCONFIRMED number) and drops the oldest beyond that. An admin call marks
tokens expired (answered with ``syncStateNotFound``) or reset (410 ``resyncRequired``).
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CHANGE_TYPES = ("created", "updated", "deleted")
EXPIRED = "syncStateNotFound"
RESET = "resyncRequired"


@dataclass
class Token:
    """A ``$skiptoken`` (kind ``skip``: a page of a round) or a ``$deltatoken`` (kind ``delta``)."""

    value: str
    kind: str
    mailbox: str
    folder_guid: str
    uidvalidity: int
    #: The query options of the round's first request ($select, changeType, $filter, $orderby, $top).
    params: dict[str, str]
    #: ``{uid: modseq}``: for ``delta`` the folder's state to compare with; for ``skip`` the state
    #: the round's delta token will hold.
    state: dict[str, int]
    #: ``skip`` only: the changes still to hand out, ``[uid, change, uidvalidity]``.
    pending: list[list[Any]] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    expired: str | None = None


def changes(old: dict[int, int], new: dict[int, int]) -> list[tuple[int, str]]:
    """What happened between two ``{uid: modseq}`` states: created, updated (modseq moved), deleted."""
    out = [(uid, "created") for uid in sorted(set(new) - set(old))]
    out += [(uid, "updated") for uid in sorted(set(new) & set(old)) if new[uid] != old[uid]]
    out += [(uid, "deleted") for uid in sorted(set(old) - set(new))]
    return out


def new_token_value() -> str:
    return secrets.token_urlsafe(24)


class DeltaStore:
    def __init__(self, directory: Path, capacity: int = 5000) -> None:
        self.directory = directory
        self.capacity = capacity
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        self._lock = threading.Lock()
        #: value -> (mailbox, created): what eviction needs without reading every file again.
        self._index = {t.value: (t.mailbox, t.created) for t in self._tokens()}

    def _path(self, value: str) -> Path:
        safe = "".join(c for c in value if c.isalnum() or c in "-_")
        return self.directory / f"{safe[:64]}.json"

    def save(self, token: Token) -> Token:
        path = self._path(token.value)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(token)))
        os.replace(tmp, path)
        with self._lock:
            self._index[token.value] = (token.mailbox, token.created)
            mine = sorted((created, value) for value, (box, created) in self._index.items() if box == token.mailbox)
            for _, value in mine[: max(0, len(mine) - self.capacity)]:
                self._path(value).unlink(missing_ok=True)
                del self._index[value]
        return token

    def load(self, value: str) -> Token | None:
        if not value:
            return None
        try:
            data = json.loads(self._path(value).read_text())
        except (OSError, ValueError):
            return None
        token = Token(**data)
        return token if token.value == value else None

    def _tokens(self) -> list[Token]:
        out = []
        for path in self.directory.glob("*.json"):
            try:
                out.append(Token(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue
        return out

    def expire(self, mailbox: str | None = None, how: str = EXPIRED) -> int:
        """Mark every token (of ``mailbox``) ``syncStateNotFound`` or ``resyncRequired``; how many."""
        if how not in (EXPIRED, RESET):
            raise ValueError(f"how must be {EXPIRED!r} or {RESET!r}")
        count = 0
        with self._lock:
            for token in self._tokens():
                if mailbox is None or token.mailbox == mailbox.lower():
                    token.expired = how
                    self._path(token.value).write_text(json.dumps(asdict(token)))
                    count += 1
        return count

    def count(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for mailbox, _ in self._index.values():
                out[mailbox] = out.get(mailbox, 0) + 1
            return out
