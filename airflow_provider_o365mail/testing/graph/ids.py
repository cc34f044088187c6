"""Graph IDs of the messages and folders in Dovecot: opaque to clients, stable, checked (no I/O).

A folder's ID stands for its Dovecot mailbox GUID, so a renamed folder keeps its ID and a folder
deleted and created again gets a new one (Exchange's folder IDs behave the same way). A message's
ID stands for (folder GUID, UIDVALIDITY, UID): stable while the message stays in its folder, new
after a move (``POST .../move`` answers the new ID, as Graph does), and gone when the folder's
UIDVALIDITY changes. Each ID carries a tag (HMAC of the mailbox and the fields, keyed by the
sandbox's secret) so an ID from another mailbox, or one a client pieced together, is unknown
(404 ``ErrorItemNotFound``); a string that is not an ID at all is 400 ``ErrorInvalidIdMalformed``.
The IDs look like Exchange's (``AAMkAG...=`` for messages, ``AQMkAG...=`` for folders) and clients
must not read anything into them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
from dataclasses import dataclass

from airflow_provider_o365mail.testing.graph import errors

MESSAGE_PREFIX = "AAMkAG"
FOLDER_PREFIX = "AQMkAG"
_TAG = 8


@dataclass(frozen=True)
class MessageRef:
    folder_guid: str
    uidvalidity: int
    uid: int


class IdCodec:
    """Encode and check IDs for one sandbox (``secret``: stable across stand-in restarts)."""

    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(f"graph-ids|{secret}".encode()).digest()

    def _tag(self, mailbox: str, payload: bytes) -> bytes:
        return hmac.new(self._key, mailbox.lower().encode() + b"|" + payload, hashlib.sha256).digest()[:_TAG]

    def folder_id(self, mailbox: str, folder_guid: str) -> str:
        payload = _guid_bytes(folder_guid)
        return FOLDER_PREFIX + base64.urlsafe_b64encode(payload + self._tag(mailbox, payload)).decode()

    def message_id(self, mailbox: str, ref: MessageRef) -> str:
        payload = _guid_bytes(ref.folder_guid) + struct.pack(">II", ref.uidvalidity, ref.uid)
        return MESSAGE_PREFIX + base64.urlsafe_b64encode(payload + self._tag(mailbox, payload)).decode()

    def folder_guid(self, mailbox: str, folder_id: str) -> str | None:
        """The folder GUID of ``folder_id``; None if it is not a folder ID of ``mailbox``."""
        payload = self._open(mailbox, folder_id, FOLDER_PREFIX, 16, malformed_ok=True)
        return payload.hex() if payload is not None else None

    def message_ref(self, mailbox: str, message_id: str) -> MessageRef:
        """The message ``message_id`` stands for; 400 if malformed, 404 if not one of ``mailbox``'s."""
        payload = self._open(mailbox, message_id, MESSAGE_PREFIX, 24, malformed_ok=False)
        if payload is None:
            raise errors.item_not_found()
        uidvalidity, uid = struct.unpack(">II", payload[16:])
        return MessageRef(payload[:16].hex(), uidvalidity, uid)

    def _open(self, mailbox: str, value: str, prefix: str, size: int, *, malformed_ok: bool) -> bytes | None:
        raw = None
        if value.startswith(prefix):
            try:
                raw = base64.urlsafe_b64decode(value[len(prefix) :].replace("+", "-").replace("/", "_"))
            except (binascii.Error, ValueError):
                raw = None
        if raw is None or len(raw) != size + _TAG:
            if malformed_ok:
                return None
            raise errors.id_malformed()
        payload, tag = raw[:size], raw[size:]
        return payload if hmac.compare_digest(tag, self._tag(mailbox, payload)) else None


def _guid_bytes(guid: str) -> bytes:
    value = bytes.fromhex(guid)
    if len(value) != 16:
        raise ValueError(f"not a Dovecot mailbox GUID: {guid!r}")
    return value
