"""Build outgoing MIME messages (no I/O besides reading attachment files).

``compose_message`` turns the operator's fields into an :class:`OutgoingMessage`: the
``EmailMessage`` (RFC 5322 with RFC 2047 names/subjects, RFC 2231 file names, CRLF line ends), the
envelope sender and every recipient (To, Cc and Bcc; Bcc never appears in a header).

``plan_message`` checks the same fields (addresses, headers, readable files) without building
anything: a batch is checked completely before its first message is sent, then each message is
built just before it is sent, so memory holds one message at a time whatever the batch size.
"""

from __future__ import annotations

import base64
import functools
import mimetypes
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import EmailPolicy
from email.utils import formatdate, make_msgid
from pathlib import Path, PurePath
from typing import Any

from airflow_provider_o365mail.core.addresses import (
    AddressInput,
    check_header_name,
    check_header_value,
    parse_address,
    parse_addresses,
)
from airflow_provider_o365mail.core.message_ids import normalize_message_id
from airflow_provider_o365mail.exceptions import MessageCompositionError


@functools.lru_cache(maxsize=4096)
def _parsed_header(name: str, value: str) -> Any:
    return policy.SMTP.header_factory(name, value)


class _BatchPolicy(EmailPolicy):
    """Headers repeat across a batch (From, To, Content-Type...): parse each distinct value once.

    Parsing headers is most of the cost of building a small message; parsed headers are immutable
    strings, so sharing them between messages is safe.
    """

    def header_store_parse(self, name: str, value: Any) -> tuple[str, Any]:
        if isinstance(value, str) and not hasattr(value, "name") and len(value) <= 998:
            return name, _parsed_header(name, value)
        return super().header_store_parse(name, value)


# 7bit transfer encodings only (quoted-printable/base64 bodies): no dependency on 8BITMIME and no
# line longer than 78 characters whatever the HTML looks like. CRLF line ends, as SMTP wants.
MESSAGE_POLICY = _BatchPolicy(linesep="\r\n", cte_type="7bit")

# Headers the composer owns; custom_headers may not override them.
_RESERVED_HEADERS = {
    "from",
    "to",
    "cc",
    "bcc",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
}

FileInput = str | os.PathLike | Any  # path, or an object with ``name`` and ``read_bytes()`` (ObjectStoragePath)

#: Local attachment files larger than this are not read into memory: the message holds a marker
#: and the file is base64-encoded chunk by chunk while it is sent.
STREAM_THRESHOLD = 1024 * 1024
_B64_LINE = 57  # input bytes per 76-character base64 line
_STREAM_CHUNK = _B64_LINE * 1024


