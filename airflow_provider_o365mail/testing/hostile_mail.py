"""Hostile messages for client robustness tests, and their delivery into a sandbox folder.

The builders return raw bytes (CRLF line ends). :func:`deliver` stores them with IMAP APPEND as
the mailbox owner (a token minted by the Entra ID stand-in), which bypasses SMTP's size limit and
Postfix's header rewriting, gives the message a UID at once (UIDPLUS ``APPENDUID``) and goes
through Dovecot's own parser exactly as a delivered message would.

Dovecot 2.3 stops parsing MIME at 100 nested or 10,000 total parts (lib-mail's message-parser
defaults); deeper or further parts are kept as body text, so BODYSTRUCTURE is truncated while the
bytes stay intact. Exchange's own limits here are undocumented.
"""

from __future__ import annotations

import email.utils
import imaplib
import re
import ssl
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow_provider_o365mail.testing.sandbox import SandboxInfo

_CRLF = "\r\n"


def _head(subject: str, content_type: str, to: str = "victim@o365.sandbox.test") -> str:
    return _CRLF.join(
        [
            "From: Hostile Sender <hostile@example.invalid>",
            f"To: {to}",
            f"Subject: {subject}",
            f"Date: {email.utils.formatdate()}",
            f"Message-ID: <{uuid.uuid4().hex}@hostile.example.invalid>",
            "MIME-Version: 1.0",
            f"Content-Type: {content_type}",
        ]
    )


def good_message(to: str, subject: str = "A well-formed message", body: str = "Hello.\r\n") -> bytes:
    """A plain, valid text/plain message: the control case next to the hostile ones."""
    return (_head(subject, "text/plain; charset=utf-8", to) + _CRLF * 2 + body).encode()


def many_parts(parts: int = 10_000) -> bytes:
    """multipart/mixed with ``parts`` small text parts (10,000 parts is about 0.9 MB)."""
    boundary = f"mp{uuid.uuid4().hex[:14]}"
    pieces = [_head(f"{parts} MIME parts", f'multipart/mixed; boundary="{boundary}"'), "", "preamble"]
    for number in range(parts):
        pieces += [
            f"--{boundary}",
            "Content-Type: text/plain",
            "",
            f"part {number:05d} of {parts}: padding text, padding",
        ]
    pieces += [f"--{boundary}--", ""]
    return _CRLF.join(pieces).encode()


def deeply_nested(depth: int = 1_000) -> bytes:
    """multipart/mixed nested ``depth`` levels deep, one text part at the bottom (BODYSTRUCTURE depth)."""
    boundaries = [f"n{level:04d}{uuid.uuid4().hex[:8]}" for level in range(depth)]
    lines = [_head(f"MIME nested {depth} levels", f'multipart/mixed; boundary="{boundaries[0]}"'), ""]
    for level in range(1, depth):
        lines += [f"--{boundaries[level - 1]}", f'Content-Type: multipart/mixed; boundary="{boundaries[level]}"', ""]
    lines += [f"--{boundaries[-1]}", "Content-Type: text/plain", "", "the bottom"]
    lines += [f"--{b}--" for b in reversed(boundaries)]
    lines.append("")
    return _CRLF.join(lines).encode()


def huge_header(size: int = 100 * 1024 * 1024) -> bytes:
    """A message whose header section is at least ``size`` bytes (many ``X-Filler`` fields), short body."""
    head = _head(f"{size} byte header", "text/plain; charset=us-ascii") + _CRLF
    line = "X-Filler: " + "h" * 68 + _CRLF  # 80 bytes
    count = max(0, size - len(head)) // len(line) + 1
    return (head + line * count + _CRLF + "A short body under a huge header." + _CRLF).encode()


def huge_filenames(parts: int = 200, name_length: int = 8_000) -> bytes:
    """``parts`` attachments whose file names are ``name_length`` characters.

    Half use a plain quoted ``filename=``, half RFC 2231 continuations (``filename*0*=utf-8''...``)
    with non-ASCII characters and path separators, as hostile senders do.
    """
    boundary = f"fn{uuid.uuid4().hex[:14]}"
    pieces = [
        _head(f"{parts} attachments with {name_length}-character names", f'multipart/mixed; boundary="{boundary}"')
    ]
    pieces += ["", "This is a multi-part message."]
    for number in range(parts):
        pieces += [f"--{boundary}", "Content-Type: application/octet-stream", "Content-Transfer-Encoding: base64"]
        if number % 2 == 0:
            name = (f"{number:04d}_" + "A" * name_length)[:name_length] + ".pdf"
            pieces.append(f'Content-Disposition: attachment; filename="{name}"')
        else:
            encoded = ("..%2F..%2F" + "%C3%A9" * name_length)[: name_length * 3]
            encoded = encoded[: len(encoded) - len(encoded) % 3]
            chunks = [encoded[i : i + 60] for i in range(0, len(encoded), 60)]
            disposition = ["Content-Disposition: attachment;"]
            for index, chunk in enumerate(chunks):
                prefix = "utf-8''" if index == 0 else ""
                disposition.append(f" filename*{index}*={prefix}{chunk};")
            disposition[-1] = disposition[-1].rstrip(";")
            pieces.extend(disposition)
        pieces += ["", "aGVsbG8="]
    pieces += [f"--{boundary}--", ""]
    return _CRLF.join(pieces).encode()


def deliver(info: SandboxInfo, upn: str, raw: bytes, folder: str = "INBOX", timeout: float = 300) -> int:
    """IMAP APPEND ``raw`` into ``folder`` of ``upn`` (created if missing); returns the new UID."""
    token = info.admin().mint_access_token(upn)
    client = imaplib.IMAP4_SSL(
        "127.0.0.1", info.imap_port, ssl_context=ssl.create_default_context(cafile=info.ca_file), timeout=timeout
    )
    try:
        sasl = f"user={upn}\x01auth=Bearer {token}\x01\x01".encode()
        client.authenticate("XOAUTH2", lambda challenge: b"" if challenge else sasl)
        quoted = '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'
        client.create(quoted)  # NO [ALREADYEXISTS] when it exists: fine
        status, data = client.append(quoted, None, None, raw)
        if status != "OK":
            raise RuntimeError(f"APPEND into {folder} failed: {data!r}")
        found = re.search(rb"\[APPENDUID \d+ (\d+)\]", data[0] or b"")
        if found is None:
            raise RuntimeError("the server did not report the new UID (no UIDPLUS?)")
        return int(found.group(1))
    finally:
        try:
            client.logout()
        except (imaplib.IMAP4.error, OSError):
            client.shutdown()
