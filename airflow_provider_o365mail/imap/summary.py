"""Message summaries from IMAP FETCH data (header, BODYSTRUCTURE, size, flags): no I/O.

Summaries are what the sensor pushes to XCom and the event trigger puts in asset events, so they
are plain JSON. Mail is hostile input: every field is decoded defensively and a malformed part
never makes the summary fail (it shows as what could be read).
"""

from __future__ import annotations

import email.utils
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from imapclient.response_types import BodyData

from airflow_provider_o365mail.core.summary import format_address, header_fields, iso, text

#: The first this many bytes of a message's header are read; what lies beyond is not matched or shown.
HEADER_BYTES = 65536
HEADER_ITEM = f"BODY.PEEK[HEADER]<0.{HEADER_BYTES}>"
#: What a summary needs, every item bounded: no response line or literal grows with the message
#: (ENVELOPE would carry a 100 MB Subject whole). BODYSTRUCTURE is fetched apart (see imap/scan.py).
FETCH_ITEMS = ["UID", "RFC822.SIZE", "FLAGS", "INTERNALDATE", HEADER_ITEM]


def _address(item: Any) -> str | None:
    """IMAPClient Address(name, route, mailbox, host) -> ``Name <mailbox@host>``."""
    try:
        name, _route, mailbox, host = (getattr(item, f) for f in ("name", "route", "mailbox", "host"))
    except Exception:
        return None
    if mailbox is None:  # group syntax markers
        return None
    addr = f"{text(mailbox)}@{text(host)}" if host else text(mailbox)
    return format_address(text(name), addr)


def _addresses(items: Any) -> list[str]:
    if not isinstance(items, (list, tuple)):
        return []
    return [a for a in (_address(item) for item in items) if a]


def _params(value: Any) -> dict[str, str]:
    """BODYSTRUCTURE parameter list -> dict, with RFC 2231 (``name*``, ``name*0*``) decoded."""
    if not isinstance(value, (list, tuple)):
        return {}
    raw: dict[str, str] = {}
    items = list(value)
    for key, val in zip(items[0::2], items[1::2], strict=False):
        raw[text(key).lower()] = val.decode("utf-8", "replace") if isinstance(val, bytes) else str(val or "")
    decoded: dict[str, str] = {}
    continued: dict[str, list[tuple[int, bool, str]]] = {}
    for key, val in raw.items():
        base, star, rest = key.partition("*")
        if not star:
            decoded.setdefault(base, text(val))
            continue
        index = rest.rstrip("*")  # name* (encoded), name*0 (plain section), name*0* (encoded section)
        section = int(index) if index.isdigit() else 0
        continued.setdefault(base, []).append((section, rest == "" or rest.endswith("*"), val))
    for base, sections in continued.items():
        sections.sort(key=lambda section: section[0])
        try:
            decoded[base] = text(_join_rfc2231(sections))
        except Exception:
            decoded.setdefault(base, text(sections[0][2]))
    return decoded


def _join_rfc2231(sections: list[tuple[int, bool, str]]) -> str:
    """``filename*0*=utf-8''%C3%A9t; filename*1*=%C3%A9.pdf`` -> ``été.pdf``."""
    charset = "utf-8"
    parts = []
    for number, is_encoded, value in sections:
        if is_encoded:
            if number == 0 and value.count("'") >= 2:
                charset, _language, value = value.split("'", 2)
            parts.append(_percent_decode(email.utils.unquote(value), charset or "utf-8"))
        else:
            parts.append(value)
    return "".join(parts)


def _percent_decode(value: str, charset: str) -> str:
    from urllib.parse import unquote_to_bytes

    try:
        return unquote_to_bytes(value).decode(charset, errors="replace")
    except LookupError:
        return unquote_to_bytes(value).decode("utf-8", errors="replace")


def _disposition(value: Any) -> tuple[str, dict[str, str]]:
    if isinstance(value, (list, tuple)) and value:
        return text(value[0]).lower(), _params(value[1] if len(value) > 1 else None)
    return "", {}


