"""Upload sessions for large attachments (attachment-createuploadsession.md, outlook-large-attachments.md).

``createUploadSession`` returns an opaque, pre-authenticated ``uploadUrl`` on another host (Outlook's,
not Graph's) carrying an ``authtoken``; the client PUTs the bytes in order, up to 4 MB each, with
``Content-Range: bytes {start}-{end}/{total}`` and no ``Authorization`` header. Each chunk but the
last gets 200 with ``nextExpectedRanges: ["{next}"]``; the last gets 201 with a ``Location`` naming
the new attachment. ``DELETE uploadUrl`` cancels (204). The checks here are pure; the bytes are
appended to a spool file by the caller.
"""

from __future__ import annotations

import re
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

from airflow_provider_o365mail.testing.graph import errors
from airflow_provider_o365mail.testing.graph.drafts import new_item_id
from airflow_provider_o365mail.testing.graph.errors import GraphError
from airflow_provider_o365mail.testing.graph.settings import GraphSettings

_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+)\s*$")


@dataclass
class UploadSession:
    id: str
    token: str
    app_id: str
    mailbox: str
    #: ``{object id}@{tenant id}``: how Outlook's URLs name the mailbox.
    user_key: str
    draft_id: str
    name: str
    content_type: str
    size: int
    is_inline: bool
    content_id: str | None
    expires: float
    path: Path
    received: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


def parse_content_range(header: str | None) -> tuple[int, int, int]:
    match = _RANGE.match(header or "")
    if match is None:
        raise errors.GraphError(
            400,
            "invalidRequest",
            "The Content-Range header is missing or malformed: expected 'bytes {start}-{end}/{total}'.",
        )
    start, end, total = (int(g) for g in match.groups())
    if end < start or end >= total:
        raise errors.GraphError(
            400, "invalidRequest", f"The Content-Range 'bytes {start}-{end}/{total}' is not a valid range."
        )
    return start, end, total


def check_chunk(
    session: UploadSession, content_range: str | None, length: int, settings: GraphSettings
) -> tuple[int, int]:
    """Validate one PUT against the session; returns ``(start, end)``."""
    start, end, total = parse_content_range(content_range)
    if total != session.size:
        raise GraphError(
            400, "invalidRequest", f"The total size {total} does not match the upload session's size {session.size}."
        )
    if length != end - start + 1:
        raise GraphError(
            400, "invalidRequest", f"The body has {length} bytes but Content-Range announces {end - start + 1}."
        )
    if length > settings.upload_max_chunk:
        raise errors.request_too_large(settings.upload_max_chunk)
    if start != session.received:
        raise GraphError(
            settings.upload_out_of_order_status,
            "invalidRange",
            f"The uploaded fragment does not start at the next expected byte {session.received}; upload bytes in order.",
        )
    last = end + 1 == session.size
    if settings.upload_chunk_multiple and not last and length % settings.upload_chunk_multiple:
        raise GraphError(
            400,
            "invalidRequest",
            f"Each fragment but the last must be a multiple of {settings.upload_chunk_multiple} bytes.",
        )
    return start, end


class UploadBook:
    """The open upload sessions, by ID; each usable only with its own ``authtoken``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, UploadSession] = {}

    def open(self, **fields: object) -> UploadSession:
        session = UploadSession(id=new_item_id(), token=secrets.token_urlsafe(48), **fields)  # type: ignore[arg-type]
        with self._lock:
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str, token: str | None, now: float) -> UploadSession:
        """The session; unknown, finished, cancelled, expired or wrong token: 404 (the URL no longer works)."""
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None or not token or not secrets.compare_digest(session.token, token):
            raise errors.item_not_found()
        if now > session.expires:
            self.close(session)
            raise errors.item_not_found()
        return session

    def close(self, session: UploadSession) -> None:
        """Cancelled or expired: the session and its bytes go."""
        self.finish(session)
        session.path.unlink(missing_ok=True)

    def finish(self, session: UploadSession) -> None:
        """Complete: the URL stops working; the bytes (now an attachment) stay."""
        with self._lock:
            self._sessions.pop(session.id, None)

    def count(self) -> int:
        with self._lock:
            return len(self._sessions)
