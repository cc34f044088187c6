"""Graph JSON representations of what the stand-in holds: messages, attachments, upload sessions (no I/O)."""

from __future__ import annotations

import base64
import email
import email.utils
import hashlib
import time
from email import policy
from typing import Any

from airflow_provider_o365mail.testing.graph.drafts import Draft, StoredAttachment
from airflow_provider_o365mail.testing.graph.mailstore import StoredMessage
from airflow_provider_o365mail.testing.graph.uploads import UploadSession

GRAPH_ROOT = "https://graph.microsoft.com/v1.0"
#: What a message listing returns without ``$select`` (a subset of Graph's default set: no body).
DEFAULT_SELECT = (
    "id",
    "createdDateTime",
    "receivedDateTime",
    "sentDateTime",
    "hasAttachments",
    "internetMessageId",
    "subject",
    "importance",
    "isRead",
    "isDraft",
    "sender",
    "from",
    "toRecipients",
    "ccRecipients",
    "bccRecipients",
    "replyTo",
)


def iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def iso_precise(timestamp: float) -> str:
    """``2019-09-25T01:09:30.7671707Z``: the 7-digit fractions of upload session timestamps."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{int((timestamp % 1) * 1e7):07d}Z"


def stored_id(mailbox: str, folder: str, guid: str, uid: int) -> str:
    digest = hashlib.sha256(f"{mailbox.lower()}|{folder}|{guid}|{uid}".encode()).digest()[:30]
    return "AAMkAG" + base64.urlsafe_b64encode(digest).decode() + "="


def _addresses(value: str | None) -> list[dict[str, Any]]:
    return (
        [
            {"emailAddress": {"name": name or address, "address": address}}
            for name, address in email.utils.getaddresses([value])
            if address
        ]
        if value
        else []
    )


def _parse_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return parsed.timestamp() if parsed.tzinfo else None


def message_from_headers(
    header: str,
    *,
    message_id: str,
    received: float,
    is_read: bool,
    is_draft: bool,
    context: str,
) -> dict[str, Any]:
    """A Graph message (header properties only) from an RFC 5322 header block."""
    parsed = email.message_from_string(header, policy=policy.default)
    sent = _parse_date(parsed.get("Date"))
    from_ = _addresses(parsed.get("From"))
    sender = _addresses(parsed.get("Sender")) or from_
    return {
        "@odata.context": context,
        "@odata.etag": 'W/"' + base64.b64encode(hashlib.sha256(message_id.encode()).digest()[:18]).decode() + '"',
        "id": message_id,
        "createdDateTime": iso(received),
        "lastModifiedDateTime": iso(received),
        "receivedDateTime": iso(received),
        "sentDateTime": iso(sent) if sent is not None else iso(received),
        "hasAttachments": parsed.get_content_type() == "multipart/mixed",
        "internetMessageId": str(parsed.get("Message-ID", "")).strip(),
        "subject": str(parsed.get("Subject", "")),
        "importance": str(parsed.get("Importance", "normal")).lower(),
        "isRead": is_read,
        "isDraft": is_draft,
        "sender": sender[0] if sender else None,
        "from": from_[0] if from_ else None,
        "toRecipients": _addresses(parsed.get("To")),
        "ccRecipients": _addresses(parsed.get("Cc")),
        "bccRecipients": _addresses(parsed.get("Bcc")),
        "replyTo": _addresses(parsed.get("Reply-To")),
    }


def stored_message(stored: StoredMessage, mailbox: str, message_id: str | None = None) -> dict[str, Any]:
    return message_from_headers(
        stored.header,
        message_id=message_id or stored_id(mailbox, stored.folder, stored.guid, stored.uid),
        received=stored.received,
        is_read="\\Seen" in stored.flags,
        is_draft="\\Draft" in stored.flags or stored.folder == "Drafts",
        context="",
    )


def select(message: dict[str, Any], fields: list[str] | None) -> dict[str, Any]:
    wanted = fields or list(DEFAULT_SELECT)
    out = {"@odata.etag": message["@odata.etag"], "id": message["id"]}
    for name in wanted:
        if name in message:
            out[name] = message[name]
    return out


def draft_message(draft: Draft, header: str, mailbox_oid: str, body: dict[str, Any] | None) -> dict[str, Any]:
    """The 201 answer to ``POST /users/{id}/messages``: the draft as a message resource."""
    message = message_from_headers(
        header,
        message_id=draft.id,
        received=draft.created,
        is_read=True,
        is_draft=True,
        context=f"{GRAPH_ROOT}/$metadata#users('{mailbox_oid}')/messages/$entity",
    )
    message["hasAttachments"] = bool(draft.attachments)
    message["body"] = body or {"contentType": "text", "content": ""}
    message["parentFolderId"] = "drafts"
    message["changeKey"] = message["@odata.etag"][3:-1]
    return message


def attachment(stored: StoredAttachment, mailbox_oid: str, draft_id: str) -> dict[str, Any]:
    return {
        "@odata.context": f"{GRAPH_ROOT}/$metadata#users('{mailbox_oid}')/messages('{draft_id}')/attachments/$entity",
        "@odata.type": "#microsoft.graph.fileAttachment",
        "@odata.mediaContentType": stored.content_type,
        "id": stored.id,
        "lastModifiedDateTime": iso(stored.last_modified),
        "name": stored.name,
        "contentType": stored.content_type,
        "size": stored.size,
        "isInline": stored.is_inline,
        "contentId": stored.content_id,
        "contentLocation": None,
    }


def upload_session_created(session: UploadSession, upload_url: str) -> dict[str, Any]:
    return {
        "@odata.context": f"{GRAPH_ROOT}/$metadata#microsoft.graph.uploadSession",
        "uploadUrl": upload_url,
        "expirationDateTime": iso_precise(session.expires),
        "nextExpectedRanges": ["0-"],
    }


def upload_progress(session: UploadSession, outlook_root: str) -> dict[str, Any]:
    """A chunk's 200: note the PascalCase ``ExpirationDateTime`` of Outlook's own API."""
    return {
        "@odata.context": f"{outlook_root}/$metadata#Users('{session.user_key}')/Messages('{session.draft_id}')"
        "/AttachmentSessions/$entity",
        "ExpirationDateTime": iso_precise(session.expires),
        "nextExpectedRanges": [str(session.received)],
    }