def _is_multipart(body: Any) -> bool:
    return BodyData(body).is_multipart


def iter_parts(body: Any, prefix: str = "") -> Iterator[tuple[str, Sequence[Any]]]:
    """Leaf parts of a BODYSTRUCTURE with their section numbers (``"1"``, ``"2.1"``...)."""
    if not isinstance(body, (list, tuple)) or not body:
        return
    if _is_multipart(body):
        for number, child in enumerate(body[0], start=1):
            yield from iter_parts(child, f"{prefix}.{number}" if prefix else str(number))
        return
    yield (prefix or "1"), body


def _field(part: Sequence[Any], index: int) -> Any:
    return part[index] if len(part) > index else None


def attachments_of(body: Any) -> list[dict[str, Any]]:
    """Attachments (parts with a file name or an ``attachment`` disposition): name, type, size, section."""
    found: list[dict[str, Any]] = []
    try:
        parts = list(iter_parts(body))
    except Exception:
        return found
    for section, part in parts:
        try:
            maintype, subtype = text(_field(part, 0)).lower(), text(_field(part, 1)).lower()
            params = _params(_field(part, 2))
            # Disposition sits after the type-specific fields: text/* has lines, message/rfc822
            # has envelope, body and lines; look for the first (b"attachment"|b"inline", ...) pair.
            disposition, disposition_params = "", {}
            for candidate in part[7:]:
                kind, candidate_params = _disposition(candidate)
                if kind in ("attachment", "inline"):
                    disposition, disposition_params = kind, candidate_params
                    break
            name = disposition_params.get("filename") or params.get("name") or ""
            if not name and disposition != "attachment":
                continue
            size = _field(part, 6)
            found.append(
                {
                    "name": name or f"part-{section}",
                    "content_type": f"{maintype or 'application'}/{subtype or 'octet-stream'}",
                    "size": int(size) if isinstance(size, int) else None,
                    "encoding": text(_field(part, 5)).lower() or None,
                    "section": section,
                    "inline": disposition == "inline",
                }
            )
        except Exception:  # noqa: S112 - a broken part is skipped, the others still count
            continue
    return found


def header_bytes(data: Mapping[bytes, Any]) -> bytes | None:
    """The (partial) header a FETCH returned, whatever key the server's answer used."""
    for key, value in data.items():
        if isinstance(key, bytes) and key.startswith(b"BODY[HEADER") and isinstance(value, bytes):
            return value
    return None


def summarize(folder: str, uidvalidity: int, uid: int, data: Mapping[bytes, Any]) -> dict[str, Any]:
    """One message as JSON: folder, uid, uidvalidity, message_id, from, to, cc, subject, date, size,
    flags, attachments. The fields come from ENVELOPE when the server sent one, else from the header."""
    envelope = data.get(b"ENVELOPE")
    if envelope is not None:

        def env(field: str) -> Any:
            return getattr(envelope, field, None)

        from_list = _addresses(env("from_"))
        fields = {
            "message_id": text(env("message_id")) or None,
            "from": from_list,
            "to": _addresses(env("to")),
            "cc": _addresses(env("cc")),
            "subject": text(env("subject")),
            "date": env("date"),
        }
    else:
        fields = header_fields(header_bytes(data))
    from_list = fields.get("from") or []
    flags = data.get(b"FLAGS") or ()
    size = data.get(b"RFC822.SIZE")
    return {
        "folder": folder,
        "uid": int(uid),
        "uidvalidity": int(uidvalidity),
        "message_id": fields.get("message_id"),
        "from": from_list[0] if from_list else None,
        "to": fields.get("to") or [],
        "cc": fields.get("cc") or [],
        "subject": fields.get("subject") or "",
        "date": iso(fields.get("date")) or iso(data.get(b"INTERNALDATE")),
        "received": iso(data.get(b"INTERNALDATE")),
        "size": int(size) if isinstance(size, int) else None,
        "flags": [text(f) for f in flags] if isinstance(flags, (list, tuple)) else [],
        "attachments": attachments_of(data.get(b"BODYSTRUCTURE")),
    }
