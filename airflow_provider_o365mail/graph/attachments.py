"""The bytes of a sensed message's attachment over Microsoft Graph: ``/$value`` streamed in 1 MiB pieces.

Graph serves a file attachment's raw content at ``.../messages/{id}/attachments/{id}/$value`` (an
attached message as its MIME), so nothing is base64-decoded and a 100 MB attachment never sits in
memory. A message's Graph id changes when it is moved (a sensor's ``post_action="move"``): a message
no longer found under its id is looked up again by its Internet Message-ID, and its attachment by
name and size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

from airflow_provider_o365mail.exceptions import GraphRequestRefused
from airflow_provider_o365mail.graph.query import odata_string

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024


class GraphAttachmentReader:
    """Reads attachments of Graph summaries (``graph_id``, ``message_id``; each attachment's ``graph_id``,
    ``name``, ``size``) with a :class:`.client.GraphClient` of the mailbox (``who``: ``me`` or ``users/{address}``)."""

    def __init__(self, client: Any, who: str, *, chunk_bytes: int = CHUNK_BYTES) -> None:
        self._client = client
        self._who = who
        self.chunk_bytes = chunk_bytes
        self._moved: dict[str, str] = {}

    def close(self) -> None:
        self._client.close()

    def chunks(self, message: Mapping[str, Any], attachment: Mapping[str, Any]) -> Iterator[bytes]:
        """The attachment's bytes. The request is made now (a message that is gone raises here, before the
        caller opens anything); the body is read as the caller iterates."""
        message_id = str(message.get("graph_id") or "")
        attachment_id = str(attachment.get("graph_id") or "")
        if not message_id or not attachment_id:
            raise GraphRequestRefused(
                f"{message.get('message_id')} has no Graph ids: it was sensed over IMAP. Download its attachments "
                "with the transport that sensed it.",
                status=400,
                code="NotAGraphSummary",
            )
        message_id = self._moved.get(message_id, message_id)
        try:
            response = self._value(message_id, attachment_id)
        except GraphRequestRefused as err:
            if err.status != 404:
                raise
            message_id, attachment_id = self._relocate(message, attachment)
            response = self._value(message_id, attachment_id)
        return self._body(response)

    def _value(self, message_id: str, attachment_id: str) -> Any:
        return self._client.request(
            "GET",
            f"{self._who}/messages/{message_id}/attachments/{attachment_id}/$value",
            doing=f"downloading attachment {attachment_id[-12:]} of message {message_id[-12:]}",
            stream=True,
        )

    def _body(self, response: Any) -> Iterator[bytes]:
        try:
            yield from (piece for piece in response.iter_content(self.chunk_bytes) if piece)
        finally:
            response.close()

    def _relocate(self, message: Mapping[str, Any], attachment: Mapping[str, Any]) -> tuple[str, str]:
        """The message's id now (found by Message-ID) and its attachment's id (by name, then size)."""
        internet_id = message.get("message_id")
        if not internet_id:
            raise GraphRequestRefused(
                "The message is no longer in the mailbox under its Graph id and has no Message-ID to find it by.",
                status=404,
                code="ErrorItemNotFound",
            )
        found = self._client.request(
            "GET",
            f"{self._who}/messages",
            doing=f"finding {internet_id} (moved since it was sensed)",
            params={"$filter": f"internetMessageId eq {odata_string(str(internet_id))}", "$select": "id"},
        ).json()
        ids = [str(m["id"]) for m in found.get("value") or [] if isinstance(m, Mapping) and m.get("id")]
        if not ids:
            raise GraphRequestRefused(
                f"{internet_id} is no longer in the mailbox (deleted since it was sensed); its attachments cannot "
                "be downloaded.",
                status=404,
                code="ErrorItemNotFound",
            )
        new_id = ids[0]
        self._moved[str(message.get("graph_id"))] = new_id
        listed = self._client.request(
            "GET",
            f"{self._who}/messages/{new_id}/attachments",
            doing=f"listing the attachments of {internet_id}",
            params={"$select": "id,name,size"},
        ).json()
        candidates = [
            a for a in listed.get("value") or [] if isinstance(a, Mapping) and a.get("name") == attachment.get("name")
        ]
        sized = [a for a in candidates if a.get("size") == attachment.get("size")] or candidates
        if not sized:
            raise GraphRequestRefused(
                f"{internet_id} has no attachment named {attachment.get('name')!r} any more.",
                status=404,
                code="ErrorItemNotFound",
            )
        log.info("%s was moved since it was sensed; downloading from its new place.", internet_id)
        return new_id, str(sized[0]["id"])


__all__ = ["CHUNK_BYTES", "GraphAttachmentReader"]