@dataclass(frozen=True)
class StreamedFile:
    """An attachment body sent from its file: ``marker`` (one base64 line) stands for it in the MIME tree."""

    marker: bytes
    path: Path
    size: int

    def encoded_size(self) -> int:
        full, rest = divmod(self.size, _B64_LINE)
        return full * 78 + ((rest + 2) // 3 * 4 + 2 if rest else 0)

    def encoded_chunks(self) -> Iterator[bytes]:
        """The file as 76-character base64 lines with CRLF, about 58 kB at a time."""
        with self.path.open("rb") as handle:
            while chunk := handle.read(_STREAM_CHUNK):
                text = base64.b64encode(chunk)
                yield b"".join(text[i : i + 76] + b"\r\n" for i in range(0, len(text), 76))


@dataclass(frozen=True)
class OutgoingMessage:
    """A message ready for SMTP: MIME content plus envelope.

    Large local attachments are in ``streamed``: :meth:`chunks` reads them while sending, so
    sending a 50 MB file does not hold 50 MB (or its 67 MB of base64) in memory.
    """

    message: EmailMessage = field(repr=False)
    envelope_from: str
    recipients: tuple[str, ...]
    message_id: str
    streamed: tuple[StreamedFile, ...] = field(default=(), repr=False)

    def chunks(self) -> Iterator[bytes]:
        """The message's bytes in pieces that each start at a line start (for dot-stuffing)."""
        skeleton = self.message.as_bytes(policy=MESSAGE_POLICY)
        for part in self.streamed:
            before, found, skeleton = skeleton.partition(part.marker + b"\r\n")
            if not found:  # cannot happen: the marker is in the tree we built
                raise MessageCompositionError(f"Attachment {part.path.name!r} lost its place in the message.")
            yield before
            yield from part.encoded_chunks()
        yield skeleton

    def size(self) -> int:
        skeleton = len(self.message.as_bytes(policy=MESSAGE_POLICY))
        return skeleton + sum(p.encoded_size() - len(p.marker) - 2 for p in self.streamed)

    def as_bytes(self) -> bytes:
        if not self.streamed:
            return self.message.as_bytes(policy=MESSAGE_POLICY)
        return b"".join(self.chunks())


@dataclass(frozen=True)
class PlannedMessage:
    """A checked message not built yet: its Message-ID and envelope are known; ``build()`` reads the
    attachments and builds the MIME content (call it just before sending)."""

    message_id: str
    envelope_from: str
    recipients: tuple[str, ...]
    build: Callable[[], OutgoingMessage] = field(repr=False, compare=False)


def _address_list(addresses: list[Address]) -> str:
    return ", ".join(str(address) for address in addresses)


def _as_text(value: Any) -> str:
    return "" if value is None else str(value)


def _read_file(item: FileInput, *, what: str) -> tuple[str, bytes]:
    if hasattr(item, "read_bytes") and not isinstance(item, PurePath):
        name = PurePath(str(getattr(item, "name", "") or getattr(item, "path", "attachment"))).name
        return name or "attachment", item.read_bytes()
    path = Path(os.fspath(item))
    try:
        return path.name, path.read_bytes()
    except OSError as err:
        raise MessageCompositionError(f"Cannot read {what} {str(path)!r}: {err.strerror or err}.") from None


def _mime_type(name: str) -> tuple[str, str]:
    guessed, encoding = mimetypes.guess_type(name, strict=False)
    if not guessed or encoding:  # .gz etc. are binary payloads, not "text/plain with gzip encoding"
        guessed = "application/gzip" if encoding == "gzip" else "application/octet-stream"
    maintype, _, subtype = guessed.partition("/")
    return maintype, subtype


def _safe_attachment_name(name: str) -> str:
    check_header_value("attachment file name", name)
    return name


def compose_message(
    *,
    sender: str,
    to: AddressInput,
    subject: str | None = None,
    html_content: str | None = None,
    text_content: str | None = None,
    cc: AddressInput = None,
    bcc: AddressInput = None,
    reply_to: AddressInput = None,
    files: Iterable[FileInput] | None = None,
    inline_images: Mapping[str, FileInput] | None = None,
    custom_headers: Mapping[str, Any] | None = None,
    mime_charset: str = "utf-8",
    message_id: str | None = None,
) -> OutgoingMessage:
    """Build a message.

    :param sender: the From address (``a@x`` or ``Name <a@x>``); also the envelope sender.
    :param message_id: the Message-ID (``<id@domain>``); default a random one under the sender's domain.
    :param html_content: HTML body; with ``text_content`` the message is multipart/alternative.
    :param inline_images: ``{content_id: file}``; reference them in HTML as ``<img src="cid:content_id">``.
    :param files: attachments (paths or ObjectStoragePath-like objects).
    """
    from_address = parse_address(sender, field="from_email")
    to_addresses = parse_addresses(to, field="to")
    cc_addresses = parse_addresses(cc, field="cc")
    bcc_addresses = parse_addresses(bcc, field="bcc")
    if not (to_addresses or cc_addresses or bcc_addresses):
        raise MessageCompositionError("The message has no recipient: set to, cc or bcc.")
    subject_text = check_header_value("Subject", _as_text(subject))
    if inline_images and html_content is None:
        raise MessageCompositionError("inline_images need html_content that references them as cid:<name>.")

    msg = EmailMessage(policy=MESSAGE_POLICY)
    msg["From"] = str(from_address)
    if to_addresses:
        msg["To"] = _address_list(to_addresses)
    if cc_addresses:
        msg["Cc"] = _address_list(cc_addresses)
    reply_to_addresses = parse_addresses(reply_to, field="reply_to")
    if reply_to_addresses:
        msg["Reply-To"] = _address_list(reply_to_addresses)
    msg["Subject"] = subject_text
    msg["Date"] = formatdate(usegmt=True)
    message_id = normalize_message_id(message_id) if message_id else make_msgid(domain=from_address.domain)
    msg["Message-ID"] = message_id
    for name, value in (custom_headers or {}).items():
        check_header_name(name)
        if name.lower() in _RESERVED_HEADERS:
            raise MessageCompositionError(f"custom_headers may not set {name}; use the operator's own argument.")
        msg[name] = check_header_value(name, _as_text(value))

    text = None if text_content is None else _as_text(text_content)
    html = None if html_content is None else _as_text(html_content)
    if text is not None:
        msg.set_content(text, charset=mime_charset)
        if html is not None:
            msg.add_alternative(html, subtype="html", charset=mime_charset)
    elif html is not None:
        msg.set_content(html, subtype="html", charset=mime_charset)
    else:
        msg.set_content("", charset=mime_charset)

    if inline_images:
        html_part = msg.get_body(preferencelist=("html",))
        assert html_part is not None
        for content_id, item in inline_images.items():
            check_header_value("inline image content id", content_id)
            name, data = _read_file(item, what="inline image")
            maintype, subtype = _mime_type(name)
            if maintype != "image":
                raise MessageCompositionError(f"Inline image {name!r} is not an image ({maintype}/{subtype}).")
            html_part.add_related(
                data,
                maintype,
                subtype,
                cid=f"<{content_id}>",
                filename=_safe_attachment_name(name),
                disposition="inline",
            )

    streamed: list[StreamedFile] = []
    for item in files or ():
        large = _large_local_file(item)
        if large is not None:
            # A marker of exactly one base64 line (57 random bytes) holds the attachment's place.
            raw_marker = secrets.token_bytes(_B64_LINE)
            maintype, subtype = _mime_type(large.name)
            msg.add_attachment(raw_marker, maintype, subtype, filename=_safe_attachment_name(large.name))
            streamed.append(StreamedFile(base64.b64encode(raw_marker), large, large.stat().st_size))
            continue
        name, data = _read_file(item, what="attachment")
        maintype, subtype = _mime_type(name)
        msg.add_attachment(data, maintype, subtype, filename=_safe_attachment_name(name))

    recipients = tuple(dict.fromkeys(a.addr_spec for a in (*to_addresses, *cc_addresses, *bcc_addresses)))
    return OutgoingMessage(
        message=msg,
        envelope_from=from_address.addr_spec,
        recipients=recipients,
        message_id=message_id,
        streamed=tuple(streamed),
    )


def _large_local_file(item: FileInput) -> Path | None:
    if hasattr(item, "read_bytes") and not isinstance(item, PurePath):
        return None  # object storage: read whole (no cheap size and reopen guarantees)
    path = Path(os.fspath(item))
    try:
        return path if path.is_file() and path.stat().st_size > STREAM_THRESHOLD else None
    except OSError:
        return None


def _check_file(item: FileInput, *, what: str) -> None:
    if hasattr(item, "read_bytes") and not isinstance(item, PurePath):
        return  # object storage: reading it is the only check, and that is the build's job
    path = Path(os.fspath(item))
    if not (path.is_file() and os.access(path, os.R_OK)):
        raise MessageCompositionError(f"Cannot read {what} {str(path)!r}: not a readable file.")


def plan_message(
    *,
    sender: str,
    to: AddressInput,
    cc: AddressInput = None,
    bcc: AddressInput = None,
    message_id: str | None = None,
    **fields: Any,
) -> PlannedMessage:
    """Check a message's fields as :func:`compose_message` would, without building it.

    Raises :class:`MessageCompositionError` for the same faults (addresses, header injection,
    reserved or invalid custom headers, unreadable files); the content is built by ``build()``.
    """
    if fields.get("files") is not None:
        fields["files"] = list(fields["files"])  # checked now and read at build(): an iterator only once
    from_address = parse_address(sender, field="from_email")
    addresses = [*parse_addresses(to, field="to"), *parse_addresses(cc, field="cc"), *parse_addresses(bcc, field="bcc")]
    if not addresses:
        raise MessageCompositionError("The message has no recipient: set to, cc or bcc.")
    parse_addresses(fields.get("reply_to"), field="reply_to")
    check_header_value("Subject", _as_text(fields.get("subject")))
    if fields.get("inline_images") and fields.get("html_content") is None:
        raise MessageCompositionError("inline_images need html_content that references them as cid:<name>.")
    for name, value in (fields.get("custom_headers") or {}).items():
        check_header_name(name)
        if name.lower() in _RESERVED_HEADERS:
            raise MessageCompositionError(f"custom_headers may not set {name}; use the operator's own argument.")
        check_header_value(name, _as_text(value))
    for content_id, item in (fields.get("inline_images") or {}).items():
        check_header_value("inline image content id", content_id)
        _check_file(item, what="inline image")
    for item in fields.get("files") or ():
        _check_file(item, what="attachment")
    final_id = normalize_message_id(message_id) if message_id else make_msgid(domain=from_address.domain)
    recipients = tuple(dict.fromkeys(a.addr_spec for a in addresses))
    build = functools.partial(compose_message, sender=sender, to=to, cc=cc, bcc=bcc, message_id=final_id, **fields)
    return PlannedMessage(message_id=final_id, envelope_from=from_address.addr_spec, recipients=recipients, build=build)


__all__ = ["OutgoingMessage", "PlannedMessage", "compose_message", "plan_message"]
