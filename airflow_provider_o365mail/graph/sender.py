"""Send messages through Microsoft Graph with the guarantees of the SMTP path (a ``MessageSender``).

- Mail whose base64 MIME fits Graph's request limit (4 MB) goes in one ``sendMail`` as MIME, so the
  Message-ID, headers, inline images and attachments are exactly what was composed.
- Larger mail (up to the mailbox's MaxSendSize, 150 MB at most) becomes a draft from the MIME without
  its attachments; each attachment is added to it (under 3 MB in one request, larger ones through an
  upload session in chunks of 12 x 320 KiB read from the file), then the draft is sent. A chunk whose
  answer was lost is sent again, and Graph's "not the next expected range" then means it had arrived:
  the upload resumes after it. A draft whose building failed (before its send was asked for) is
  deleted, so no unsent copy with large attachments stays in Drafts. Needs Mail.ReadWrite.
- A send whose answer was lost (a timeout, a dropped connection, a 504) may have been accepted: the
  message is looked up in Sent Items (by ``internetMessageId``) before it is sent again
  (:mod:`..core.sent_items`). Every other request is retried on throttling and 5xx (:mod:`.client`).
- Graph answers 202 for the whole message (bad recipients come back later as non-delivery reports),
  so the ledger records it complete at once.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING
from urllib.parse import quote

from airflow_provider_o365mail import hints
from airflow_provider_o365mail.core.sending import OnAccepted, OnSending, SendResult, SentLookup
from airflow_provider_o365mail.core.sent_items import SENT_ITEMS_WAIT_SECONDS, found_in_sent_items
from airflow_provider_o365mail.exceptions import (
    GraphRequestRefused,
    MailServerUnavailable,
    MessageTooLargeError,
)
from airflow_provider_o365mail.graph.client import GraphClient, NoAnswer
from airflow_provider_o365mail.graph.mime import (
    DetachedAttachment,
    MiB,
    base64_length,
    draft_without_attachments,
    estimated_mime_body_size,
    mime_body,
)
from airflow_provider_o365mail.retry import Backoff

if TYPE_CHECKING:
    from airflow_provider_o365mail.core.compose import OutgoingMessage

log = logging.getLogger(__name__)

#: Graph's request limit ("MIME payloads are limited to 4 MB"), and what a request adds around a base64 body.
MAX_REQUEST_BYTES = 4 * MiB
JSON_ALLOWANCE = 4096
#: Attachments of at least this size go through an upload session (Outlook's minimum for one).
UPLOAD_SESSION_MIN = 3 * MiB
#: Upload chunk: within "up to 4 MB each time" and a multiple of 320 KiB (OneDrive's rule, harmless here).
UPLOAD_CHUNK = 12 * 320 * 1024
#: Sends whose outcome stayed unknown, or drafts whose building was interrupted: 4 attempts in all.
SEND_RETRY = Backoff(first=2.0, maximum=30.0, attempts=4, jitter=(0.75, 1.0))


class _StartOver(Exception):
    """Building the draft was interrupted where it cannot be resumed; a new draft is safe (nothing was sent)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def mailbox_path(mailbox: str | None) -> str:
    """``me`` (the signed-in user) or ``users/{address}`` (a shared mailbox; app-only)."""
    return "me" if not mailbox else f"users/{quote(mailbox, safe='@')}"


