"""Names shared by the mail event trigger and the asset-event listener (no logic, no imports).

The trigger marks each event's payload with :data:`SOURCE_MARKER`; the listener records the
:func:`emitted_id` of marked events under :data:`EMITTED_KEY` in the asset's state store, and the
trigger reads that key back after a restart.
"""

from __future__ import annotations

from typing import Any

EMITTED_KEY = "o365mail_emitted"
EMITTED_KEPT = 5000
SOURCE_MARKER = "o365mail_imap"


def emitted_id(payload: dict[str, Any]) -> str | None:
    """A message's identity in an asset event: folder, UIDVALIDITY and UID (never reused by IMAP).

    Not the Message-ID: senders choose it, and two different messages can carry the same one.
    """
    try:
        return f"{payload['folder']}|{int(payload['uidvalidity'])}|{int(payload['uid'])}"
    except (KeyError, TypeError, ValueError):
        return None
