"""The bytes of a sensed message's attachment over IMAP: sliced ``BODY.PEEK`` fetches, decoded on the fly.

A 100 MB attachment never sits in memory: each part is fetched in 1 MiB slices
(``BODY.PEEK[section]<offset.length>``, the message stays unread) and its transfer encoding is
decoded slice by slice (:class:`..core.attachments.StreamDecoder`). Where the data goes (files, names)
is the caller's business; every IMAP call runs inside ``errors()``, the hook's error mapping, and
nothing the caller does with the data does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from airflow_provider_o365mail.core.attachments import StreamDecoder
from airflow_provider_o365mail.exceptions import MailServerError

CHUNK_BYTES = 1024 * 1024


class ImapAttachmentReader:
    """Reads attachments of summaries (``folder``, ``uidvalidity``, ``uid``, ``message_id``, each attachment's
    ``section`` and ``encoding``) over one logged-in IMAPClient, selecting folders read-only as needed."""

    def __init__(
        self,
        client: Any,
        *,
        errors: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self._client = client
        self._errors = errors
        self.chunk_bytes = chunk_bytes
        self._folder: str | None = None
        self._uidvalidity = 0
        self._uids: dict[tuple[Any, ...], int] = {}

    def chunks(self, message: Mapping[str, Any], attachment: Mapping[str, Any]) -> Iterator[bytes]:
        """The attachment's decoded bytes, slice by slice. The message is located now (a message that is
        gone raises here, before the caller opens anything); the slices are fetched as they are read."""
        key = (message.get("folder"), message.get("uidvalidity"), message.get("uid"), message.get("message_id"))
        uid = self._uids.get(key)
        if uid is None:
            with self._errors():
                uid = self._uids[key] = self._current_uid(message)
        return self._slices(uid, str(attachment["section"]), attachment.get("encoding"))

    def _slices(self, uid: int, section: str, encoding: str | None) -> Iterator[bytes]:
        decoder = StreamDecoder(encoding)
        offset = 0
        while True:
            with self._errors():
                chunk = self._slice(uid, section, offset)
            if chunk:
                yield decoder.feed(chunk)
            if len(chunk) < self.chunk_bytes:
                break
            offset += len(chunk)
        yield decoder.finish()

    def _select(self, folder: str) -> int:
        if folder != self._folder:
            selected = self._client.select_folder(folder, readonly=True)
            self._folder, self._uidvalidity = folder, int(selected[b"UIDVALIDITY"])
        return self._uidvalidity

    def _current_uid(self, message: Mapping[str, Any]) -> int:
        """The message's UID now: its own if the folder is unchanged, else found again by Message-ID."""
        uidvalidity = self._select(str(message.get("folder") or "INBOX"))
        if int(message.get("uidvalidity") or 0) == uidvalidity:
            return int(message["uid"])
        message_id = message.get("message_id")
        found = self._client.search([b"HEADER", b"Message-ID", str(message_id).encode()]) if message_id else []
        if not found:
            raise MailServerError(
                f"Message {message_id or message.get('uid')} is no longer in {message.get('folder')} (the folder's "
                "UIDVALIDITY changed and no message with its Message-ID was found)."
            )
        return int(found[-1])

    def _slice(self, uid: int, section: str, offset: int) -> bytes:
        item = f"BODY.PEEK[{section}]<{offset}.{self.chunk_bytes}>"
        response = self._client.fetch([uid], [item]).get(uid)
        if response is None:
            raise MailServerError(f"Message UID {uid} disappeared while its attachment was downloaded.")
        key = next((k for k in response if k.startswith(f"BODY[{section}]".encode())), None)
        chunk = response.get(key) if key else None
        return chunk or b""
