"""Readable mail criteria, the same for every transport (no I/O).

Each transport compiles them into its own query (IMAP SEARCH: :mod:`..imap.search`) and decides the
rest on the message summary: :meth:`MailCriteria.matches` evaluates every readable condition the way
IMAP SEARCH does (case-insensitive substrings), and :meth:`MailCriteria.attachments_match` what no
server query can express (attachment names).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_o365mail.exceptions import CriteriaError

__all__ = ["POST_ACTIONS", "CriteriaError", "MailCriteria", "as_list"]

POST_ACTIONS = (None, "seen", "flag", "move", "delete")


def _date(value: Any, name: str) -> dt.date | None:
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value[:10])
        except ValueError:
            pass
    raise CriteriaError(f"{name} must be a date, a datetime or an ISO date string (YYYY-MM-DD), got {value!r}.")


def as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(item) for item in value]


@dataclass(frozen=True)
class MailCriteria:
    """What a matching message looks like. All given conditions must hold (AND).

    :param sender: substring of From (e.g. ``"supplier.com"``); a list means any of them (OR).
    :param recipient: substring of To or Cc; a list means any of them.
    :param subject: substring of Subject (case-insensitive on Exchange and Dovecot).
    :param since: received on or after this date.
    :param before: received before this date.
    :param unseen: only messages without the \\Seen flag.
    :param header: ``{"X-Report-Id": "Q3"}``: header contains value (all pairs must match).
    :param has_attachment: only messages with at least one attachment.
    :param attachment_name: glob (``"*.csv"``), case-insensitive; implies has_attachment.
    :param criteria: raw IMAP SEARCH keys appended as-is (the escape hatch; you quote them).
    """

    sender: str | Sequence[str] | None = None
    recipient: str | Sequence[str] | None = None
    subject: str | None = None
    since: dt.date | None = None
    before: dt.date | None = None
    unseen: bool = False
    header: Mapping[str, str] = field(default_factory=dict)
    has_attachment: bool = False
    attachment_name: str | None = None
    criteria: str | Sequence[str] | None = None

    @classmethod
    def build(cls, **values: Any) -> MailCriteria:
        header = values.pop("header", None) or {}
        if not isinstance(header, Mapping):
            raise CriteriaError("header must be a mapping like {'X-Report-Id': 'Q3'}.")
        return cls(
            sender=values.get("sender") or None,
            recipient=values.get("recipient") or None,
            subject=values.get("subject") or None,
            since=_date(values.get("since"), "since"),
            before=_date(values.get("before"), "before"),
            unseen=bool(values.get("unseen")),
            header=dict(header),
            has_attachment=bool(values.get("has_attachment")),
            attachment_name=values.get("attachment_name") or None,
            criteria=values.get("criteria") or None,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (trigger serialisation)."""
        return {
            "sender": self.sender if isinstance(self.sender, (str, type(None))) else list(self.sender),
            "recipient": self.recipient if isinstance(self.recipient, (str, type(None))) else list(self.recipient),
            "subject": self.subject,
            "since": self.since.isoformat() if self.since else None,
            "before": self.before.isoformat() if self.before else None,
            "unseen": self.unseen,
            "header": dict(self.header),
            "has_attachment": self.has_attachment,
            "attachment_name": self.attachment_name,
            "criteria": self.criteria if isinstance(self.criteria, (str, type(None))) else list(self.criteria),
        }

    # ------------------------------------------------------------------ client side
    def matches(self, summary: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> bool:
        """Evaluate the criteria on a summary, with IMAP SEARCH's semantics (case-insensitive substrings).

        For event triggers, where one stream of new messages serves watchers with different criteria.
        ``headers`` (lower-case names) is needed only for ``header`` criteria. Raw ``criteria`` cannot
        be evaluated here.
        """
        if self.criteria:
            raise CriteriaError("Raw IMAP criteria cannot be evaluated on a message stream; use the readable criteria.")
        senders = as_list(self.sender)
        if senders and not any(_contains(summary.get("from"), s) for s in senders):
            return False
        recipients = as_list(self.recipient)
        to_cc = " ".join([*(summary.get("to") or []), *(summary.get("cc") or [])])
        if recipients and not any(_contains(to_cc, r) for r in recipients):
            return False
        if self.subject and not _contains(summary.get("subject"), self.subject):
            return False
        received = _summary_date(summary.get("received") or summary.get("date"))
        if self.since and (received is None or received < self.since):
            return False
        if self.before and (received is None or received >= self.before):
            return False
        if self.unseen and "\\Seen" in (summary.get("flags") or []):
            return False
        for name, value in self.header.items():
            if not _contains((headers or {}).get(name.lower()), value):
                return False
        return self.attachments_match(summary.get("attachments") or [])

    # ------------------------------------------------------------------ after FETCH
    @property
    def needs_bodystructure(self) -> bool:
        return self.has_attachment or bool(self.attachment_name)

    def attachments_match(self, attachments: Sequence[Mapping[str, Any]]) -> bool:
        if self.attachment_name:
            pattern = self.attachment_name.lower()
            return any(fnmatch.fnmatchcase(str(a.get("name") or "").lower(), pattern) for a in attachments)
        if self.has_attachment:
            return bool(attachments)
        return True


def _contains(haystack: Any, needle: str) -> bool:
    return str(needle).casefold() in str(haystack or "").casefold()


def _summary_date(value: Any) -> dt.date | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(str(value)).date()
    except ValueError:
        return None
