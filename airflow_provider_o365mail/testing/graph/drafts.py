"""Draft messages created through Graph, with their attachments spooled to disk.

A draft is a Graph ``message`` (JSON) or a MIME message, plus file attachments added later
(``POST .../attachments`` or an upload session). Its visible copy lives in the mailbox's Drafts
folder (the service keeps it in step); the attachments' bytes live under the stand-in's spool
directory until the draft is sent or the stand-in stops.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_provider_o365mail.testing.graph import errors
from airflow_provider_o365mail.testing.graph.messages import Attachment


def new_item_id() -> str:
    """An opaque Exchange-style item ID (URL-safe base64 with its ``=`` padding, as Graph's)."""
    return "AAMkAG" + base64.urlsafe_b64encode(secrets.token_bytes(39)).decode() + "="


@dataclass
class StoredAttachment:
    id: str
    name: str
    content_type: str
    size: int
    is_inline: bool
    content_id: str | None
    path: Path
    last_modified: float

    def read(self) -> Attachment:
        return Attachment(self.name, self.content_type, self.path.read_bytes(), self.is_inline, self.content_id)


@dataclass
class Draft:
    id: str
    mailbox: str
    created: float
    internet_message_id: str
    message: dict[str, Any] | None = None
    mime: bytes | None = None
    attachments: list[StoredAttachment] = field(default_factory=list)
    #: UID of its copy in the Drafts folder.
    uid: int | None = None
    #: Size of its last stored MIME form (what MaxSendSize is checked against between sends).
    size: int = 0
    modified: float = 0.0

    def attachment_bytes(self) -> int:
        return sum(a.size for a in self.attachments)


class DraftStore:
    def __init__(self, spool: Path) -> None:
        self.spool = spool
        self._drafts: dict[str, Draft] = {}
        self._lock = threading.Lock()
        shutil.rmtree(spool, ignore_errors=True)
        spool.mkdir(parents=True, exist_ok=True)
        os.chmod(spool, 0o700)

    def _dir(self, draft_id: str) -> Path:
        return self.spool / hashlib.sha256(draft_id.encode()).hexdigest()[:32]

    def create(
        self, mailbox: str, internet_message_id: str, *, message: dict | None = None, mime: bytes | None = None
    ) -> Draft:
        now = time.time()
        draft = Draft(new_item_id(), mailbox.lower(), now, internet_message_id, message, mime, modified=now)
        self._dir(draft.id).mkdir(mode=0o700)
        with self._lock:
            self._drafts[draft.id] = draft
        return draft

    def get(self, mailbox: str, draft_id: str) -> Draft:
        """The draft ``draft_id`` of ``mailbox``; another mailbox's, a sent or unknown one is 404."""
        with self._lock:
            draft = self._drafts.get(draft_id)
        if draft is None or draft.mailbox != mailbox.lower():
            raise errors.item_not_found()
        return draft

    def add_attachment(
        self,
        draft: Draft,
        *,
        name: str,
        content_type: str,
        is_inline: bool,
        content_id: str | None,
        data: bytes | None = None,
        from_file: Path | None = None,
    ) -> StoredAttachment:
        attachment_id = new_item_id()
        path = self._dir(draft.id) / hashlib.sha256(attachment_id.encode()).hexdigest()[:32]
        if from_file is not None:
            os.replace(from_file, path)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data or b"")
        stored = StoredAttachment(
            attachment_id, name, content_type, path.stat().st_size, is_inline, content_id, path, time.time()
        )
        with self._lock:
            draft.attachments.append(stored)
            draft.modified = stored.last_modified
        return stored

    def of_mailbox(self, mailbox: str) -> list[Draft]:
        with self._lock:
            return [d for d in self._drafts.values() if d.mailbox == mailbox.lower()]

    def remove(self, draft: Draft) -> None:
        with self._lock:
            self._drafts.pop(draft.id, None)
        shutil.rmtree(self._dir(draft.id), ignore_errors=True)

    def upload_spool(self) -> Path:
        path = self.spool / "uploads"
        path.mkdir(mode=0o700, exist_ok=True)
        return path
