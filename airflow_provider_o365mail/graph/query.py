"""Readable mail criteria as a Graph message query, and Graph's message JSON as a summary (no I/O).

Graph's ``$filter`` on messages can express dates, read state and "has attachments" exactly; it has
no substring match on addresses or headers, and ``$search`` (which has) cannot be combined with
``$filter`` or ``$orderby``. So the query asks Graph for what it can decide and returns every other
condition to be decided client-side on the summary (:meth:`..core.criteria.MailCriteria.matches`,
the same case-insensitive substring rules as IMAP SEARCH):

====================  ==========================================  ============
criterion             Graph                                       client-side
====================  ==========================================  ============
since / before        ``receivedDateTime ge`` / ``lt`` (UTC days)
unseen                ``isRead eq false``
has_attachment        ``hasAttachments eq true``
sender, recipient     --                                          substring
subject               --                                          substring
header                ``internetMessageHeaders`` selected         substring
attachment_name       attachments expanded (name only)            glob
criteria (raw IMAP)   refused: it is IMAP syntax
====================  ==========================================  ============

``$orderby`` must name the first ``$filter`` property, so the filter always starts with
``receivedDateTime``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from airflow_provider_o365mail.core.criteria import MailCriteria, as_list
from airflow_provider_o365mail.core.summary import format_address, text
from airflow_provider_o365mail.exceptions import CriteriaError

#: Properties every summary needs.
SUMMARY_FIELDS = (
    "id",
    "internetMessageId",
    "subject",
    "from",
    "toRecipients",
    "ccRecipients",
    "sentDateTime",
    "receivedDateTime",
    "isRead",
    "flag",
    "hasAttachments",
    "parentFolderId",
)
#: The oldest date Graph is asked about when no bound is given (receivedDateTime must lead the filter).
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class GraphQuery:
    """Query parameters for ``GET .../mailFolders/{id}/messages`` and what Graph cannot decide."""

    filter: str
    select: tuple[str, ...]
    expand_attachments: bool
    #: The criteria left for the client (names of :class:`MailCriteria` fields).
    client_side: tuple[str, ...]
    orderby: str = "receivedDateTime asc"

    def params(self, *, top: int = 50) -> dict[str, str]:
        params = {"$filter": self.filter, "$orderby": self.orderby, "$select": ",".join(self.select), "$top": str(top)}
        if self.expand_attachments:
            params["$expand"] = "attachments($select=name,contentType,size,isInline)"
        return params


def odata_string(value: str) -> str:
    """A quoted OData string literal (single quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


def odata_datetime(value: dt.datetime | dt.date) -> str:
    if not isinstance(value, dt.datetime):
        value = dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
    elif value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def compile_query(criteria: MailCriteria, *, received_from: dt.datetime | None = None) -> GraphQuery:
    """The Graph query for ``criteria``; ``received_from`` narrows it to mail received at or after it."""
    if criteria.criteria:
        raise CriteriaError(
            "Raw IMAP SEARCH criteria cannot be sent to Microsoft Graph; use the readable criteria (sender, "
            "recipient, subject, since, before, unseen, header, has_attachment, attachment_name)."
        )
    lower = received_from or EPOCH
    if criteria.since is not None:
        lower = max(lower, dt.datetime(criteria.since.year, criteria.since.month, criteria.since.day, tzinfo=dt.UTC))
    clauses = [f"receivedDateTime ge {odata_datetime(lower)}"]
    if criteria.before is not None:
        clauses.append(f"receivedDateTime lt {odata_datetime(criteria.before)}")
    if criteria.unseen:
        clauses.append("isRead eq false")
    if criteria.has_attachment or criteria.attachment_name:
        clauses.append("hasAttachments eq true")
    client_side = tuple(
        name
        for name, wanted in (
            ("sender", bool(as_list(criteria.sender))),
            ("recipient", bool(as_list(criteria.recipient))),
            ("subject", bool(criteria.subject)),
            ("header", bool(criteria.header)),
            ("attachment_name", bool(criteria.attachment_name)),
        )
        if wanted
    )
    select = SUMMARY_FIELDS + (("internetMessageHeaders",) if criteria.header else ())
    return GraphQuery(
        filter=" and ".join(clauses),
        select=select,
        expand_attachments=bool(criteria.attachment_name),
        client_side=client_side,
    )


def _address(item: Any) -> str | None:
    if not isinstance(item, Mapping):
        return None
    email_address = item.get("emailAddress")
    if not isinstance(email_address, Mapping):
        return None
    address = text(email_address.get("address"))
    if not address:
        return None
    return format_address(text(email_address.get("name")), address)


def _addresses(items: Any) -> list[str]:
    if not isinstance(items, list):
        return []
    return [a for a in (_address(item) for item in items) if a]


def headers_of(message: Mapping[str, Any]) -> dict[str, str]:
    """``internetMessageHeaders`` as ``{lower-case name: value}`` (repeated headers joined)."""
    found: dict[str, list[str]] = {}
    for item in message.get("internetMessageHeaders") or []:
        if isinstance(item, Mapping) and item.get("name"):
            found.setdefault(str(item["name"]).lower(), []).append(text(item.get("value")))
    return {name: " ".join(values) for name, values in found.items()}


def summarize(message: Mapping[str, Any], folder: str) -> dict[str, Any]:
    """A summary (:mod:`..core.summary`) of a Graph message; ``graph_id`` and ``folder`` locate it."""
    flags = []
    if message.get("isRead"):
        flags.append("\\Seen")
    flag = message.get("flag")
    if isinstance(flag, Mapping) and flag.get("flagStatus") == "flagged":
        flags.append("\\Flagged")
    attachments = [
        {
            "name": text(item.get("name")),
            "content_type": text(item.get("contentType")).lower() or "application/octet-stream",
            "size": item.get("size") if isinstance(item.get("size"), int) else None,
            "inline": bool(item.get("isInline")),
            "graph_id": item.get("id"),
        }
        for item in message.get("attachments") or []
        if isinstance(item, Mapping)
    ]
    return {
        "message_id": text(message.get("internetMessageId")) or None,
        "from": _address(message.get("from")),
        "to": _addresses(message.get("toRecipients")),
        "cc": _addresses(message.get("ccRecipients")),
        "subject": text(message.get("subject")),
        "date": message.get("sentDateTime"),
        "received": message.get("receivedDateTime"),
        "size": None,
        "flags": flags,
        "attachments": attachments,
        "folder": folder,
        "graph_id": message.get("id"),
    }


def matches(criteria: MailCriteria, message: Mapping[str, Any], summary: Mapping[str, Any]) -> bool:
    """The client-side half of the criteria (Graph decided the rest; deciding it again is harmless)."""
    return criteria.matches(summary, headers_of(message))


__all__ = [
    "EPOCH",
    "SUMMARY_FIELDS",
    "GraphQuery",
    "compile_query",
    "headers_of",
    "matches",
    "odata_string",
    "summarize",
]
