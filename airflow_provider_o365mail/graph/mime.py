"""A composed message in the shapes Graph takes (no I/O but reading attachment files).

- Small mail: the whole MIME, base64-encoded, as the ``sendMail`` body (``Content-Type: text/plain``).
  Graph takes the recipients from To, Cc and Bcc, so the Bcc recipients (absent from an SMTP message's
  headers) are written into a Bcc header; Exchange removes it from the recipients' copies.
- Mail over Graph's 4 MB request limit: a draft from the MIME without its attachments, and each
  attachment added to the draft afterwards (small ones inline in one request, large ones through an
  upload session in chunks read from their file).

The message's own headers (Message-ID, From, Reply-To, custom headers) and inline images stay in
the MIME either way.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import getaddresses
from pathlib import Path
from typing import TYPE_CHECKING

from airflow_provider_o365mail.core.compose import MESSAGE_POLICY

if TYPE_CHECKING:
    from airflow_provider_o365mail.core.compose import OutgoingMessage

MiB = 1024 * 1024


def base64_length(size: int) -> int:
    return (size + 2) // 3 * 4


@dataclass(frozen=True)
class DetachedAttachment:
    """A file attachment taken out of the MIME, to be added to a draft: from its file or from memory."""

    name: str
    content_type: str
    size: int
    path: Path | None = None
    data: bytes | None = None

    def read(self) -> bytes:
        """All of it (only for attachments small enough for one request)."""
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()

    def chunks(self, chunk_size: int, start: int = 0) -> Iterator[tuple[int, bytes]]:
        """``(offset, bytes)`` from ``start``, ``chunk_size`` at a time; a file is read as it goes."""
        if self.data is not None:
            for offset in range(start, self.size, chunk_size):
                yield offset, self.data[offset : offset + chunk_size]
            return
        assert self.path is not None
        with self.path.open("rb") as handle:
            handle.seek(start)
            offset = start
            while piece := handle.read(chunk_size):
                yield offset, piece
                offset += len(piece)


@contextlib.contextmanager
def graph_recipient_headers(message: OutgoingMessage, pending: Sequence[str]) -> Iterator[EmailMessage]:
    """The message's MIME tree with To/Cc/Bcc as Graph must see them to deliver to ``pending`` only.

    Every recipient pending: To and Cc as composed, and a Bcc header with the envelope recipients that
    are in neither. Some recipients already served by an earlier try: To and Cc keep only pending
    ones, and the other pending ones go to Bcc (no recipient gets the message twice). The headers are
    put back on exit.
    """
    msg = message.message
    saved = {name: msg.get_all(name) for name in ("To", "Cc", "Bcc")}
    wanted = list(dict.fromkeys(pending))
    wanted_lower = {address.lower() for address in wanted}
    partial = len(wanted_lower) < len({r.lower() for r in message.recipients})
    try:
        if partial:
            for name in ("To", "Cc"):
                pairs = [pair for pair in getaddresses([str(v) for v in saved[name] or ()]) if pair[1]]
                kept = [_format(display, address) for display, address in pairs if address.lower() in wanted_lower]
                del msg[name]
                if kept:
                    msg[name] = ", ".join(kept)
        del msg["Bcc"]
        shown = _header_addresses(msg)
        hidden = [address for address in wanted if address.lower() not in shown]
        if hidden:
            msg["Bcc"] = ", ".join(hidden)
        yield msg
    finally:
        for name, values in saved.items():
            del msg[name]
            for value in values or ():
                msg[name] = value


def _header_addresses(msg: EmailMessage) -> set[str]:
    values = [str(v) for name in ("To", "Cc") for v in (msg.get_all(name) or ())]
    return {address.lower() for _, address in getaddresses(values) if address}


def _format(display: str, address: str) -> str:
    return str(Address(display_name=display, addr_spec=address)) if display else address


def mime_body(message: OutgoingMessage, pending: Sequence[str]) -> bytes:
    """The base64 MIME a ``sendMail`` takes (call only when :func:`fits` said it fits)."""
    with graph_recipient_headers(message, pending):
        return base64.b64encode(message.as_bytes())


def estimated_mime_body_size(message: OutgoingMessage) -> int:
    """The base64 body's size for a ``sendMail`` of the whole message (a Bcc header allowance included)."""
    bcc_allowance = sum(len(r) + 2 for r in message.recipients) + 8
    return base64_length(message.size() + bcc_allowance)


def draft_without_attachments(
    message: OutgoingMessage, pending: Sequence[str]
) -> tuple[bytes, list[DetachedAttachment]]:
    """The base64 MIME of the message without its file attachments, and those attachments.

    Inline images stay in the MIME (they belong to the HTML body). A streamed attachment is
    represented by its file; the others by their decoded bytes.
    """
    msg = message.message
    if not msg.is_multipart():
        return mime_body(message, pending), []
    streamed = {part.marker: part for part in message.streamed}
    parts = list(msg.get_payload())
    kept: list[EmailMessage] = []
    detached: list[DetachedAttachment] = []
    for part in parts:
        if part.get_content_disposition() != "attachment":
            kept.append(part)
            continue
        name = part.get_filename() or "attachment"
        raw = part.get_payload()
        marker = raw.strip().encode("ascii", "replace") if isinstance(raw, str) else b""
        source = streamed.get(marker)
        if source is not None:
            detached.append(DetachedAttachment(name, part.get_content_type(), source.size, path=source.path))
        else:
            data = part.get_payload(decode=True) or b""
            detached.append(DetachedAttachment(name, part.get_content_type(), len(data), data=data))
    msg.set_payload(kept)
    try:
        with graph_recipient_headers(message, pending):
            skeleton = msg.as_bytes(policy=MESSAGE_POLICY)
    finally:
        msg.set_payload(parts)
    return base64.b64encode(skeleton), detached


__all__ = [
    "DetachedAttachment",
    "base64_length",
    "draft_without_attachments",
    "estimated_mime_body_size",
    "graph_recipient_headers",
    "mime_body",
]