class GraphSender:
    """Sends one message at a time through Graph; see the module docstring. Use as a context manager.

    :param who: ``me`` or ``users/{address}`` (:func:`mailbox_path`).
    :param can_draft: the token may create drafts (Mail.ReadWrite): mail over the request limit is possible.
    :param sent_lookup: how many copies of a Message-ID Sent Items holds (after an ambiguous outcome).
    :param redact: told every upload URL (it carries its own credential) to hide it from logs.
    """

    def __init__(
        self,
        client: GraphClient,
        *,
        who: str,
        can_draft: bool,
        sent_lookup: SentLookup | None = None,
        retry: Backoff = SEND_RETRY,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        sent_items_wait: float = SENT_ITEMS_WAIT_SECONDS,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        upload_chunk: int = UPLOAD_CHUNK,
        redact: Callable[[str], object] | None = None,
    ) -> None:
        if retry.attempts is None:
            raise ValueError("the send retry policy needs a bounded number of attempts")
        self.client = client
        self.who = who
        self.can_draft = can_draft
        self.retry = retry
        self._sent_lookup = sent_lookup
        self._clock = clock
        self._sleep = sleep
        self.sent_items_wait = sent_items_wait
        self.max_request_bytes = max_request_bytes
        self.upload_chunk = upload_chunk
        self._redact = redact
        self.where = f"Microsoft Graph ({client.base_url}/{who})"

    def __enter__(self) -> GraphSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------------ sending
    def send(
        self,
        message: OutgoingMessage,
        *,
        on_accepted: OnAccepted | None = None,
        on_sending: OnSending | None = None,
        check_sent_first: bool = False,
        already_accepted: Iterable[str] = (),
        copies: int = 0,
    ) -> SendResult:
        """Send one message; see :meth:`..core.sending.MessageSender.send` for the parameters."""
        done = set(already_accepted)
        pending = [r for r in message.recipients if r not in done]
        if not pending or (
            check_sent_first and self._found(message, "an earlier try was interrupted while sending it", copies)
        ):
            if on_accepted is not None:
                on_accepted(message.message_id, tuple(pending), True)
            return SendResult(message.message_id, accepted=message.recipients, already_sent=True)
        attempt = 0
        while True:
            attempt += 1
            try:
                self._deliver(message, pending, on_sending)
                break
            except NoAnswer as unknown:
                if self._found(message, unknown.reason, copies):
                    break
                reason = unknown.reason
                if on_accepted is not None:  # that send certainly delivered nothing
                    on_accepted(message.message_id, (), False)
            except _StartOver as interrupted:
                reason = interrupted.reason
            if self.retry.gives_up_after(attempt):
                raise MailServerUnavailable(
                    f"Sending message {message.message_id} through {self.where} failed {attempt} times; last: "
                    f"{reason}. Nothing was sent twice; the task can be retried."
                )
            delay = self.retry.delay(attempt)
            log.warning(
                "Message %s: %s (attempt %d of %d); trying again in %.1f s.",
                message.message_id,
                reason,
                attempt,
                self.retry.attempts,
                delay,
            )
            self._sleep(delay)
        if on_accepted is not None:
            on_accepted(message.message_id, tuple(pending), True)
        return SendResult(message.message_id, accepted=message.recipients)

    def _deliver(self, message: OutgoingMessage, pending: list[str], on_sending: OnSending | None) -> None:
        if estimated_mime_body_size(message) <= self.max_request_bytes - JSON_ALLOWANCE:
            try:
                self._send_mime(message, pending, on_sending)
                return
            except MessageTooLargeError:
                if not self.can_draft:
                    raise
                log.info(
                    "Graph refused message %s as too large for one request; sending it as a draft.", message.message_id
                )
        if not self.can_draft:
            raise MessageTooLargeError(
                f"Message {message.message_id} is about {message.size():,} bytes: over Graph's 4 MB request limit. "
                + hints.GRAPH_NEEDS_READWRITE.format(why="mail over 4 MB is sent as a draft with upload sessions")
            )
        self._send_as_draft(message, pending, on_sending)

    def _send_mime(self, message: OutgoingMessage, pending: list[str], on_sending: OnSending | None) -> None:
        body = mime_body(message, pending)
        if on_sending is not None:
            on_sending(message.message_id)
        self.client.request(
            "POST",
            f"{self.who}/sendMail",
            data=body,
            headers={"Content-Type": "text/plain"},
            doing=f"sending message {message.message_id}",
            repeatable=False,
        )

    # ------------------------------------------------------------------ large mail
    def _send_as_draft(self, message: OutgoingMessage, pending: list[str], on_sending: OnSending | None) -> None:
        skeleton, attachments = draft_without_attachments(message, pending)
        if len(skeleton) > self.max_request_bytes - JSON_ALLOWANCE:
            raise MessageTooLargeError(
                f"Message {message.message_id} without its attachments is still {len(skeleton):,} bytes in base64 "
                "(its body and inline images): over Graph's 4 MB request limit. Use fewer or smaller inline images."
            )
        doing = f"creating a draft of message {message.message_id}"
        draft = self.client.request(
            "POST", f"{self.who}/messages", data=skeleton, headers={"Content-Type": "text/plain"}, doing=doing
        ).json()
        draft_path = f"{self.who}/messages/{quote(str(draft['id']), safe='')}"
        try:
            for attachment in attachments:
                if attachment.size >= UPLOAD_SESSION_MIN:
                    self._upload(message, draft_path, attachment)
                else:
                    self._attach(message, draft_path, attachment)
        except Exception:
            # Nothing was sent: the draft (with up to 150 MB of attachments) would stay in Drafts.
            self._discard_draft(message, draft_path)
            raise
        if on_sending is not None:
            on_sending(message.message_id)
        self.client.request(
            "POST",
            f"{draft_path}/send",
            data=b"",
            doing=f"sending message {message.message_id} (a draft)",
            repeatable=False,
        )
        log.info(
            "Sent message %s as a draft with %d attachment(s) (%s bytes).",
            message.message_id,
            len(attachments),
            f"{sum(a.size for a in attachments):,}",
        )

    def _discard_draft(self, message: OutgoingMessage, draft_path: str) -> None:
        """Delete a draft whose building failed (never after its send was requested: a sent draft's id may
        name the Sent Items copy that the lookup counts). Best effort: a failure is logged."""
        try:
            self.client.request(
                "DELETE", draft_path, doing=f"deleting the unsent draft of message {message.message_id}"
            )
        except Exception as err:  # the draft stays; say where
            log.warning(
                "Could not delete the unsent draft of message %s from Drafts (%s); delete it by hand if it stays.",
                message.message_id,
                f"{type(err).__name__}: {err}"[:300],
            )

    def _attach(self, message: OutgoingMessage, draft_path: str, attachment: DetachedAttachment) -> None:
        if base64_length(attachment.size) + JSON_ALLOWANCE > self.max_request_bytes:
            raise MessageTooLargeError(
                f"Attachment {attachment.name!r} of message {message.message_id} ({attachment.size:,} bytes) is too "
                "large for one Graph request and too small for an upload session (3 MB at least); pad or zip it."
            )
        body = {
            "@odata.type": "#microsoft.graph.fileAttachment",
            "name": attachment.name,
            "contentType": attachment.content_type,
            "contentBytes": base64.b64encode(attachment.read()).decode("ascii"),
        }
        try:
            self.client.request(
                "POST",
                f"{draft_path}/attachments",
                json=body,
                doing=f"attaching {attachment.name!r} to message {message.message_id}",
                repeatable=False,  # twice would attach it twice
            )
        except NoAnswer as err:
            raise _StartOver(f"adding attachment {attachment.name!r} got no answer ({err.reason})") from None

    def _upload(self, message: OutgoingMessage, draft_path: str, attachment: DetachedAttachment) -> None:
        doing = f"uploading {attachment.name!r} ({attachment.size:,} bytes) of message {message.message_id}"
        session = self.client.request(
            "POST",
            f"{draft_path}/attachments/createUploadSession",
            json={
                "AttachmentItem": {
                    "attachmentType": "file",
                    "name": attachment.name,
                    "size": attachment.size,
                    "contentType": attachment.content_type,
                }
            },
            doing=doing,
        ).json()
        upload_url = str(session["uploadUrl"])
        if self._redact is not None:
            self._redact(upload_url)  # pre-authenticated: a secret wherever it might be logged (urllib3 debug)
        for offset, piece in attachment.chunks(self.upload_chunk):
            self._put_chunk(upload_url, offset, piece, attachment.size, doing)

    def _put_chunk(self, upload_url: str, offset: int, piece: bytes, total: int, doing: str) -> None:
        """One chunk, sent again when its answer was lost; raise :class:`_StartOver` when that cannot tell."""
        end = offset + len(piece) - 1
        headers = {"Content-Type": "application/octet-stream", "Content-Range": f"bytes {offset}-{end}/{total}"}
        unanswered = 0
        while True:
            try:
                self.client.request(
                    "PUT", upload_url, data=piece, headers=headers, doing=doing, authorized=False, repeatable=False
                )
                return
            except NoAnswer as err:
                if end + 1 == total:
                    # The last chunk completes the attachment: whether it did cannot be asked; a new draft is safe.
                    raise _StartOver(f"the last chunk of an upload got no answer ({err.reason})") from None
                unanswered += 1
                if self.retry.gives_up_after(unanswered):
                    raise _StartOver(f"bytes {offset}-{end} of an upload got no answer {unanswered} times") from None
                log.warning("Bytes %d-%d of an upload got no answer (%s); sending them again.", offset, end, err.reason)
                self._sleep(self.retry.delay(unanswered))
            except GraphRequestRefused as err:
                if unanswered and err.code == "invalidRange":
                    # Graph expects a later byte: the unanswered try had arrived. Resume after it.
                    log.info(
                        "Bytes %d-%d of an upload had arrived although the answer was lost; resuming.", offset, end
                    )
                    return
                if err.code in ("invalidRange", "itemNotFound", "ErrorItemNotFound") or err.status in (404, 416):
                    raise _StartOver(f"the upload session was lost ({err.code or err.status})") from None
                raise

    # ------------------------------------------------------------------ Sent Items
    def _found(self, message: OutgoingMessage, reason: str, copies: int) -> bool:
        return found_in_sent_items(
            self._sent_lookup,
            message.message_id,
            reason=reason,
            where=self.where,
            copies=copies,
            wait=self.sent_items_wait,
            clock=self._clock,
            sleep=self._sleep,
        )


def sent_items_count(client: GraphClient, who: str, message_id: str) -> int:
    """How many messages with this ``internetMessageId`` the mailbox's Sent Items holds (Mail.Read or more)."""
    escaped = message_id.replace("'", "''")
    response = client.request(
        "GET",
        f"{who}/mailFolders/SentItems/messages",
        params={"$filter": f"internetMessageId eq '{escaped}'", "$select": "id", "$top": "25"},
        doing=f"looking for message {message_id} in Sent Items",
    )
    return len(response.json().get("value") or [])


__all__ = ["MAX_REQUEST_BYTES", "UPLOAD_CHUNK", "UPLOAD_SESSION_MIN", "GraphSender", "mailbox_path", "sent_items_count"]
