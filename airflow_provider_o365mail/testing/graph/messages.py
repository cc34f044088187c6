"""From a Graph request body to the RFC 5322 message Exchange would submit (no I/O).

Two request formats (user-sendmail.md, user-post-messages.md):

- JSON: a ``message`` resource (``subject``, ``body{contentType, content}``, ``toRecipients``,
  ``ccRecipients``, ``bccRecipients``, ``replyTo``, ``from``, ``internetMessageId``,
  ``internetMessageHeaders``, ``importance``, ``attachments`` of ``#microsoft.graph.fileAttachment``);
- MIME: ``Content-Type: text/plain`` and the whole message base64-encoded; malformed input is
  400 ``ErrorMimeContentInvalidBase64String``.

The result keeps the Message-ID (``internetMessageId`` when given, else one generated) so what the
recipients, Sent Items and a later ``$filter=internetMessageId eq ...`` see is the same message.
Bcc is in the Sent Items copy only, never in the recipients' copies.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.utils
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from typing import Any

from airflow_provider_o365mail.testing.graph import errors

FILE_ATTACHMENT = "#microsoft.graph.fileAttachment"
_ADDRESS = re.compile(
    r"^[^@\s<>(),;:\"\[\]\\]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+$"
)
RECIPIENT_FIELDS = (("toRecipients", "To"), ("ccRecipients", "Cc"), ("bccRecipients", "Bcc"))


@dataclass(frozen=True)
class Attachment:
    name: str
    content_type: str
    data: bytes
    is_inline: bool = False
    content_id: str | None = None


@dataclass
class Composed:
    """A message ready to submit: the MIME (with Bcc), its Message-ID, envelope sender and recipients."""

    message: EmailMessage
    message_id: str
    from_address: str
    recipients: list[str]
    _raw: bytes | None = field(default=None, repr=False)

    def for_sent_items(self) -> bytes:
        if self._raw is None:
            self._raw = self.message.as_bytes(policy=policy.SMTP)
        return self._raw

    def for_recipients(self) -> bytes:
        return without_header(self.for_sent_items(), "Bcc")


def base64_size(raw_bytes: int) -> int:
    """Size of ``raw_bytes`` once base64-encoded in 76-character lines with CRLF (as in MIME)."""
    encoded = -(-raw_bytes // 3) * 4
    return encoded + -(-encoded // 76) * 2


def new_message_id(domain: str) -> str:
    return f"<{uuid.uuid4().hex.upper()}@{domain}>"


def read_json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError):
        raise errors.bad_json() from None
    if not isinstance(value, dict):
        raise errors.bad_json()
    return value


def decode_mime(body: bytes) -> EmailMessage:
    """The base64 request body of a MIME send; anything that is not base64 of a message is refused."""
    compact = b"".join(body.split())
    try:
        raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise errors.invalid_base64() from None
    message = email.message_from_bytes(raw, policy=policy.default)
    if not compact or not message.keys():
        raise errors.invalid_base64()
    return message  # type: ignore[return-value]


def check_address(address: str) -> str:
    address = address.strip()
    if not _ADDRESS.match(address):
        raise errors.invalid_recipient(address)
    return address


def _recipients(message: dict[str, Any], field: str) -> list[tuple[str, str]]:
    items = message.get(field) or []
    if not isinstance(items, list):
        raise errors.invalid_request(f"'{field}' must be a collection of recipients.")
    out = []
    for item in items:
        email_address = item.get("emailAddress") if isinstance(item, dict) else None
        if not isinstance(email_address, dict):
            raise errors.invalid_recipient(str(item))
        address = str(email_address.get("address") or "")
        out.append((str(email_address.get("name") or ""), check_address(address)))
    return out


def _single(message: dict[str, Any], field: str) -> tuple[str, str] | None:
    value = message.get(field)
    if not value:
        return None
    found = _recipients({field: [value]}, field)
    return found[0]


def from_address(message: dict[str, Any]) -> str | None:
    """The ``from`` a JSON message asks for (None: the mailbox itself)."""
    found = _single(message, "from")
    return found[1].lower() if found else None


def json_attachments(message: dict[str, Any]) -> list[Attachment]:
    """Inline ``fileAttachment`` items of a JSON message (``contentBytes`` base64)."""
    items = message.get("attachments") or []
    if not isinstance(items, list):
        raise errors.invalid_request("'attachments' must be a collection.")
    return [parse_attachment(item) for item in items]


def parse_attachment(item: Any) -> Attachment:
    if not isinstance(item, dict):
        raise errors.invalid_request("An attachment must be an object.")
    kind = str(item.get("@odata.type") or "")
    if kind.lower() != FILE_ATTACHMENT.lower():
        if kind.lower() in ("#microsoft.graph.itemattachment", "#microsoft.graph.referenceattachment"):
            raise errors.unsupported(f"{kind} attachments")
        raise errors.invalid_request("An attachment needs '@odata.type': '#microsoft.graph.fileAttachment'.")
    name = str(item.get("name") or "")
    if not name:
        raise errors.invalid_request("A file attachment needs a 'name'.")
    try:
        data = base64.b64decode(str(item.get("contentBytes") or ""), validate=True)
    except (binascii.Error, ValueError):
        raise errors.invalid_request("The attachment's 'contentBytes' is not valid base64.") from None
    return Attachment(
        name=name,
        content_type=str(item.get("contentType") or "application/octet-stream"),
        data=data,
        is_inline=bool(item.get("isInline", False)),
        content_id=item.get("contentId"),
    )


def _format(name: str, address: str) -> str:
    return email.utils.formataddr((name, address)) if name else address


def compose(
    message: dict[str, Any],
    *,
    mailbox: str,
    mailbox_name: str,
    sender: tuple[str, str] | None,
    attachments: list[Attachment],
    id_domain: str,
) -> Composed:
    """The MIME Exchange builds from a JSON ``message`` sent from ``mailbox``.

    :param sender: ``(name, address)`` of the delegate for Send on Behalf (a ``Sender:`` header).
    :param attachments: file attachments (from the JSON and from a draft's uploads).
    """
    recipients = {
        name: _recipients(message, name) for name in ("toRecipients", "ccRecipients", "bccRecipients", "replyTo")
    }
    chosen_from = _single(message, "from") or (mailbox_name, mailbox)
    for header in message.get("internetMessageHeaders") or []:
        name = str(header.get("name", "")) if isinstance(header, dict) else ""
        if not name.lower().startswith("x-"):
            raise errors.invalid_header_name(name)
    out = EmailMessage(policy=policy.SMTP)
    out["From"] = _format(*chosen_from)
    if sender is not None:
        out["Sender"] = _format(*sender)
    for name, header in RECIPIENT_FIELDS:
        if recipients[name]:
            out[header] = ", ".join(_format(n, a) for n, a in recipients[name])
    if recipients["replyTo"]:
        out["Reply-To"] = ", ".join(_format(n, a) for n, a in recipients["replyTo"])
    out["Subject"] = str(message.get("subject") or "")
    out["Date"] = email.utils.formatdate(time.time(), localtime=False)
    message_id = str(message.get("internetMessageId") or "").strip() or new_message_id(id_domain)
    out["Message-ID"] = message_id
    importance = str(message.get("importance") or "").lower()
    if importance in ("low", "high"):
        out["Importance"] = importance
    for header in message.get("internetMessageHeaders") or []:
        out[str(header["name"])] = str(header.get("value", ""))
    body = message.get("body") or {}
    content = str(body.get("content") or "") if isinstance(body, dict) else ""
    if isinstance(body, dict) and str(body.get("contentType", "text")).lower() == "html":
        out.set_content(content, subtype="html")
    else:
        out.set_content(content)
    for attachment in attachments:
        _attach(out, attachment)
    envelope = [a for name, _ in RECIPIENT_FIELDS for _, a in recipients[name]]
    return Composed(out, message_id, chosen_from[1].lower(), envelope)


def _attach(message: EmailMessage, attachment: Attachment) -> None:
    maintype, _, subtype = attachment.content_type.partition("/")
    if not subtype:
        maintype, subtype = "application", "octet-stream"
    message.add_attachment(
        attachment.data,
        maintype=maintype,
        subtype=subtype,
        filename=attachment.name,
        disposition="inline" if attachment.is_inline else "attachment",
        cid=f"<{attachment.content_id}>" if attachment.content_id else None,
    )


def from_mime(
    message: EmailMessage, *, mailbox: str, mailbox_name: str, attachments: list[Attachment], id_domain: str
) -> Composed:
    """A MIME send: recipients from To/Cc/Bcc; From, Date and Message-ID added when missing."""
    envelope = []
    for _, header in RECIPIENT_FIELDS:
        for _, address in email.utils.getaddresses([str(v) for v in message.get_all(header, [])]):
            if address:
                envelope.append(check_address(address))
    if "From" not in message:
        message["From"] = _format(mailbox_name, mailbox)
    if "Date" not in message:
        message["Date"] = email.utils.formatdate(time.time(), localtime=False)
    message_id = str(message.get("Message-ID") or "").strip()
    if not message_id:
        message_id = new_message_id(id_domain)
        message["Message-ID"] = message_id
    for attachment in attachments:
        if not message.is_multipart() or message.get_content_type() != "multipart/mixed":
            message.make_mixed()
        _attach(message, attachment)
    from_header = email.utils.getaddresses([str(message.get("From", ""))])
    sender = (from_header[0][1] if from_header and from_header[0][1] else mailbox).lower()
    rebuilt = email.message_from_bytes(message.as_bytes(policy=policy.SMTP), policy=policy.SMTP)
    return Composed(rebuilt, message_id, sender, envelope)  # type: ignore[arg-type]


def check_recipients(composed: Composed) -> None:
    if not composed.recipients:
        raise errors.no_recipients()


def without_header(raw: bytes, name: str) -> bytes:
    """``raw`` without the top-level header ``name`` (and its continuation lines); the body untouched."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return raw
    lines = raw[: end + 2].split(b"\r\n")[:-1]
    kept: list[bytes] = []
    dropping = False
    wanted = name.lower().encode() + b":"
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = line.lower().startswith(wanted)
        if not dropping:
            kept.append(line)
    return b"\r\n".join(kept) + b"\r\n" + raw[end + 2 :]


def non_delivery_report(
    original: Composed, failures: dict[str, str], *, postmaster: str, to: str, id_domain: str
) -> bytes:
    """What Exchange puts in the sender's INBOX after the 202 when recipients cannot be reached."""
    report = EmailMessage(policy=policy.SMTP)
    report["From"] = email.utils.formataddr(("Microsoft Outlook", postmaster))
    report["To"] = to
    report["Subject"] = f"Undeliverable: {original.message.get('Subject', '')}"
    report["Date"] = email.utils.formatdate(time.time(), localtime=False)
    report["Message-ID"] = new_message_id(id_domain)
    report["Auto-Submitted"] = "auto-replied"
    report["X-MS-Exchange-Message-Is-Ndr"] = ""
    lines = ["Your message couldn't be delivered to these recipients:", ""]
    lines += [f"  {recipient}: {reason}" for recipient, reason in sorted(failures.items())]
    lines += ["", f"Original Message-ID: {original.message_id}"]
    report.set_content("\n".join(lines) + "\n")
    head = original.for_sent_items()
    head = head[: head.find(b"\r\n\r\n") + 2] if b"\r\n\r\n" in head else head
    report.add_attachment(head, maintype="text", subtype="rfc822-headers", filename="headers.txt")
    return report.as_bytes(policy=policy.SMTP)
