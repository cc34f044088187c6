"""The stand-in's behaviour switches, each defaulting to what Microsoft documents (no I/O).

Where Microsoft documents nothing (research notes mark it UNCONFIRMED) the default is the most
plausible reading and the switch lets a test choose another.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

MiB = 1024 * 1024


@dataclass
class GraphSettings:
    #: A request body over this is refused with 413 (user-post-messages.md: "limited to 4 MB").
    max_request_bytes: int = 4 * MiB
    #: POST .../attachments is for files "under 3 MB"; the answer to a bigger one is UNCONFIRMED.
    inline_attachment_limit: int = 3 * MiB
    inline_attachment_status: int = 413
    inline_attachment_code: str = "RequestEntityTooLarge"
    #: ErrorMessageSizeExceeded's HTTP status is UNCONFIRMED; 400 is what was observed.
    message_size_status: int = 400
    #: Upload sessions: 3 MB <= size <= 150 MB, "up to 4 MB each time", bytes in order.
    upload_min_size: int = 3 * MiB
    upload_max_size: int = 150 * MiB
    upload_max_chunk: int = 4 * MiB
    #: How long an uploadUrl works (fixed at creation, as outlook-large-attachments.md says; the
    #: real lifetime is UNCONFIRMED).
    upload_session_lifetime: float = 900.0
    #: A chunk that does not start at nextExpectedRanges (OneDrive's 416 ``invalidRange``; UNCONFIRMED for Outlook).
    upload_out_of_order_status: int = 416
    #: A bearer token on the pre-authenticated PUT is refused (OneDrive doc; observed as 401).
    upload_reject_authorization: bool = True
    #: 0: any chunk size; 327680: OneDrive's "multiple of 320 KiB" rule (UNCONFIRMED for Outlook).
    upload_chunk_multiple: int = 0
    #: Undeliverable recipients (outside the sandbox domain, or no such mailbox) get a non-delivery
    #: report in the sending mailbox's INBOX, after the 202, as Exchange does.
    send_ndr: bool = True
    # ---------------------------------------------------------------- reading
    #: Page size of a message or folder listing without $top (user-list-messages.md: 10).
    list_page_size: int = 10
    #: A $search answers up to this many messages (search-query-parameter.md: 1000).
    search_max_results: int = 1000
    #: DELETE .../messages/{id} moves the message to Deleted Items (what Outlook does; message-delete.md
    #: says only "delete": UNCONFIRMED); in Deleted Items itself, or with False, it is removed.
    delete_to_deleted_items: bool = True
    #: Content-Type of GET .../messages/{id}/$value (message-get.md shows the MIME only: UNCONFIRMED).
    mime_content_type: str = "text/plain"
    #: Page size of a delta round without Prefer: odata.maxpagesize or $top (not documented: UNCONFIRMED).
    delta_page_size: int = 10
    #: "Applying $filter in a delta query returns only up to 5,000 messages" (delta-query-messages.md).
    delta_filter_limit: int = 5000
    #: Status of an expired delta token, code syncStateNotFound ("a 40X-series error",
    #: delta-query-overview.md; 410 is what clients report: UNCONFIRMED).
    delta_expired_status: int = 410
    #: Delta tokens kept per mailbox; older ones are dropped like Outlook's token cache (size UNCONFIRMED).
    delta_token_cache: int = 5000
    #: A delta token whose folder's UIDVALIDITY changed (its messages got new IDs): "resync" answers
    #: syncStateNotFound; "replay" reports every old message removed and every current one created.
    #: Exchange has no UIDVALIDITY; which it would do is UNCONFIRMED.
    delta_uidvalidity_change: str = "resync"

    def update(self, **values: Any) -> GraphSettings:
        known = {f.name: f for f in fields(self)}
        for name, value in values.items():
            if name not in known:
                raise ValueError(f"unknown setting {name!r}")
            current = getattr(self, name)
            converted = (
                (value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes"))
                if isinstance(current, bool)
                else type(current)(value)
            )
            if isinstance(converted, int | float) and not isinstance(converted, bool) and converted < 0:
                raise ValueError(f"{name} cannot be negative")
            setattr(self, name, converted)
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
