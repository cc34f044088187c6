"""Folder names as users write them (IMAP paths such as ``INBOX`` or ``Invoices/2026``) -> Graph folder ids.

Exchange's IMAP shows a mailbox's folders as ``/``-separated paths from the top of the information
store, with ``INBOX`` for the Inbox; Graph names folders by id, by well-known name (``inbox``,
``sentitems``...) and by ``displayName`` among a parent's ``childFolders``. The same names work for
both transports, so a sensor moved from IMAP to Graph watches the same folder.

Ids are kept per process (a folder id does not change when the folder is renamed or moved); a stale
id is dropped by the caller when Graph answers ``ErrorItemNotFound``.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Any

from airflow_provider_o365mail.exceptions import GraphRequestRefused

#: IMAP names of Exchange's default folders -> Graph's well-known folder names.
WELL_KNOWN = {
    "inbox": "inbox",
    "sent items": "sentitems",
    "sent": "sentitems",
    "drafts": "drafts",
    "deleted items": "deleteditems",
    "trash": "deleteditems",
    "junk email": "junkemail",
    "junk": "junkemail",
    "archive": "archive",
    "outbox": "outbox",
}
SEPARATOR = "/"

_CACHE: dict[tuple[Hashable, str], str] = {}
_LOCK = threading.Lock()


def split_path(folder: str) -> list[str]:
    parts = [p for p in folder.strip().strip(SEPARATOR).split(SEPARATOR) if p]
    if not parts:
        raise GraphRequestRefused(f"{folder!r} is not a folder name.", status=400, code="InvalidFolderName")
    return parts


def resolve(client: Any, who: str, folder: str, *, key: Hashable) -> str:
    """The Graph id of ``folder`` in the mailbox (``who``: ``me`` or ``users/{address}``).

    :param key: names the connection and mailbox for the per-process cache.
    :raises GraphRequestRefused: a part of the path does not exist (``ErrorItemNotFound``; names the path).
    """
    cached = _CACHE.get((key, folder))
    if cached is not None:
        return cached
    parts = split_path(folder)
    first = WELL_KNOWN.get(parts[0].lower())
    if first is not None:
        doing = f"opening folder {parts[0]!r}"
        answer = client.request("GET", f"{who}/mailFolders/{first}", doing=doing, params={"$select": "id"})
        parent_id, start = str(answer.json()["id"]), 1
    else:
        parent_id, start = None, 0
    for index in range(start, len(parts)):
        parent_id = _child(client, who, parent_id, parts[index], SEPARATOR.join(parts[: index + 1]))
    assert parent_id is not None
    with _LOCK:
        _CACHE[(key, folder)] = parent_id
    return parent_id


def forget(key: Hashable, folder: str) -> None:
    """Drop a cached id (Graph said the folder is gone)."""
    with _LOCK:
        _CACHE.pop((key, folder), None)


def _child(client: Any, who: str, parent_id: str | None, name: str, path: str) -> str:
    base = f"{who}/mailFolders/{parent_id}/childFolders" if parent_id else f"{who}/mailFolders"
    url: str | None = base
    params: dict[str, str] | None = {"$select": "id,displayName", "$top": "100"}
    wanted = name.casefold()
    while url:
        answer = client.request("GET", url, doing=f"looking up folder {path!r}", params=params).json()
        for item in answer.get("value") or []:
            if str(item.get("displayName", "")).casefold() == wanted:
                return str(item["id"])
        url, params = answer.get("@odata.nextLink"), None
    raise GraphRequestRefused(
        f"The folder {path!r} does not exist in this mailbox (Microsoft Graph lists no folder {name!r} there). "
        "Check the name (folders are '/'-separated paths such as 'Inbox/Invoices'; 'INBOX' is the Inbox).",
        status=404,
        code="ErrorItemNotFound",
    )


__all__ = ["WELL_KNOWN", "forget", "resolve", "split_path"]
