"""Read what arrived in a sandbox mailbox (stdlib imaplib with a minted token; independent of the hook)."""

from __future__ import annotations

import contextlib
import email
import imaplib
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from email import policy
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_provider_o365mail.testing.sandbox import SandboxInfo


def _login(info: SandboxInfo, upn: str) -> imaplib.IMAP4_SSL:
    token = info.admin().mint_access_token(upn)
    sasl = f"user={upn}\x01auth=Bearer {token}\x01\x01".encode()
    client = imaplib.IMAP4_SSL(
        "127.0.0.1", info.imap_port, ssl_context=ssl.create_default_context(cafile=info.ca_file), timeout=30
    )
    client.authenticate("XOAUTH2", lambda challenge: b"" if challenge else sasl)
    return client


def fetch_raw_messages(info: SandboxInfo, upn: str, folder: str = "INBOX") -> list[bytes]:
    """Every message in ``folder`` of ``upn``'s mailbox, exactly as stored."""
    client = _login(info, upn)
    try:
        client.select(_quote(folder), readonly=True)
        _, data = client.uid("SEARCH", "ALL")
        uids = data[0].split()
        if not uids:
            return []
        _, fetched = client.uid("FETCH", b",".join(uids).decode(), "(BODY.PEEK[])")
        return [part[1] for part in fetched if isinstance(part, tuple)]
    finally:
        client.logout()


def _quote(folder: str) -> str:
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=policy.default)  # type: ignore[return-value]


def wait_for_messages(
    info: SandboxInfo,
    upn: str,
    match: Callable[[EmailMessage], bool] = lambda _: True,
    *,
    count: int = 1,
    folder: str = "INBOX",
    timeout: float = 20.0,
) -> list[EmailMessage]:
    """Poll until ``count`` messages matching ``match`` are in the folder; return them parsed."""
    deadline = time.monotonic() + timeout
    found: list[EmailMessage] = []
    while True:
        found = [m for m in map(parse, fetch_raw_messages(info, upn, folder)) if match(m)]
        if len(found) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if len(found) < count:
        raise AssertionError(f"expected {count} matching message(s) in {upn}/{folder}, found {len(found)}")
    return found


def with_subject(subject: str) -> Callable[[EmailMessage], bool]:
    return lambda message: message.get("Subject") == subject


@contextlib.contextmanager
def imap_session(info: SandboxInfo, upn: str) -> Iterator[Any]:
    """An IMAPClient session as ``upn`` (token minted by the stand-in), for arranging test mailboxes."""
    from imapclient import IMAPClient

    client = IMAPClient(
        "127.0.0.1", info.imap_port, ssl_context=ssl.create_default_context(cafile=info.ca_file), timeout=30
    )
    client.oauth2_login(upn, info.admin().mint_access_token(upn))
    try:
        yield client
    finally:
        client.logout()


def recreate_folder(info: SandboxInfo, upn: str, folder: str) -> None:
    """Delete (if present) and create ``folder``: Dovecot gives it a new UIDVALIDITY."""
    with imap_session(info, upn) as client:
        if client.folder_exists(folder):
            client.delete_folder(folder)
        client.create_folder(folder)


def append_messages(info: SandboxInfo, upn: str, folder: str, messages: Iterable[bytes]) -> None:
    with imap_session(info, upn) as client:
        if not client.folder_exists(folder):
            client.create_folder(folder)
        for raw in messages:
            client.append(folder, raw)
