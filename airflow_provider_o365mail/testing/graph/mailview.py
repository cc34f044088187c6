"""What Graph shows of a stored MIME message: body, preview, attachments (no I/O).

- ``body``: the HTML part, or the plain text part turned into HTML (Graph's default); with
  ``Prefer: outlook.body-content-type="text"`` the plain text part, or the HTML part stripped of
  its tags (user-list-messages.md, message-get.md).
- ``bodyPreview``: the first 255 characters of the text, white space collapsed (message resource).
- Attachments: every leaf part that is not the body is a ``fileAttachment`` (``isInline`` when its
  disposition is inline); an attached ``message/rfc822`` is an ``itemAttachment`` whose ``/$value``
  is its MIME (attachment-get.md). ``hasAttachments`` is true when a non-inline attachment exists
  (message resource: inline ones do not count).
"""

from __future__ import annotations

import base64
import email
import hashlib
import html
import re
import struct
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from typing import Any

PREVIEW_CHARS = 255
ATTACHMENT_PREFIX = "AAMkAGAT"


@dataclass(frozen=True)
class Part:
    index: int
    name: str
    content_type: str
    is_inline: bool
    content_id: str | None
    is_item: bool
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class MailView:
    html: str | None
    text: str | None
    attachments: tuple[Part, ...]
    headers: tuple[tuple[str, str], ...]

    @property
    def has_attachments(self) -> bool:
        return any(not part.is_inline for part in self.attachments)

    def body(self, content_type: str = "html") -> dict[str, str]:
        if content_type == "text":
            return {"contentType": "text", "content": self.text if self.text is not None else _strip(self.html or "")}
        if self.html is not None:
            return {"contentType": "html", "content": self.html}
        escaped = html.escape(self.text or "").replace("\n", "<br>\r\n")
        return {"contentType": "html", "content": f"<html><body>{escaped}</body></html>"}

    def preview(self) -> str:
        text = self.text if self.text is not None else _strip(self.html or "")
        return " ".join(text.split())[:PREVIEW_CHARS]

    def search_text(self) -> str:
        return self.text if self.text is not None else _strip(self.html or "")


def _strip(markup: str) -> str:
    markup = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", markup)
    markup = re.sub(r"(?i)<br\s*/?>|</p>|</div>", "\n", markup)
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


def parse(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=policy.default)  # type: ignore[return-value]


def view(raw: bytes) -> MailView:
    message = parse(raw)
    html_part = message.get_body(("html",))
    text_part = message.get_body(("plain",))
    bodies = {id(p) for p in (html_part, text_part) if p is not None}
    parts: list[Part] = []
    for part in _leaves(message):
        if id(part) in bodies:
            continue
        is_item = part.get_content_type() == "message/rfc822"
        if is_item:
            inner = part.get_payload()
            inner_message = inner[0] if isinstance(inner, list) and inner else None
            data = inner_message.as_bytes(policy=policy.SMTP) if inner_message is not None else b""
            name = str(inner_message.get("Subject", "")) if inner_message is not None else ""
        else:
            data = part.get_payload(decode=True) or b""
            name = part.get_filename() or ""
        content_id = str(part.get("Content-ID", "")).strip().strip("<>") or None
        parts.append(
            Part(
                index=len(parts),
                name=name or "attachment",
                content_type=part.get_content_type(),
                is_inline=part.get_content_disposition() == "inline",
                content_id=content_id,
                is_item=is_item,
                data=data,
            )
        )
    return MailView(
        html=_content(html_part),
        text=_content(text_part),
        attachments=tuple(parts),
        headers=tuple((k, str(v)) for k, v in message.items()),
    )


def _leaves(message: EmailMessage) -> list[EmailMessage]:
    if message.get_content_type() == "message/rfc822":
        return [message]
    if message.is_multipart():
        out: list[EmailMessage] = []
        for sub in message.iter_parts():
            out.extend(_leaves(sub))  # type: ignore[arg-type]
        return out
    return [message]


def _content(part: EmailMessage | None) -> str | None:
    if part is None:
        return None
    try:
        return str(part.get_content())
    except (LookupError, ValueError):
        payload = part.get_payload(decode=True) or b""
        return payload.decode("utf-8", errors="replace")


def attachment_id(message_id: str, index: int) -> str:
    digest = hashlib.sha256(f"{message_id}|{index}".encode()).digest()[:18]
    return ATTACHMENT_PREFIX + base64.urlsafe_b64encode(digest + struct.pack(">H", index)).decode()


def attachment_json(part: Part, message_id: str, *, with_content: bool, modified: str) -> dict[str, Any]:
    common = {
        "id": attachment_id(message_id, part.index),
        "lastModifiedDateTime": modified,
        "name": part.name,
        "size": part.size,
        "isInline": part.is_inline,
    }
    if part.is_item:
        return {"@odata.type": "#microsoft.graph.itemAttachment", **common, "contentType": None}
    out = {
        "@odata.type": "#microsoft.graph.fileAttachment",
        "@odata.mediaContentType": part.content_type,
        **common,
        "contentType": part.content_type,
        "contentId": part.content_id,
        "contentLocation": None,
    }
    if with_content:
        out["contentBytes"] = base64.b64encode(part.data).decode()
    return out
