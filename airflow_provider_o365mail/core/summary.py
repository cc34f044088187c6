"""Message summaries, the same for every transport: the JSON the sensor pushes to XCom and the event
trigger puts in asset events (no I/O).

A summary has ``message_id``, ``from`` (one address), ``to``, ``cc`` (lists), ``subject``, ``date`` and
``received`` (ISO 8601), ``size``, ``flags`` and ``attachments`` (``name``, ``content_type``, ``size``,
``inline``), plus what locates the message in its transport (IMAP: ``folder``, ``uidvalidity``,
``uid``, an attachment's ``section`` and ``encoding``). Mail is hostile input: every field is decoded
defensively, and a malformed field shows as what could be read instead of failing the summary.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email
import email.header
import email.policy
import email.utils
from typing import Any

#: Longest text field kept (RFC 5322's line limit): a 100 MB Subject is shown cut.
MAX_TEXT = 998


def text(value: Any) -> str:
    """Bytes/str from the server, RFC 2047 decoded, never raising."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    elif not isinstance(value, str):
        value = str(value)
    if "=?" in value:
        with contextlib.suppress(Exception):  # broken encoded words: keep the raw text
            value = str(email.header.make_header(email.header.decode_header(value)))
    return " ".join(value.split())[:MAX_TEXT]


def format_address(display: str, addr: str) -> str:
    """``Name <addr>``, or ``addr`` without a name; never raises (formataddr insists on ASCII addresses)."""
    if not display:
        return addr
    try:
        return email.utils.formataddr((display, addr))
    except (UnicodeError, ValueError):
        return f'"{display}" <{addr}>'


def iso(value: Any) -> str | None:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.isoformat()
    return None


def header_fields(raw: bytes | None) -> dict[str, Any]:
    """From/To/Cc/Subject/Date/Message-ID out of raw header bytes, as ENVELOPE would give them; never raises."""
    if not raw:
        return {}
    try:
        message = email.message_from_bytes(raw, policy=email.policy.compat32)
    except Exception:
        return {}

    def addresses(name: str) -> list[str]:
        try:
            pairs = email.utils.getaddresses([str(v) for v in message.get_all(name) or []])
        except Exception:
            return []
        found = []
        for display, addr in pairs:
            if not addr:
                continue
            found.append(format_address(text(display), addr))
        return found

    date = None
    with contextlib.suppress(Exception):
        date = email.utils.parsedate_to_datetime(str(message.get("Date")))
    return {
        "message_id": text(message.get("Message-ID")) or None,
        "from": addresses("From"),
        "to": addresses("To"),
        "cc": addresses("Cc"),
        "subject": text(message.get("Subject")),
        "date": date,
    }


def headers_of(raw_header: bytes | None) -> dict[str, str]:
    """Lower-case header names to their (unfolded, decoded) values; repeated headers joined."""
    if not raw_header:
        return {}
    try:
        message = email.message_from_bytes(raw_header, policy=email.policy.default)
    except Exception:
        return {}
    headers: dict[str, str] = {}
    for name, value in message.raw_items():
        try:
            value_text = str(email.policy.default.header_fetch_parse(name, value))
        except Exception:
            value_text = str(value)
        key = name.lower()
        headers[key] = f"{headers[key]}, {value_text}" if key in headers else value_text
    return headers
