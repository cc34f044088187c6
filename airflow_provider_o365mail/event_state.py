"""Names shared by the mail event trigger and the asset-event listener (no logic, no imports).

The trigger marks each event's payload with :data:`SOURCE_MARKER`; the listener records the
:func:`emitted_id` of marked events under :data:`EMITTED_KEY` in the asset's state store, and the
trigger reads that key back after a restart.
"""

from __future__ import annotations

from typing import Any

EMITTED_KEY = "o365mail_emitted"
EMITTED_KEPT = 5000
#: Marks the payloads of the mail event trigger, whichever transport read the message.
SOURCE_MARKER = "o365mail_imap"


def emitted_id(payload: dict[str, Any]) -> str | None:
    """A message's identity in an asset event, never reused for another message of the watched folder.

    - IMAP: folder, UIDVALIDITY and UID.
    - Microsoft Graph: folder and Graph id (``{folder}|graph|{id}``). Exchange gives a message a new id
      when it moves to another folder, so the id names "this message in this folder": the record
      matches exactly the redelivery of a round read again after a restart (same folder, same id),
      while a message moved out and back in is new to the folder, as over IMAP (a new UID).

    Not the Message-ID: senders choose it, and two different messages can carry the same one.
    """
    folder = payload.get("folder")
    graph_id = payload.get("graph_id")
    if graph_id and payload.get("uid") is None:
        return f"{folder}|graph|{graph_id}" if folder else None
    try:
        return f"{payload['folder']}|{int(payload['uidvalidity'])}|{int(payload['uid'])}"
    except (KeyError, TypeError, ValueError):
        return None
